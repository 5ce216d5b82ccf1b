"""Attention heads: patterns, head scores (previous-token, induction, duplicate, sink, entropy)
and direct logit attribution (DLA) as an exact decomposition of the final logit.

Everything a request needs comes from one nnsight trace: the prompt is one invoke and, for the
head scores, a sequence of random tokens repeated twice is a second invoke of the same trace
(its induction and duplicate-token scores do not depend on the prompt, so they are cached per
(seq_len, seed) and later prompts run alone).
Attention weights exist only under the eager attention implementation, so a trace that reads
them switches the model to eager for its duration (under ``session.lock``) and restores the
model's own implementation afterwards. Scores are reduced on the model's device over all layers
and heads at once; only [L, H] arrays (and the prompt's patterns) reach the CPU.

DLA: the residual stream at the last position entering the final norm is a sum of parts (the
embeddings, each head's slice of the attention output projection, each projection's bias, each
MLP's output). With the final norm's scale frozen at its clean value the norm is linear, so each
part's contribution to the target's logit is ``part · u`` with ``u = gain * W_U[target] / scale``
(RMSNorm), or the same with each part centred first (LayerNorm; centring a part before the dot
product equals dotting it with a centred ``u``). The norm's own bias and the unembedding's bias
are parts of their own; together the parts add up to the model's logit.
Families with post-norms (Gemma 2/3, OLMo-2) norm each attention and MLP output before adding
it: the MLP part is then the post-norm's output, and with each attention post-norm's scale also
frozen at its clean value a layer's heads are read through ``u_l = gain_l * u / scale_l``, so
they still add up to the layer's normed attention output. Gemma's norms scale by
``1 + weight``. Gemma 2 soft-caps its final logits: the parts add up to the logit *before* the
cap (the unembedding's own output), the quantity that is linear in the residual stream.
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import nnsight
import numpy as np
import torch

from explorer.core.errors import ExplorerError, UnsupportedModelError
from explorer.core.jobs import JobContext
from explorer.core.modules import is_conv1d, linear_weight, submodule
from explorer.core.placement import materialized
from explorer.core.requests import build_request
from explorer.core.results import Result, array
from explorer.core.session import ModelSession


class HeadsError(ExplorerError):
    """Bad input to a heads analysis (a head that does not exist, a bad sequence length, ...)."""


# Score name -> role label given to a head whose score passes the threshold.
ROLE_OF_SCORE: dict[str, str] = {
    "previous_token": "previous-token",
    "induction": "induction",
    "duplicate_token": "duplicate",
    "bos": "sink",
}
SCORE_NAMES: tuple[str, ...] = ("previous_token", "induction", "duplicate_token", "bos", "entropy", "dla")

# The prompt's patterns are also cached as an AttentionResult (so opening one head after the
# scores needs no model run) while they are at most this many elements (64 MB of float32).
_CACHE_PATTERNS_MAX = 16 * 1024 * 1024


# ----------------------------------------------------------------------------- requests/results
@dataclass(frozen=True)
class AttentionRequest:
    prompt: str


@dataclass(frozen=True)
class HeadPatternRequest:
    """One head (``layer``, ``head``, counted from 0) on a prompt."""

    prompt: str
    layer: int = 0
    head: int = 0


@dataclass(frozen=True, eq=False)
class HeadPattern(Result):
    """One head's attention pattern on a prompt: ``pattern[query, key]``."""

    model: str
    prompt: str
    layer: int
    head: int
    tokens: np.ndarray = array("T", "str")
    pattern: np.ndarray = array("T T", "float32")  # [query, key], rows sum to 1


