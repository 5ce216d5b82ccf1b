"""Logit lens: every layer's residual stream read through the final norm and the unembedding.

All rows (the embeddings, then each block's output) come from one nnsight trace; a comparison
runs both prompts as two invokes of that one trace. The unembedding is done after the trace,
all rows stacked and chunked, with top-k, entropy, KL and the target's probability and rank
reduced on the model's device so only small arrays reach the CPU.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from .results import Result
from .session import DTYPES, ModelSession

# Rows unembedded per matmul: big enough to run near the matmul peak, small enough to cap
# memory (1024 rows × 49k vocab × 4 B ≈ 200 MB per temporary).
CHUNK_ROWS = 1024


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
    tokens: np.ndarray          # [T] str, each prompt token decoded on its own
    token_ids: np.ndarray       # [T] int64
    layer_labels: tuple[str, ...]  # [R] "embed", "L0", ...
    top_ids: np.ndarray         # [R, T, k] int64
    top_tokens: np.ndarray      # [R, T, k] str
    top_probs: np.ndarray       # [R, T, k] float32
    entropy: np.ndarray         # [R, T] float32, nats
    kl_to_final: np.ndarray     # [R, T] float32, KL(final ‖ row) in nats
    target: str                 # the target token as text
    target_id: int
    target_probs: np.ndarray    # [R, T] float32
    target_ranks: np.ndarray    # [R, T] int64, 1 = top token

    _dtypes: ClassVar[dict[str, str]] = {
        "tokens": "str", "token_ids": "int64", "top_ids": "int64", "top_tokens": "str",
        "top_probs": "float32", "entropy": "float32", "kl_to_final": "float32",
        "target_probs": "float32", "target_ranks": "int64",
    }

    @property
    def n_rows(self) -> int:
        return len(self.layer_labels)

    def validate(self) -> str | None:
        """Name the first inconsistency between the arrays' shapes, or None."""
        rows, pos = self.n_rows, len(self.tokens)
        k = self.top_ids.shape[-1] if self.top_ids.ndim == 3 else -1
        expected = {"token_ids": (pos,), "top_ids": (rows, pos, k), "top_tokens": (rows, pos, k),
                    "top_probs": (rows, pos, k), "entropy": (rows, pos), "kl_to_final": (rows, pos),
                    "target_probs": (rows, pos), "target_ranks": (rows, pos)}
        for name, shape in expected.items():
            if getattr(self, name).shape != shape:
                return f"{name} has shape {getattr(self, name).shape}, expected {shape}"
        return None

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

    def validate(self) -> str | None:
        if self.a.n_rows != self.b.n_rows:
            return "the two prompts' lenses have different numbers of rows"
        return self.a.validate() or self.b.validate()

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
    with torch.no_grad(), session.lock:
        # logits_to_keep=1: the model's own full-vocabulary logits are not needed here.
        with session.lm.trace(logits_to_keep=1) as tracer:
            for i, ids in enumerate(prompts):
                with tracer.invoke(ids[None].to(session.device)):
                    saved[i].append(resid_in.output.save())
                    for block in blocks:
                        out = block.output
                        saved[i].append((out[0] if isinstance(out, tuple) else out).save())
    streams = []
    for ids, rows in zip(prompts, saved):
        t = ids.numel()
        streams.append(torch.stack([r[0, -t:] for r in rows]))  # drop left padding
    return streams


