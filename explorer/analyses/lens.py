"""Logit lens: every layer's residual stream read through the final norm and the unembedding.

All rows (the embeddings, then each block's output) come from one nnsight trace; a comparison
runs both prompts as two invokes of that one trace. The unembedding is done after the trace,
all rows stacked and chunked, with top-k, entropy, KL and the target's probability and rank
reduced on the model's device so only small arrays reach the CPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import nnsight
import numpy as np
import torch

from explorer.core.jobs import JobContext
from explorer.core.placement import memory_budget
from explorer.core.requests import build_request
from explorer.core.results import Result, array, sized
from explorer.core.session import DTYPES, ModelSession

# Rows unembedded per matmul, at most: big enough to run near the matmul peak (1024 rows × 49k
# vocab × 4 B ≈ 200 MB per temporary). Fewer where the vocabulary is large (Gemma: 256k) or
# memory is short: see ``chunk_rows``.
CHUNK_ROWS = 1024
LENS_MEMORY = 768 * 2**20  # bytes the vocabulary-sized buffers of one chunk may take, at most


@dataclass(frozen=True)
class LensRequest:
    """What to compute. ``target`` None means: the model's final top-1 at the last position."""

    prompt: str
    target: str | None = None
    top_k: int = 10
    unembed_dtype: str = "auto"  # "auto" = the model's dtype; "bfloat16" is faster on CPU


@dataclass(frozen=True, eq=False)
class LensResult(Result):
    """Logit lens of one prompt. Arrays are [row, position(, k)]; row 0 is the embeddings."""

    request: LensRequest
    model: str
    tokens: np.ndarray = array("T", "str")          # each prompt token decoded on its own
    token_ids: np.ndarray = array("T", "int64")
    layer_labels: tuple[str, ...] = sized("R")      # "embed", "L0", ...
    top_ids: np.ndarray = array("R T k", "int64")
    top_tokens: np.ndarray = array("R T k", "str")
    top_probs: np.ndarray = array("R T k", "float32")
    entropy: np.ndarray = array("R T", "float32")      # nats
    kl_to_final: np.ndarray = array("R T", "float32")  # KL(final ‖ row) in nats
    target: str                                        # the target token as text
    target_id: int
    target_probs: np.ndarray = array("R T", "float32")
    target_ranks: np.ndarray = array("R T", "int64")   # 1 = top token

    @property
    def n_rows(self) -> int:
        return len(self.layer_labels)

    @property
    def n_positions(self) -> int:
        return len(self.tokens)

    def metric(self, name: str) -> np.ndarray:
        """A [R, T] map by name: 'prob' (top-1 probability), 'entropy', 'kl', 'target'."""
        return {
            "prob": lambda: self.top_probs[..., 0],
            "entropy": lambda: self.entropy,
            "kl": lambda: self.kl_to_final,
            "target": lambda: self.target_probs,
        }[name]()


@dataclass(frozen=True)
class CompareRequest:
    """Two prompts read through the lens for one target token."""

    prompt_a: str
    prompt_b: str
    target: str | None = None
    top_k: int = 10
    unembed_dtype: str = "auto"


@dataclass(frozen=True, eq=False)
class LensComparison(Result):
    """The lens of two prompts and where their target curves (last position) diverge."""

    request: CompareRequest
    a: LensResult
    b: LensResult

    @property
    def layer_labels(self) -> tuple[str, ...]:
        return self.a.layer_labels

    def relations(self) -> str | None:
        if self.a.n_rows != self.b.n_rows:
            return "the two prompts' lenses have different numbers of rows"
        return None

    def curves(self) -> tuple[np.ndarray, np.ndarray]:
        """Target probability per row at each prompt's last position."""
        return self.a.target_probs[:, -1], self.b.target_probs[:, -1]

    def difference(self) -> np.ndarray:
        """Per-row target probability of prompt B minus prompt A (last positions)."""
        pa, pb = self.curves()
        return pb - pa

    def divergence_row(self, threshold: float) -> int | None:
        """First row where the two target probabilities differ by more than ``threshold``."""
        hits = np.flatnonzero(np.abs(self.difference()) > threshold)
        return int(hits[0]) if len(hits) else None


def layer_labels(n_layers: int) -> tuple[str, ...]:
    return ("embed",) + tuple(f"L{i}" for i in range(n_layers))