@dataclass(frozen=True, eq=False)
class AttentionResult(Result):
    """Every head's attention pattern on one prompt (the eager implementation's weights)."""

    request: AttentionRequest
    model: str
    tokens: np.ndarray = array("T", "str")        # each token decoded on its own
    token_ids: np.ndarray = array("T", "int64")
    patterns: np.ndarray = array("L H T T", "float32")  # [layer, head, query, key]

    @property
    def n_layers(self) -> int:
        return self.patterns.shape[0]

    @property
    def n_heads(self) -> int:
        return self.patterns.shape[1]

    def head(self, layer: int, head: int) -> HeadPattern:
        check_head(layer, head, self.n_layers, self.n_heads)
        return HeadPattern(model=self.model, prompt=self.request.prompt, layer=layer, head=head,
                           tokens=self.tokens, pattern=self.patterns[layer, head])


@dataclass(frozen=True)
class DLARequest:
    """``target`` None means: the model's top-1 token at the last position."""

    prompt: str
    target: str | None = None


@dataclass(frozen=True, eq=False)
class DLAResult(Result):
    """The target's final logit at the last position, split into additive parts.

    ``embed + heads.sum() + attn_bias.sum() + mlp.sum() + final_norm_bias + unembed_bias``
    equals ``logit`` (the model's own) up to float rounding; ``unexplained`` is the difference.
    """

    request: DLARequest
    model: str
    tokens: np.ndarray = array("T", "str")
    token_ids: np.ndarray = array("T", "int64")
    target: str
    target_id: int
    logit: float             # the model's actual logit of the target at the last position (before
                             # any final soft-cap: the unembedding's own output)
    embed: float             # the embeddings (token, plus position where the model adds one)
    heads: np.ndarray = array("L H", "float64")   # each head through its slice of the output projection
    attn_bias: np.ndarray = array("L", "float64")  # each attention output projection's bias (0 if none)
    mlp: np.ndarray = array("L", "float64")        # each MLP's output (post-normed where the family norms it)
    final_norm_bias: float   # the final LayerNorm's bias (0 for RMSNorm)
    unembed_bias: float      # the unembedding's bias for the target (0 if none)
    norm_kind: str           # "rmsnorm" or "layernorm"
    norm_scale: float        # the final norm's frozen scale: RMS (rmsnorm) or std (layernorm)

    @property
    def total(self) -> float:
        return float(self.embed + self.heads.sum() + self.attn_bias.sum() + self.mlp.sum()
                     + self.final_norm_bias + self.unembed_bias)

    @property
    def unexplained(self) -> float:
        """The model's logit minus the sum of the parts (float rounding only)."""
        return self.logit - self.total

    def parts(self) -> list[tuple[str, float]]:
        """Every part as (label, value), in residual-stream order: 'embed', 'L0H3', 'L0 attn bias', 'L0 mlp', ..."""
        out = [("embed", float(self.embed))]
        n_layers, n_heads = self.heads.shape
        for layer in range(n_layers):
            out += [(f"L{layer}H{h}", float(self.heads[layer, h])) for h in range(n_heads)]
            out.append((f"L{layer} attn bias", float(self.attn_bias[layer])))
            out.append((f"L{layer} mlp", float(self.mlp[layer])))
        out += [("final norm bias", float(self.final_norm_bias)), ("unembed bias", float(self.unembed_bias))]
        return out



@dataclass(frozen=True)
class HeadsRequest:
    """Head scores on a prompt; induction and duplicate-token scores use ``seq_len`` random
    tokens (drawn with ``seed``) repeated twice, prefixed by BOS where the tokenizer has one."""

    prompt: str
    target: str | None = None
    seq_len: int = 24
    seed: int = 0