def _unembed(session: ModelSession, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    weight = session.unembed_weight(dtype)
    bias = session.unembed_bias()
    logits = F.linear(x.to(weight.dtype), weight, None if bias is None else bias.to(weight.dtype))
    return logits.float()


def _unembed_dtype(session: ModelSession, name: str) -> torch.dtype:
    return session.dtype if name == "auto" else DTYPES[name]


def _final_top1(session: ModelSession, stream: torch.Tensor, dtype: torch.dtype) -> int:
    with torch.no_grad():
        last = session.final_norm(stream[-1, -1:])
        return int(_unembed(session, last, dtype).argmax(-1)[0])


def reduce_rows(
    session: ModelSession, stream: torch.Tensor, top_k: int, target_id: int, dtype: torch.dtype
) -> dict[str, np.ndarray]:
    """Unembed every (row, position) of a [R, T, d] stream in chunks and reduce on the device."""
    n_rows, n_pos, d = stream.shape
    per_chunk = max(1, CHUNK_ROWS // n_rows)  # positions per chunk; every row of a position together
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in
                                            ("top_ids", "top_probs", "entropy", "kl", "tprob", "trank")}
    with torch.no_grad():
        normed = session.final_norm(stream)
        for start in range(0, n_pos, per_chunk):
            x = normed[:, start:start + per_chunk]
            p = x.shape[1]
            logp = torch.log_softmax(_unembed(session, x.reshape(-1, d), dtype), dim=-1).view(n_rows, p, -1)
            top_lp, top_ids = torch.topk(logp, top_k, dim=-1)
            t_lp = logp[..., target_id].clone()  # a view otherwise: logp is reused in place below
            rank = (logp > t_lp[..., None]).sum(-1) + 1
            # Entropy and KL(final ‖ row) as elementwise products summed (einsum's bmm path
            # loses ~1e-4 here), in place to keep one vocabulary-sized temporary per chunk.
            final_lp = logp[-1].clone()
            probs = logp.exp()
            final_p = probs[-1].clone()
            entropy = -probs.mul_(logp).sum(-1)
            del probs
            kl = logp.neg_().add_(final_lp).mul_(final_p).sum(-1)
            del logp, final_lp, final_p
            for key, value in (("top_ids", top_ids), ("top_probs", top_lp.exp()), ("entropy", entropy),
                               ("kl", kl.clamp_min(0)), ("tprob", t_lp.exp()), ("trank", rank)):
                parts[key].append(value.cpu())
    out = {k: torch.cat(v, dim=1).numpy() for k, v in parts.items()}
    return {
        "top_ids": out["top_ids"].astype(np.int64),
        "top_probs": out["top_probs"].astype(np.float32),
        "entropy": out["entropy"].astype(np.float32),
        "kl_to_final": out["kl"].astype(np.float32),
        "target_probs": out["tprob"].astype(np.float32),
        "target_ranks": out["trank"].astype(np.int64),
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
    from .errors import ExplorerError

    if not 1 <= top_k <= min(100, session.unembed_weight().shape[0]):
        raise ExplorerError(f"top-k must be between 1 and 100, got {top_k}")


def logit_lens(session: ModelSession, request: LensRequest | str, **kwargs) -> LensResult:
    """The logit lens of one prompt (cached: repeating a request answers without the model)."""
    if isinstance(request, str):
        request = LensRequest(prompt=request, **kwargs)

    def compute() -> LensResult:
        _check_top_k(session, request.top_k)
        ids = session.encode(request.prompt)
        target_id = None if request.target is None else session.token_id(request.target)
        dtype = _unembed_dtype(session, request.unembed_dtype)
        (stream,) = residual_streams(session, [ids])
        if target_id is None:
            target_id = _final_top1(session, stream, dtype)
        return _result(session, request, ids, stream, target_id, dtype)

    return session.cached(("lens", request), compute)


def compare_prompts(session: ModelSession, request: CompareRequest) -> LensComparison:
    """The lens of two prompts from one trace, for one target (default: prompt A's final top-1)."""

    def compute() -> LensComparison:
        _check_top_k(session, request.top_k)
        ids_a, ids_b = session.encode(request.prompt_a), session.encode(request.prompt_b)
        target_id = None if request.target is None else session.token_id(request.target)
        dtype = _unembed_dtype(session, request.unembed_dtype)
        stream_a, stream_b = residual_streams(session, [ids_a, ids_b])
        if target_id is None:
            target_id = _final_top1(session, stream_a, dtype)
        target = str(session.decode_each([target_id])[0])
        make = lambda prompt, ids, stream: _result(  # noqa: E731
            session,
            LensRequest(prompt, target, request.top_k, request.unembed_dtype),
            ids, stream, target_id, dtype,
        )
        return LensComparison(request=request, a=make(request.prompt_a, ids_a, stream_a),
                              b=make(request.prompt_b, ids_b, stream_b))

    return session.cached(("compare", request), compute)