def residual_streams(session: ModelSession, prompts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Residual stream after the embeddings and after each block, [R, T, d] per prompt.

    One trace; each prompt is an invoke (nnsight left-pads them into one batch).
    """
    blocks = session.blocks()
    resid_in = session.module(session.adapter.resid_in)
    saved: list[list] = [[] for _ in prompts]
    inputs = [ids[None].to(session.device) for ids in prompts]
    with torch.no_grad(), session.lock:
        # logits_to_keep=1: the model's own full-vocabulary logits are not needed here.
        # (No ``session`` inside the block: a remote trace ships the block's variables.)
        with session.trace(logits_to_keep=1) as tracer:
            for i, x in enumerate(inputs):
                with tracer.invoke(x):
                    nnsight.save(saved)  # a remote run returns only what was marked saved
                    saved[i].append(resid_in.output.save())
                    for block in blocks:
                        out = block.output
                        saved[i].append((out[0] if isinstance(out, tuple) else out).save())
    streams = []
    device = session.unembedding.device  # a sharded model's rows come from several devices
    for ids, rows in zip(prompts, saved):
        t = ids.numel()
        streams.append(torch.stack([r[0, -t:].to(device) for r in rows]))  # drop left padding
    return streams


def _unembed_dtype(session: ModelSession, name: str) -> torch.dtype:
    return session.dtype if name == "auto" else DTYPES[name]


def final_top1(session: ModelSession, stream: torch.Tensor, dtype: torch.dtype | None = None) -> int:
    """The model's own top-1 token at the last position of a [R, T, d] stream (its last row)."""
    with torch.no_grad():
        return int(session.logits(stream[-1, -1:], dtype=dtype).argmax(-1)[0])


def chunk_rows(vocab: int, device: torch.device | str, n_rows: int = 1) -> int:
    """Rows to unembed per chunk: ``CHUNK_ROWS``, fewer when the chunk's float32 buffers
    (about 3 × rows × vocab × 4 B: logits, exponentials, the final row's copy, the matmul's
    output) would pass ``LENS_MEMORY`` or a quarter of the device's free memory; never fewer than
    ``n_rows`` (one position of every layer).

    >>> chunk_rows(49_152, "cpu") <= 1024, chunk_rows(256_000, "cpu") <= 262
    (True, True)
    """
    per_row = 3 * vocab * 4
    return max(n_rows, min(CHUNK_ROWS, memory_budget(device, LENS_MEMORY) // per_row))


def reduce_rows(
    session: ModelSession, stream: torch.Tensor, top_k: int, target_id: int, dtype: torch.dtype
) -> dict[str, np.ndarray]:
    """Unembed every (row, position) of a [R, T, d] stream in chunks and reduce on the device.

    A chunk holds every row of a few positions (row-major, as the model lays out its own final
    logits), so the final row's distribution is at hand for the KL. Per chunk, with s = logits − max:
    entropy = lse − Σe·s / Σe and KL(final ‖ row) = Σ p_f·(s_f − s_row) − lse_f + lse_row,
    where e = exp(s) and lse = log Σe. Working on s (never on log-probabilities, which reach
    −160 and lose float32 digits) keeps these ~100× closer to float64 than log_softmax does,
    and two reused vocabulary-sized buffers do all the work in place.
    """
    n_rows, n_pos, d = stream.shape
    vocab = session.unembed_weight().shape[0]
    device = session.unembedding.device
    per_chunk = max(1, chunk_rows(vocab, device, n_rows) // n_rows)  # positions per chunk
    with torch.no_grad():
        normed = session.final_norm(stream).to(device)  # [R, T, d]
        z_buf = normed.new_empty((min(per_chunk, n_pos) * n_rows, vocab), dtype=torch.float32)
        e_buf = torch.empty_like(z_buf)
        keys = ("top_ids", "top_probs", "entropy", "kl_to_final", "target_probs", "target_ranks")
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
        for start in range(0, n_pos, per_chunk):
            x = normed[:, start:start + per_chunk].reshape(-1, d)  # [(R·p), d]
            n, p = x.shape[0], x.shape[0] // n_rows
            z, e = session.logits(x, normed=True, dtype=dtype, out=z_buf[:n]), e_buf[:n]
            top_z, top_ids = torch.topk(z, top_k, dim=-1)
            t_z = z[:, target_id].clone()
            torch.gt(z, t_z[:, None], out=e)       # a float compare into the spare buffer:
            rank = e.sum(-1).long() + 1            # summing a bool tensor is several times slower
            m = top_z[:, :1]
            z.sub_(m)                              # s = z − max ≤ 0
            torch.exp(z, out=e)
            sum_e = e.sum(-1)
            lse = sum_e.log()
            e_final = e.view(n_rows, p, -1)[-1].clone()   # the final row's exp, per position
            # Elementwise products then a cascade sum: bmm's dot products lose ~2e-5 here.
            entropy = lse - e.mul_(z).sum(-1) / sum_e
            cross = z.view(n_rows, p, -1).mul_(e_final).sum(-1) / sum_e.view(n_rows, p)[-1]
            kl = lse.view(n_rows, p) - cross - entropy.view(n_rows, p)[-1]
            for key, value in (("top_ids", top_ids.view(n_rows, p, top_k)),
                               ("top_probs", (top_z - m - lse[:, None]).exp().view(n_rows, p, top_k)),
                               ("entropy", entropy.view(n_rows, p)), ("kl_to_final", kl.clamp_min(0)),
                               ("target_probs", (t_z - m[:, 0] - lse).exp().view(n_rows, p)),
                               ("target_ranks", rank.view(n_rows, p))):
                parts[key].append(value.cpu())
    out = {k: torch.cat(v, dim=1).numpy() for k, v in parts.items()}  # [R, T, ...]
    return {
        "top_ids": out["top_ids"].astype(np.int64),
        "top_probs": out["top_probs"].astype(np.float32),
        "entropy": out["entropy"].astype(np.float32),
        "kl_to_final": out["kl_to_final"].astype(np.float32),
        "target_probs": out["target_probs"].astype(np.float32),
        "target_ranks": out["target_ranks"].astype(np.int64),
    }


def _result(session, request, ids, stream, target_id, dtype) -> LensResult:
    reduced = reduce_rows(session, stream, request.top_k, target_id, dtype)
    return LensResult(
        request=request,
        model=session.name,
        tokens=session.decode_each(ids.numpy()),
        token_ids=ids.numpy().astype(np.int64),
        layer_labels=layer_labels(session.n_layers),
        top_tokens=session.decode_each(reduced["top_ids"]),
        target=str(session.decode_each([target_id])[0]),
        target_id=target_id,
        **reduced,
    )


def _check_top_k(session: ModelSession, top_k: int) -> None:
    from explorer.core.errors import ExplorerError

    if not 1 <= top_k <= min(100, session.unembed_weight().shape[0]):
        raise ExplorerError(f"top-k must be between 1 and 100, got {top_k}")


def logit_lens(session: ModelSession, request: LensRequest | str | None = None, /, *,
               ctx: JobContext | None = None, **fields: Any) -> LensResult:
    """The logit lens of one prompt: every layer's top tokens, entropy, KL to the final layer and
    the target's probability and rank (cached: repeating a request answers without the model).

    >>> from explorer import logit_lens
    >>> lens = logit_lens(session, "The capital of France is", top_k=3)
    >>> lens.layer_labels[:2], lens.top_tokens.shape       # embeddings + 30 layers, 5 tokens, top 3
    (('embed', 'L0'), (31, 5, 3))
    >>> lens.target, str(lens.top_tokens[-1, -1, 0])       # the model's own answer
    (' Paris', ' Paris')
    """
    request = build_request(LensRequest, request, fields)

    def compute() -> LensResult:
        _check_top_k(session, request.top_k)
        ids = session.encode(request.prompt)
        target_id = None if request.target is None else session.token_id(request.target)
        dtype = _unembed_dtype(session, request.unembed_dtype)
        (stream,) = residual_streams(session, [ids])
        if target_id is None:
            target_id = final_top1(session, stream, dtype)
        return _result(session, request, ids, stream, target_id, dtype)

    return session.cached(("lens", request), compute)


def compare_prompts(session: ModelSession, request: CompareRequest | str | None = None, /, *,
                    ctx: JobContext | None = None, **fields: Any) -> LensComparison:
    """The lens of two prompts from one trace, for one target (default: prompt A's final top-1),
    and where their target curves diverge (cached).

    >>> from explorer import compare_prompts
    >>> comp = compare_prompts(session, "The capital of France is",
    ...                        prompt_b="Rome is in Italy. The capital of France is", target=" Paris")
    >>> len(comp.curves()[0]) == len(comp.layer_labels) == 31
    True
    """
    request = build_request(CompareRequest, request, fields)

    def compute() -> LensComparison:
        _check_top_k(session, request.top_k)
        ids_a, ids_b = session.encode(request.prompt_a), session.encode(request.prompt_b)
        target_id = None if request.target is None else session.token_id(request.target)
        dtype = _unembed_dtype(session, request.unembed_dtype)
        stream_a, stream_b = residual_streams(session, [ids_a, ids_b])
        if target_id is None:
            target_id = final_top1(session, stream_a, dtype)
        target = str(session.decode_each([target_id])[0])
        make = lambda prompt, ids, stream: _result(  # noqa: E731
            session,
            LensRequest(prompt, target, request.top_k, request.unembed_dtype),
            ids, stream, target_id, dtype,
        )
        return LensComparison(request=request, a=make(request.prompt_a, ids_a, stream_a),
                              b=make(request.prompt_b, ids_b, stream_b))

    return session.cached(("compare", request), compute)