@dataclass(frozen=True, eq=False)
class HeadScores(Result):
    """Per-head scores, each [L, H]. Prompt-based: previous_token, bos, entropy (query rows 1..T-1:
    row 0 can only attend to itself), dla. Repeated-random-token based: induction, duplicate_token."""

    request: HeadsRequest
    model: str
    tokens: np.ndarray = array("T", "str")          # the prompt's tokens
    token_ids: np.ndarray = array("T", "int64")
    random_ids: np.ndarray = array("N", "int64")    # the repeated random sequence (BOS?, r_1..r_n, r_1..r_n)
    previous_token: np.ndarray = array("L H", "float32")   # mean attention from position i to i-1
    induction: np.ndarray = array("L H", "float32")        # mean attention to the token after the earlier copy
    duplicate_token: np.ndarray = array("L H", "float32")  # mean attention to the earlier copy of the same token
    bos: np.ndarray = array("L H", "float32")        # mean attention to position 0 (the sink)
    entropy: np.ndarray = array("L H", "float32")    # mean attention-row entropy in nats
    dla: np.ndarray = array("L H", "float64")        # direct logit attribution to the target
    attribution: DLAResult                           # the full decomposition the dla scores come from

    @property
    def target(self) -> str:
        return self.attribution.target

    @property
    def target_id(self) -> int:
        return self.attribution.target_id

    @property
    def n_layers(self) -> int:
        return self.previous_token.shape[0]

    @property
    def n_heads(self) -> int:
        return self.previous_token.shape[1]

    def scores(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in SCORE_NAMES}

    def relations(self) -> str | None:
        if self.attribution.heads.shape != self.dla.shape:
            return f"the attribution has {self.attribution.heads.shape} heads, the scores {self.dla.shape}"
        return None

    def roles(self, threshold: float | dict[str, float] = 0.5) -> dict[tuple[int, int], tuple[str, ...]]:
        """Role labels of every head with a score at or above the threshold.

        ``threshold`` is one value for all roles or a dict by role label ("previous-token",
        "induction", "duplicate", "sink") or score name; roles missing from the dict are not given.
        Returns {(layer, head): ("induction", ...)} for the heads with at least one role.
        """
        out: dict[tuple[int, int], list[str]] = {}
        for score, role in ROLE_OF_SCORE.items():
            if isinstance(threshold, dict):
                limit = threshold.get(role, threshold.get(score))
                if limit is None:
                    continue
            else:
                limit = threshold
            for layer, head in zip(*np.nonzero(getattr(self, score) >= limit)):
                out.setdefault((int(layer), int(head)), []).append(role)
        return {k: tuple(v) for k, v in sorted(out.items())}

    def top(self, name: str, k: int = 5, *, largest: bool = True) -> list[tuple[int, int, float]]:
        """The ``k`` heads with the largest (or smallest) score: [(layer, head, value)]."""
        values = self.scores()[name]
        flat = values.ravel()
        order = np.argsort(-flat if largest else flat, kind="stable")[:k]
        return [(int(i // values.shape[1]), int(i % values.shape[1]), float(flat[i])) for i in order]


# ----------------------------------------------------------------------------- scoring (pure)
def previous_token_scores(patterns: torch.Tensor) -> torch.Tensor:
    """[..., T, T] -> [...]: mean over queries i >= 1 of the attention to key i-1."""
    return torch.diagonal(patterns, offset=-1, dim1=-2, dim2=-1).mean(-1)


def bos_scores(patterns: torch.Tensor) -> torch.Tensor:
    """[..., T, T] -> [...]: mean over queries i >= 1 of the attention to position 0."""
    return patterns[..., 1:, 0].mean(-1)


def entropy_scores(patterns: torch.Tensor) -> torch.Tensor:
    """[..., T, T] -> [...]: mean over queries i >= 1 of the row entropy (nats, 0·log 0 = 0)."""
    rows = patterns[..., 1:, :]
    return -torch.special.xlogy(rows, rows).sum(-1).mean(-1)


def induction_scores(patterns: torch.Tensor, n: int) -> torch.Tensor:
    """[..., N, N] -> [...] on a sequence ending in two copies of n tokens (anything before them,
    e.g. BOS, is ignored): mean over second-copy queries q of the attention to key q - n + 1,
    the token right after the query token's first occurrence."""
    return torch.diagonal(patterns, offset=-(n - 1), dim1=-2, dim2=-1)[..., -n:].mean(-1)


def duplicate_token_scores(patterns: torch.Tensor, n: int) -> torch.Tensor:
    """[..., N, N] -> [...]: mean over second-copy queries q of the attention to key q - n,
    the earlier copy of the same token."""
    return torch.diagonal(patterns, offset=-n, dim1=-2, dim2=-1)[..., -n:].mean(-1)


# ----------------------------------------------------------------------------- helpers
def check_head(layer: int, head: int, n_layers: int, n_heads: int) -> None:
    if not 0 <= layer < n_layers:
        raise HeadsError(f"layer {layer} does not exist: the model has layers 0-{n_layers - 1}")
    if not 0 <= head < n_heads:
        raise HeadsError(f"head {head} does not exist: each layer has heads 0-{n_heads - 1}")


def parse_head(text: str) -> tuple[int, int]:
    """'3.5', 'L3H5' or '3:5' -> (3, 5); anything else is a HeadsError."""
    match = re.fullmatch(r"\s*[Ll]?(\d+)\s*(?:[.:]|[Hh]|\.[Hh])\s*(\d+)\s*", text or "")
    if not match:
        raise HeadsError(f"bad head {text!r}: write LAYER.HEAD, e.g. 3.5 (or L3H5)")
    return int(match.group(1)), int(match.group(2))


@contextmanager
def eager_attention(model) -> Iterator[None]:
    """Run the model with the eager attention implementation (which returns the weights), then
    restore its own. transformers 5 reads ``config._attn_implementation`` at every forward, for
    the masks and the attention function alike. Hold ``session.lock`` around this."""
    previous = model.config._attn_implementation
    if previous == "eager":
        yield
        return
    model.set_attn_implementation("eager")
    try:
        if model.config._attn_implementation != "eager":
            raise UnsupportedModelError(
                f"{type(model).__name__} cannot switch to eager attention, so its attention "
                "weights cannot be read; load it with attn_implementation='eager'"
            )
        yield
    finally:
        model.set_attn_implementation(previous)


def _n_heads(session: ModelSession) -> int:
    return int(session.hf.config.num_attention_heads)


def norm_params(norm: torch.nn.Module, gain_offset: float = 0.0):
    """(kind, gain, bias, eps) of a norm: torch LayerNorm, or an RMSNorm that scales by
    ``gain_offset + weight`` (Llama-style 0, Gemma 1: see the adapter's ``norm_gain_offset``)."""
    if isinstance(norm, torch.nn.LayerNorm):
        return "layernorm", norm.weight, norm.bias, float(norm.eps)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if "RMSNorm" in type(norm).__name__ and eps is not None and getattr(norm, "weight", None) is not None:
        gain = norm.weight if not gain_offset else norm.weight.float() + gain_offset
        return "rmsnorm", gain, None, float(eps)
    raise UnsupportedModelError(
        f"direct logit attribution does not know the norm {type(norm).__name__}: "
        "supported are torch LayerNorm and Llama- or Gemma-style RMSNorm"
    )


def _at_least_float32(w: torch.Tensor) -> torch.Tensor:
    return w if w.dtype in (torch.float32, torch.float64) else w.float()


def _final_norm_params(session: ModelSession):
    """(kind, gain, bias, eps) of the final norm."""
    return norm_params(session.unembedding.final_norm, session.adapter.norm_gain_offset)


def random_repeated_ids(session: ModelSession, n: int, seed: int) -> torch.Tensor:
    """[BOS?] + n distinct random ordinary token ids + the same n again (reproducible by seed)."""
    tok = session.tokenizer
    vocab = min(len(tok), session.unembed_weight().shape[0])
    special = set(tok.all_special_ids) | set(getattr(tok, "added_tokens_decoder", {}) or {})
    keep = np.ones(vocab, dtype=bool)
    keep[[i for i in special if 0 <= i < vocab]] = False
    ordinary = torch.from_numpy(np.flatnonzero(keep))
    bos = tok.bos_token_id
    total = 2 * n + (bos is not None)
    if n < 1:
        raise HeadsError(f"the random sequence length must be at least 1, got {n}")
    if n > len(ordinary):
        raise HeadsError(f"the random sequence length {n} exceeds the {len(ordinary)} ordinary tokens")
    if total > session.context_length:
        raise HeadsError(f"a random sequence of {n} tokens repeated twice is {total} tokens, more than "
                         f"the model's context of {session.context_length}: use a smaller sequence length")
    gen = torch.Generator().manual_seed(int(seed))
    draw = ordinary[torch.randperm(len(ordinary), generator=gen)[:n]]
    parts = ([torch.tensor([bos])] if bos is not None else []) + [draw, draw]
    return torch.cat(parts)


# ----------------------------------------------------------------------------- the trace
@dataclass
class _Captured:
    patterns: list[torch.Tensor]          # per invoke asked for patterns: [L, H, t, t] on device
    resid: torch.Tensor | None = None     # [d] entering block 0, last position
    z: torch.Tensor | None = None         # [L, H*dh] attention output projection inputs, last position
    attn: torch.Tensor | None = None      # [L, d] attention outputs before their post-norm (if any)
    mlp: torch.Tensor | None = None       # [L, d] MLP residual contributions, last position
    final: torch.Tensor | None = None     # [d] entering the final norm, last position
    logits: torch.Tensor | None = None    # [V] the model's logits, last position


def _run(session: ModelSession, prompt_ids: torch.Tensor, *, prompt_patterns: bool, dla: bool,
         extra: tuple[torch.Tensor, ...] = ()) -> _Captured:
    """One trace: the prompt (patterns and/or DLA activations) and each ``extra`` sequence
    (patterns only) as invokes. Modules are visited in execution order within each invoke."""
    adapter = session.adapter
    blocks = session.blocks()
    n_layers = len(blocks)
    want_patterns = prompt_patterns or bool(extra)
    seqs = [prompt_ids] + list(extra)
    pats: list[list] = [[] for _ in seqs]
    acts: dict[str, list] = {"resid": [], "z": [], "attn": [], "mlp": [], "final": [], "logits": []}
    inputs = [ids[None].to(session.device) for ids in seqs]
    # Envoys picked here: the block below must not name ``session`` (a remote trace ships it).
    resid_in = session.module(adapter.resid_in)
    final_norm = session.module(adapter.final_norm)
    unembed = session.module(adapter.unembed)
    with torch.no_grad(), session.lock:
        # A remote trace sends the attention implementation along (nnsight's request env).
        ctx = eager_attention(session.traced_model) if want_patterns else nullcontext()
        with ctx:
            with session.trace(logits_to_keep=1) as tracer:
                for i, x in enumerate(inputs):
                    with tracer.invoke(x):
                        nnsight.save(pats)  # a remote run returns only what was marked saved
                        nnsight.save(acts)
                        first = i == 0
                        if first and dla:
                            acts["resid"].append(resid_in.output[0, -1].save())
                        for layer in range(n_layers):
                            block = blocks[layer]
                            if first and dla:
                                acts["z"].append(submodule(block, adapter.attn_out).input[0, -1].save())
                            if (first and prompt_patterns) or not first:
                                pats[i].append(submodule(block, adapter.attn).output[1].save())
                            if first and dla and adapter.attn_post_norm:
                                post = submodule(block, adapter.attn_post_norm)
                                acts["attn"].append(post.input[0, -1].save())
                            if first and dla:
                                # What the MLP adds to the residual stream: its post-norm's output
                                # where the family has one.
                                site = adapter.mlp_post_norm or adapter.mlp
                                out = submodule(block, site).output
                                out = out[0] if isinstance(out, tuple) else out
                                acts["mlp"].append(out[0, -1].save())
                        if first and dla:
                            acts["final"].append(final_norm.input[0, -1].save())
                            acts["logits"].append(unembed.output[0, -1].save())
    captured = _Captured(patterns=[])
    out = session.unembedding.device  # one device for what a sharded model's layers left
    for ids, rows in zip(seqs, pats):
        if rows:
            if any(w is None for w in rows):  # e.g. a server whose model cannot run eager attention
                raise UnsupportedModelError("the model returned no attention weights (its attention "
                                            "implementation is not eager), so patterns cannot be read")
            t = ids.numel()
            # [L, H, t, t]: drop the left padding of a shorter invoke; float32 for bf16 models.
            captured.patterns.append(torch.stack([w[0, :, -t:, -t:].to(out) for w in rows]).float())
    if dla:
        captured.resid = acts["resid"][0].to(out)
        captured.z = torch.stack([z.to(out) for z in acts["z"]])
        captured.attn = torch.stack([a.to(out) for a in acts["attn"]]) if acts["attn"] else None
        captured.mlp = torch.stack([m.to(out) for m in acts["mlp"]])
        captured.final = acts["final"][0].to(out)
        captured.logits = acts["logits"][0].to(out)
    return captured


def _attribution(session: ModelSession, request: DLARequest, ids: torch.Tensor, cap: _Captured,
                 target_id: int | None) -> DLAResult:
    """Split the target's final logit into parts (see the module docstring), on the device."""
    logits = cap.logits.float()
    if target_id is None:
        target_id = int(logits.argmax())
    # float64 where the device has it, so the parts add up to rounding of the model's own run.
    ct = torch.float32 if cap.final.device.type == "mps" else torch.float64
    dev = cap.final.device
    with session.lock, materialized(session.unembedding.final_norm):  # loaded if offloaded
        kind, gain, norm_bias, eps = _final_norm_params(session)
        gain = gain.to(dev, ct)
        norm_bias = None if norm_bias is None else norm_bias.to(dev, ct)
    final = cap.final.to(ct)
    w_row, b_row = session.unembedding.rows(target_id)     # the linear readout of the target
    w_u = w_row.to(dev, ct)
    b_row = None if b_row is None else b_row.to(dev)
    u = gain * w_u
    if kind == "rmsnorm":
        scale = torch.sqrt(final.pow(2).mean() + eps)
    else:
        scale = torch.sqrt(final.var(unbiased=False) + eps)
        u = u - u.mean()  # centring each part = dotting it with the centred direction
    u = u / scale

    blocks = session.hf_blocks()
    n_heads = _n_heads(session)
    z = cap.z.to(ct)                                          # [L, H*dh]
    n_layers, width = z.shape
    # Per layer, the direction its attention output is read along: u, or through the layer's
    # attention post-norm with its scale frozen (u_l = gain_l * u / scale_l).
    u_layers = u.expand(n_layers, -1)
    if session.adapter.attn_post_norm:
        rows = []
        with session.lock:
            for layer, b in enumerate(blocks):
                post = b.get_submodule(session.adapter.attn_post_norm)
                with materialized(post):
                    _, g, _, e = norm_params(post, session.adapter.norm_gain_offset)
                    g = g.to(dev, ct)
                o = cap.attn[layer].to(ct)
                rows.append(g * u / torch.sqrt(o.pow(2).mean() + e))
        u_layers = torch.stack(rows)
    # Each head's vector through W_O^T u_l: per layer one [d, H*dh] matvec (weights stay in place,
    # on their layer's device; an offloaded layer's are loaded for its matvec only). bfloat16/float16
    # weights are read in float32 (one layer's W_O at a time): a half-precision matvec would round
    # every head's part to ~3 digits.
    back, attn_bias = [], []
    remote_back = _remote_back(session, u_layers) if session.remote else None
    with session.lock:
        for layer, b in enumerate(blocks):
            proj = b.get_submodule(session.adapter.attn_out)
            with materialized(proj):
                if remote_back is None:
                    w = _at_least_float32(linear_weight(proj))
                    back.append((u_layers[layer].to(w.device, w.dtype) @ w).to(dev, ct))
                else:
                    back.append(remote_back[layer].to(dev, ct))
                bias = proj.bias
                attn_bias.append(bias.to(dev, ct) @ u_layers[layer] if bias is not None
                                 else torch.zeros((), dtype=ct, device=dev))
    back_t = torch.stack(back)                                # [L, H*dh]
    heads = (z * back_t).view(n_layers, n_heads, width // n_heads).sum(-1)
    attn_bias_t = torch.stack(attn_bias)
    mlp = cap.mlp.to(ct) @ u
    embed = cap.resid.to(ct) @ u
    nb = (norm_bias @ w_u) if norm_bias is not None else torch.zeros((), dtype=ct)
    unembed_bias = b_row.to(ct) if b_row is not None else torch.zeros((), dtype=ct)
    return DLAResult(
        request=request,
        model=session.name,
        tokens=session.decode_each(ids.numpy()),
        token_ids=ids.numpy().astype(np.int64),
        target=str(session.decode_each([target_id])[0]),
        target_id=int(target_id),
        logit=float(logits[target_id]),
        embed=float(embed),
        heads=heads.cpu().numpy().astype(np.float64),
        attn_bias=attn_bias_t.cpu().numpy().astype(np.float64),
        mlp=mlp.cpu().numpy().astype(np.float64),
        final_norm_bias=float(nb),
        unembed_bias=float(unembed_bias),
        norm_kind=kind,
        norm_scale=float(scale),
    )


def _remote_back(session: ModelSession, u_layers: torch.Tensor) -> list[torch.Tensor]:
    """``u_l @ W_O`` per layer computed where a remote model's weights are (one trace): the
    same matvecs as the local path, in the same precision, returning [H*dh] per layer."""
    conv = is_conv1d(session.hf_blocks()[0].get_submodule(session.adapter.attn_out))
    projs = [submodule(blk, session.adapter.attn_out) for blk in session.blocks()]
    us = list(u_layers.cpu())
    ids = session.encode(session.tokenizer.bos_token or "a")[:1][None]
    found: list = []
    with torch.no_grad(), session.lock:
        with session.trace(ids, logits_to_keep=1):
            nnsight.save(found)
            for proj, u in zip(projs, us):
                w = proj.weight.t() if conv else proj.weight
                w = w if w.dtype in (torch.float32, torch.float64) else w.float()
                found.append((u.to(w.device, w.dtype) @ w).save())
    return [v.detach() for v in found]


def _attention_result(session: ModelSession, request: AttentionRequest, ids: torch.Tensor,
                      patterns: torch.Tensor) -> AttentionResult:
    return AttentionResult(request=request, model=session.name, tokens=session.decode_each(ids.numpy()),
                           token_ids=ids.numpy().astype(np.int64), patterns=patterns.cpu().numpy())


# ----------------------------------------------------------------------------- public API
def attention_patterns(session: ModelSession, request: AttentionRequest | str | None = None, /, *,
                       ctx: JobContext | None = None, **fields: Any) -> AttentionResult:
    """Every head's attention pattern [L, H, query, key] on a prompt (cached).

    >>> from explorer import attention_patterns
    >>> attention_patterns(session, "one two one two").patterns.shape   # 30 layers × 9 heads × 4 × 4
    (30, 9, 4, 4)
    """
    request = build_request(AttentionRequest, request, fields)

    def compute() -> AttentionResult:
        ids = session.encode(request.prompt)
        cap = _run(session, ids, prompt_patterns=True, dla=False)
        return _attention_result(session, request, ids, cap.patterns[0])

    return session.cached(("attention", request), compute)


def head_pattern(session: ModelSession, request: HeadPatternRequest | str | None = None, /, *,
                 ctx: JobContext | None = None, **fields: Any) -> HeadPattern:
    """One head's attention pattern on a prompt (from the cached ``attention_patterns``; an
    ``AttentionResult`` already at hand gives it with ``.head(layer, head)``).

    >>> from explorer import head_pattern
    >>> p = head_pattern(session, "one two one two", layer=3, head=1)
    >>> p.pattern.shape, p.pattern.sum(axis=1).round(3).tolist()     # each query's row sums to 1
    ((4, 4), [1.0, 1.0, 1.0, 1.0])
    """
    request = build_request(HeadPatternRequest, request, fields)
    check_head(request.layer, request.head, session.n_layers, _n_heads(session))
    return attention_patterns(session, request.prompt).head(request.layer, request.head)


def direct_logit_attribution(session: ModelSession, request: DLARequest | str | None = None, /, *,
                             ctx: JobContext | None = None, **fields: Any) -> DLAResult:
    """The target's final logit at the last position as an exact sum of parts (cached).

    >>> from explorer import direct_logit_attribution
    >>> dla = direct_logit_attribution(session, "The capital of France is", target=" Paris")
    >>> dla.heads.shape, abs(dla.unexplained) < 1e-3   # [layer, head]; the parts add up to the logit
    ((30, 9), True)
    """
    request = build_request(DLARequest, request, fields)

    def compute() -> DLAResult:
        ids = session.encode(request.prompt)
        target_id = None if request.target is None else session.token_id(request.target)
        cap = _run(session, ids, prompt_patterns=False, dla=True)
        return _attribution(session, request, ids, cap, target_id)

    return session.cached(("dla", request), compute)


def head_scores(session: ModelSession, request: HeadsRequest | str | None = None, /, *,
                ctx: JobContext | None = None, **fields: Any) -> HeadScores:
    """All head scores and the DLA (cached; also fills the attention and DLA caches).

    The induction and duplicate-token scores depend only on (seq_len, seed), not on the prompt,
    so they are cached on their own: the first request runs the prompt and the repeated random
    tokens as two invokes of one trace, later prompts run the prompt alone.

    >>> from explorer import head_scores
    >>> scores = head_scores(session, "The capital of France is", seq_len=8)
    >>> scores.induction.shape, scores.target
    ((30, 9), ' Paris')
    """
    request = build_request(HeadsRequest, request, fields)

    def compute() -> HeadScores:
        ids = session.encode(request.prompt)
        if ids.numel() < 2:
            raise HeadsError("head scores need a prompt of at least 2 tokens")
        target_id = None if request.target is None else session.token_id(request.target)
        n = request.seq_len
        random_key = ("heads-random", n, request.seed)
        random = session.peek(random_key)
        if random is None:
            rep = random_repeated_ids(session, n, request.seed)
            cap = _run(session, ids, prompt_patterns=True, dla=True, extra=(rep,))
            prompt_pat, rep_pat = cap.patterns
            with torch.no_grad():
                random = {
                    "random_ids": rep.numpy().astype(np.int64),
                    "induction": induction_scores(rep_pat, n).cpu().numpy().astype(np.float32),
                    "duplicate_token": duplicate_token_scores(rep_pat, n).cpu().numpy().astype(np.float32),
                }
            random = session.put(random_key, random)
        else:
            cap = _run(session, ids, prompt_patterns=True, dla=True)
            (prompt_pat,) = cap.patterns
        with torch.no_grad():
            scores = {
                "previous_token": previous_token_scores(prompt_pat),
                "bos": bos_scores(prompt_pat),
                "entropy": entropy_scores(prompt_pat),
            }
            scores = {k: v.cpu().numpy().astype(np.float32) for k, v in scores.items()}
            dla_request = DLARequest(request.prompt, request.target)
            attribution = _attribution(session, dla_request, ids, cap, target_id)
        session.cached(("dla", dla_request), lambda: attribution)
        if prompt_pat.numel() <= _CACHE_PATTERNS_MAX:
            att_request = AttentionRequest(request.prompt)
            session.cached(("attention", att_request),
                           lambda: _attention_result(session, att_request, ids, prompt_pat))
        return HeadScores(
            request=request,
            model=session.name,
            tokens=attribution.tokens,
            token_ids=attribution.token_ids,
            random_ids=random["random_ids"].copy(),
            induction=random["induction"].copy(),
            duplicate_token=random["duplicate_token"].copy(),
            dla=attribution.heads.copy(),
            attribution=attribution,
            **scores,
        )

    return session.cached(("heads", request), compute)
