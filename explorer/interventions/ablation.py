"""Ablation: knock out heads, neurons, attention/MLP outputs or whole blocks and measure the effect.

Components and where they act are described in ``explorer.core.components``. Three modes give the
replacement value:

- ``zero``: the activation is set to 0 (a block: its output is set to its input);
- ``mean``: the component's mean activation over a text (the default corpus, or
  ``mean_text``), position-independent, from at most ``MEAN_TOKENS`` tokens, computed once per
  (model, text, site) and cached in the session. For a block the mean is its mean contribution
  (output − input), added to the block's actual input;
- ``resample``: the activation the component has on ``second_prompt`` at the same position.
  Alignment rule: the two prompts must have the same number of tokens (position i replaces
  position i); anything else is refused with an error.

``ablate`` runs one nnsight trace with two invokes (the clean prompt and the ablated one) and
reports the target's logit, probability and rank at the last position, plus the logit lens of
both runs. ``sweep`` ablates every head / every block's attention and MLP / the most active
neurons one at a time and reports the effect on the metric, where the metric is the target's
logit at the last position, or the target's logit minus ``compare_token``'s when given, and the
effect is (ablated metric − baseline metric).

The exact sweep reuses the clean run: an ablation at layer L cannot change blocks below L, so
each block's input and keyword arguments are captured once (forward pre-hooks on the plain HF
blocks), and only blocks L.. are replayed, with one batch row per ablation, starting from
the cached input at batch size 1; the first edit expands it to one row per ablation. Only the
last position goes through the final norm and the unembedding. ``method="sequential"`` is the
plain reference (one nnsight trace per ablation); ``method="attribution"`` is attribution
patching (one forward and one backward pass: effect ≈ (replacement − activation) · ∂metric/∂activation).
"""
from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from explorer.core.components import Component, ComponentError, Geometry, components_for, geometry, split_specs
from explorer.core.errors import EmptyPromptError, ExplorerError
from explorer.analyses.lens import LensRequest, LensResult, layer_labels, reduce_rows
from explorer.core.results import Result
from explorer.core.session import ModelSession

MODES = ("zero", "mean", "resample")
SWEEP_KINDS = ("heads", "blocks", "neurons")
METHODS = ("exact", "sequential", "attribution")
MEAN_TOKENS = 2048     # tokens of text the mean activations are taken over
MEAN_SEQ = 128         # tokens per row when computing means
MEAN_BATCH = 8         # rows per forward when computing means
CHUNK_TOKENS = 4096    # batch rows × prompt tokens per replayed forward, at most
MERGE_TOKENS = 128     # below this many tokens a chunk also takes the next layer's ablations
TRIM_LAST_BLOCK = True  # replay: run the last block's output projection and MLP on the last position only


class AblationError(ExplorerError):
    """Bad ablation, sweep or patching input."""


# =============================================================================== requests
def _norm_specs(specs: str | Sequence[str]) -> tuple[str, ...]:
    return tuple(split_specs(specs))


@dataclass(frozen=True)
class AblationRequest:
    """Ablate ``components`` (specs such as '3.1', '5:1024', 'mlp:2'; a comma-separated string
    is accepted) while predicting ``target`` after ``prompt``."""

    prompt: str
    target: str
    components: tuple[str, ...]
    mode: str = "zero"
    second_prompt: str | None = None   # resample: the prompt the replacement activations come from
    compare_token: str | None = None   # report target − compare logit difference too
    mean_text: str | None = None       # mean: the text to average over (None = default corpus)
    lens: bool = True                  # also compute the logit lens of both runs
    top_k: int = 10                    # lens top-k

    def __post_init__(self) -> None:
        object.__setattr__(self, "components", _norm_specs(self.components))


@dataclass(frozen=True)
class TargetStats:
    """The target token at the last position: raw logit, probability, rank (1 = top)."""

    logit: float
    prob: float
    rank: int
    logit_diff: float | None = None  # target logit − compare_token logit, when one was given


@dataclass(frozen=True, eq=False)
class AblationResult(Result):
    """Baseline and ablated predictions of one prompt, and both runs' logit lens."""

    request: AblationRequest
    model: str
    components: tuple[str, ...]   # canonical specs, execution order
    tokens: np.ndarray            # [T] str
    token_ids: np.ndarray         # [T] int64
    target: str
    target_id: int
    compare: str | None
    compare_id: int | None
    baseline: TargetStats
    ablated: TargetStats
    lens_baseline: LensResult | None = None
    lens_ablated: LensResult | None = None

    _dtypes: ClassVar[dict[str, str]] = {"tokens": "str", "token_ids": "int64"}

    def validate(self) -> str | None:
        """Name the first inconsistency, or None."""
        if len(self.token_ids) != len(self.tokens):
            return "tokens and token_ids differ in length"
        for lens in (self.lens_baseline, self.lens_ablated):
            if lens is not None and (problem := lens.validate()):
                return problem
        return None

    @property
    def effect(self) -> float:
        """Ablated minus baseline target logit."""
        return self.ablated.logit - self.baseline.logit

    @property
    def metric_effect(self) -> float:
        """Effect on the metric: the logit difference when a compare token was given, else the logit."""
        if self.baseline.logit_diff is not None and self.ablated.logit_diff is not None:
            return self.ablated.logit_diff - self.baseline.logit_diff
        return self.effect


@dataclass(frozen=True)
class SweepRequest:
    """Ablate every head (``kind="heads"``), every block's attention and MLP (``"blocks"``) or
    the ``top_n`` most active neurons (``"neurons"``), one at a time."""

    prompt: str
    target: str
    kind: str = "heads"
    mode: str = "zero"
    top_n: int = 50
    method: str = "exact"
    second_prompt: str | None = None
    compare_token: str | None = None
    mean_text: str | None = None


@dataclass(frozen=True, eq=False)
class SweepResult(Result):
    """Effect of each single ablation on the metric (ablated − baseline). NaN = not finished.

    ``effects`` is [layer, head] for heads, [layer, 2] (attention, MLP) for blocks and [N] for
    neurons (most active first); ``components`` lists the specs in ``effects``' flat order.
    """

    request: SweepRequest
    model: str
    tokens: np.ndarray
    token_ids: np.ndarray
    target: str
    target_id: int
    compare: str | None
    compare_id: int | None
    components: tuple[str, ...]
    effects: np.ndarray              # float32, NaN where not (yet) computed
    baseline_logit: float
    baseline_prob: float
    baseline_metric: float
    activations: np.ndarray | None = None  # neurons: the signed peak activation on the prompt [N]
    done: int = 0
    total: int = 0

    _dtypes: ClassVar[dict[str, str]] = {"tokens": "str", "token_ids": "int64", "effects": "float32",
                                         "activations": "float32"}

    @property
    def complete(self) -> bool:
        return self.done == self.total

    def validate(self) -> str | None:
        """Name the first inconsistency between the fields' shapes, or None."""
        if self.effects.size != len(self.components):
            return f"effects has {self.effects.size} values for {len(self.components)} components"
        if len(self.token_ids) != len(self.tokens):
            return "tokens and token_ids differ in length"
        if self.activations is not None and self.activations.shape != (len(self.components),):
            return f"activations has shape {self.activations.shape}, expected ({len(self.components)},)"
        return None

    @property
    def ablated_metric(self) -> np.ndarray:
        return self.baseline_metric + self.effects

    def top(self, n: int = 10) -> list[tuple[str, float]]:
        """The n components with the largest |effect| (finished ones only)."""
        flat = self.effects.reshape(-1)
        order = [i for i in np.argsort(-np.abs(np.nan_to_num(flat, nan=-np.inf))) if not np.isnan(flat[i])]
        return [(self.components[i], float(flat[i])) for i in order[:n]]


# ================================================================================ helpers
def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise AblationError(f"unknown ablation mode {mode!r}: use one of {', '.join(MODES)}")


def _resolve_tokens(session: ModelSession, target: str, compare: str | None) -> tuple[int, int | None]:
    tid = session.token_id(target)
    cid = None if compare in (None, "") else session.token_id(compare)
    if cid is not None and cid == tid:
        raise AblationError("the compare token is the target itself: pick a different token to compare with")
    return tid, cid


def _encode_second(session: ModelSession, ids: torch.Tensor, second: str | None, what: str) -> torch.Tensor:
    if second is None or not second.strip():
        raise AblationError(f"{what} needs a second prompt with the same number of tokens as the prompt")
    ids2 = session.encode(second)
    if ids2.numel() != ids.numel():
        raise AblationError(
            f"{what} needs prompts of equal token length (position i replaces position i): the prompt "
            f"is {ids.numel()} tokens, the second prompt {ids2.numel()}; add or remove words to match")
    return ids2


def _metric(logits: torch.Tensor, tid: int, cid: int | None) -> torch.Tensor:
    """Metric per row of [..., V] logits: target logit, minus the compare token's when given."""
    m = logits[..., tid]
    return m - logits[..., cid] if cid is not None else m


def _stats(logits: torch.Tensor, tid: int, cid: int | None) -> TargetStats:
    logits = logits.float()
    logp = torch.log_softmax(logits, -1)
    return TargetStats(
        logit=float(logits[tid]),
        prob=float(logp[tid].exp()),
        rank=int((logits > logits[tid]).sum()) + 1,
        logit_diff=None if cid is None else float(logits[tid] - logits[cid]),
    )


def _unembed_last(session: ModelSession, h: torch.Tensor) -> torch.Tensor:
    """Final norm + unembedding of [B, d] hidden states -> [B, V] float32 logits."""
    x = session.final_norm(h)
    bias = session.unembed_bias()
    return F.linear(x, session.unembed_weight(), bias).float()


def _block_module(session: ModelSession, layer: int):
    return session.hf_blocks()[layer]


def _site_path(session: ModelSession, site: str) -> str | None:
    """Module path (relative to a block) of a site; None for the block itself."""
    a = session.adapter
    return {"head": a.attn_out, "neuron": a.mlp_out, "attn": a.attn, "mlp": a.mlp}.get(site)


def _first(x):
    return x[0] if isinstance(x, tuple) else x


def _envoy(envoy, path: str):
    for part in path.split("."):
        envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
    return envoy


# ================================================================================== edits
@dataclass(frozen=True, eq=False)
class Edit:
    """One edit of one batch row at one site: ``row[index] = value`` (0 when value is None).

    Sites: ``head`` / ``neuron`` edit the input of the attention / MLP output projection;
    ``attn`` / ``mlp`` the output of the attention / MLP module; ``resid`` the block's output;
    ``block`` the block's output *relative to its input*: ``row[index] = input[index] + value``.
    ``row`` is one prompt's [T, width] activation.
    """

    site: str
    layer: int
    index: tuple
    value: torch.Tensor | None = None


_SITE_ORDER = {"head": 0, "attn": 1, "neuron": 2, "mlp": 3, "block": 4, "resid": 4}


def _assign(row: torch.Tensor, e: Edit, inp_row: torch.Tensor | None) -> None:
    if e.site == "block":
        new = inp_row[e.index]
        if e.value is not None:
            new = new + e.value
        row[e.index] = new
    elif e.value is None:
        row[e.index] = 0
    else:
        row[e.index] = e.value


def _index(c: Component, geom: Geometry) -> tuple:
    if c.kind == "head":
        return (slice(None), slice(c.index * geom.d_head, (c.index + 1) * geom.d_head))
    if c.kind == "neuron":
        return (slice(None), c.index)
    return (Ellipsis,)


def component_edit(c: Component, geom: Geometry, mode: str,
                   source: dict[str, torch.Tensor] | None = None) -> Edit:
    """The edit that ablates ``c``. ``source[site]`` holds the replacement activations: [L, W]
    means for ``mean``, [L, T, W] activations of the second prompt for ``resample``."""
    idx = _index(c, geom)
    if mode == "zero":
        return Edit(c.kind, c.layer, idx)
    values = source[c.kind][c.layer]
    value = values[idx[1:]] if mode == "mean" else values[idx]
    return Edit(c.kind, c.layer, idx, value)


def _sites_for(comps: Iterable[Component]) -> set[str]:
    return {c.kind for c in comps}


# =========================================================================== clean runs
@dataclass
class CleanRun:
    """What one plain forward of a prompt left behind: each block's call (args, kwargs), the
    last-position logits, and the activations at the requested sites ([T, W] per layer)."""

    ids: torch.Tensor
    calls: list[tuple[tuple, dict]]
    logits: torch.Tensor
    acts: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return int(self.ids.numel())

    def stacked(self, site: str) -> torch.Tensor:
        return torch.stack(self.acts[site])


@contextmanager
def _hooked() -> Iterator[list]:
    handles: list = []
    try:
        yield handles
    finally:
        for h in handles:
            h.remove()


def run_clean(session: ModelSession, ids: torch.Tensor, sites: Iterable[str] = ()) -> CleanRun:
    """One plain forward (no nnsight) with hooks that capture each block's call and site activations."""
    sites = set(sites)
    L = session.n_layers
    calls: list = [None] * L
    acts: dict[str, list] = {s: [None] * L for s in sites}
    with torch.no_grad(), session.lock, _hooked() as handles:
        for l in range(L):
            block = _block_module(session, l)

            def pre(mod, args, kwargs, l=l):
                calls[l] = (tuple(args), dict(kwargs))

            handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
            for site in sites:
                if site in ("head", "neuron"):
                    def cap_in(mod, args, l=l, site=site):
                        acts[site][l] = args[0][0].detach().clone()
                    handles.append(block.get_submodule(_site_path(session, site)).register_forward_pre_hook(cap_in))
                elif site in ("attn", "mlp"):
                    def cap_out(mod, args, out, l=l, site=site):
                        acts[site][l] = _first(out)[0].detach().clone()
                    handles.append(block.get_submodule(_site_path(session, site)).register_forward_hook(cap_out))
                elif site in ("block", "resid"):
                    def cap_blk(mod, args, kwargs, out, l=l, site=site):
                        out = _first(out)[0]
                        if site == "block":
                            inp = args[0] if args else kwargs["hidden_states"]
                            out = out - inp[0]
                        acts[site][l] = out.detach().clone()
                    handles.append(block.register_forward_hook(cap_blk, with_kwargs=True))
                else:
                    raise AblationError(f"unknown site {site!r}")
        x = ids[None].to(session.device)
        out = session.hf(input_ids=x, attention_mask=torch.ones_like(x), logits_to_keep=1)
    return CleanRun(ids=ids, calls=calls, logits=out.logits[0, -1].float(), acts=acts)


# ======================================================================= mean activations
def _corpus_text(text: str | None) -> str:
    if text is not None:
        return text
    from explorer.core.defaults import ensure_default_corpus

    return ensure_default_corpus(progress=lambda *_: None).read_text(encoding="utf-8", errors="replace")


def _text_key(text: str | None) -> str:
    return "default-corpus" if text is None else hashlib.sha256(text.encode()).hexdigest()[:16]


def _mean_rows(session: ModelSession, text: str | None, max_tokens: int) -> torch.Tensor:
    raw = _corpus_text(text)
    if not raw.strip():
        raise EmptyPromptError()
    seq = min(MEAN_SEQ, session.context_length)
    ids: list[int] = []
    start, step = 0, max(4096, max_tokens * 8)  # characters per tokenizer call: enough for max_tokens
    while len(ids) < max_tokens and start < len(raw):
        ids += session.tokenizer(raw[start:start + step], add_special_tokens=False).input_ids
        start += step
    ids = ids[:max_tokens]
    if not ids:
        raise EmptyPromptError()
    if len(ids) < seq:
        return torch.tensor([ids])
    n = len(ids) // seq
    return torch.tensor(ids[: n * seq]).view(n, seq)


def mean_activations(session: ModelSession, site: str, text: str | None = None,
                     max_tokens: int = MEAN_TOKENS) -> torch.Tensor:
    """Mean activation per layer at a site over a text (default: the default corpus): [L, W].

    Sites: ``head`` (attention output projection input), ``neuron`` (MLP output projection
    input), ``attn``/``mlp`` (module outputs), ``block`` (block output − input). At most
    ``max_tokens`` tokens, in rows of ``MEAN_SEQ``; every position counts equally. Cached per
    (model, sites, text, max_tokens).
    """
    return mean_activations_many(session, [site], text, max_tokens)[site]


def mean_activations_many(session: ModelSession, sites: Iterable[str], text: str | None = None,
                          max_tokens: int = MEAN_TOKENS) -> dict[str, torch.Tensor]:
    """``mean_activations`` of several sites from one pass over the text."""
    sites = tuple(sorted(set(sites)))
    for site in sites:
        if site not in ("head", "neuron", "attn", "mlp", "block"):
            raise AblationError(f"no mean activations for site {site!r}")

    def compute() -> dict[str, torch.Tensor]:
        rows = _mean_rows(session, text, max_tokens)
        blocks = session.blocks()
        order = sorted(sites, key=lambda s: _SITE_ORDER[s])  # visit in execution order
        totals: dict[str, list[torch.Tensor]] = {}
        for batch in rows.split(MEAN_BATCH):
            saved: dict[str, list] = {s: [] for s in order}
            with torch.no_grad(), session.lock:
                with session.lm.trace(batch.to(session.device), logits_to_keep=1):
                    for blk in blocks:
                        inp = blk.input if "block" in order else None
                        for site in order:
                            if site == "block":
                                value = _first(blk.output) - inp
                            elif site in ("head", "neuron"):
                                value = _envoy(blk, _site_path(session, site)).input
                            else:
                                value = _first(_envoy(blk, _site_path(session, site)).output)
                            saved[site].append(value.float().sum(dim=(0, 1)).save())
            for site in order:
                sums = [v.detach() for v in saved[site]]
                totals[site] = sums if site not in totals else [a + b for a, b in zip(totals[site], sums)]
        return {s: (torch.stack(totals[s]) / rows.numel()).to(session.dtype) for s in sites}

    return session.cached(("ablation-mean", sites, _text_key(text), max_tokens), compute)


def replacement_source(session: ModelSession, ids: torch.Tensor, sites: set[str], mode: str,
                       second_prompt: str | None, mean_text: str | None, what: str
                       ) -> dict[str, torch.Tensor] | None:
    """Replacement activations for the sites: means [L, W] or the second prompt's [L, T, W]."""
    if mode == "zero":
        return None
    if mode == "mean":
        return mean_activations_many(session, sites, mean_text)
    ids2 = _encode_second(session, ids, second_prompt, what)
    run = run_clean(session, ids2, sites)
    return {s: run.stacked(s) for s in sites}


# ======================================================================= nnsight path
def _nn_block(session: ModelSession, blk, edits: list[Edit], want_output: bool):
    """Apply edits to one block inside an nnsight invoke, visiting sites in execution order.

    Returns the block's output tensor (edited) when asked for or edited, else None.
    """
    by_site: dict[str, list[Edit]] = defaultdict(list)
    for e in edits:
        by_site[e.site].append(e)
    inp = blk.input if by_site.get("block") else None
    for site in ("head", "attn", "neuron", "mlp"):
        if not by_site.get(site):
            continue
        mod = _envoy(blk, _site_path(session, site))
        x = mod.input if site in ("head", "neuron") else _first(mod.output)
        for e in by_site[site]:
            _assign(x[0], e, None)
    if not (want_output or by_site.get("block") or by_site.get("resid")):
        return None
    out = _first(blk.output)
    for e in by_site.get("block", []) + by_site.get("resid", []):
        _assign(out[0], e, None if inp is None else inp[0])
    return out


def nnsight_runs(session: ModelSession, ids: torch.Tensor, edit_sets: Sequence[Sequence[Edit]],
                 streams: bool = False) -> list[dict[str, torch.Tensor]]:
    """One nnsight trace, one invoke per edit set (an empty set is the clean run).

    Returns per invoke ``logits`` [V] (float32, last position) and, with ``streams``, the
    residual ``stream`` [1 + L, T, d] (embeddings, then each block's output) for the logit lens.
    """
    L = session.n_layers
    blocks = session.blocks()
    resid_in = session.module(session.adapter.resid_in)
    unembed = session.module(session.adapter.unembed)
    saved: list[dict[str, Any]] = [{"rows": []} for _ in edit_sets]
    x = ids[None].to(session.device)
    with torch.no_grad(), session.lock:
        with session.lm.trace(logits_to_keep=1) as tracer:
            for i, edits in enumerate(edit_sets):
                by_layer: dict[int, list[Edit]] = defaultdict(list)
                for e in edits:
                    by_layer[e.layer].append(e)
                with tracer.invoke(x):
                    if streams:
                        saved[i]["rows"].append(resid_in.output.save())
                    for l in range(L):
                        if not streams and not by_layer.get(l):
                            continue
                        out = _nn_block(session, blocks[l], by_layer.get(l, []), streams)
                        if streams:
                            saved[i]["rows"].append(out.save())
                    saved[i]["logits"] = unembed.output.save()
    results = []
    for s in saved:
        r = {"logits": s["logits"][0, -1].float()}
        if streams:
            r["stream"] = torch.stack([row[0] for row in s["rows"]])
        results.append(r)
    return results


# ============================================================================== ablate
def _lens_result(session: ModelSession, request: AblationRequest, ids: torch.Tensor,
                 stream: torch.Tensor, tid: int) -> LensResult:
    reduced = reduce_rows(session, stream, request.top_k, tid, session.dtype)
    return LensResult(
        request=LensRequest(request.prompt, request.target, request.top_k),
        model=session.name,
        tokens=session.decode_each(ids.numpy()),
        token_ids=ids.numpy().astype(np.int64),
        layer_labels=layer_labels(session.n_layers),
        top_tokens=session.decode_each(reduced["top_ids"]),
        target=str(session.decode_each([tid])[0]),
        target_id=tid,
        **reduced,
    )


def ablate(session: ModelSession, request: AblationRequest) -> AblationResult:
    """Baseline and ablated target stats (and logit lens) of one prompt; cached per request."""

    def compute() -> AblationResult:
        _check_mode(request.mode)
        if request.lens and not 1 <= request.top_k <= 100:
            raise AblationError(f"top-k must be between 1 and 100, got {request.top_k}")
        geom = geometry(session)
        comps = components_for(session, request.components)
        ids = session.encode(request.prompt)
        tid, cid = _resolve_tokens(session, request.target, request.compare_token)
        source = replacement_source(session, ids, _sites_for(comps), request.mode, request.second_prompt,
                                    request.mean_text, "resample ablation")
        edits = [component_edit(c, geom, request.mode, source) for c in comps]
        base, abl = nnsight_runs(session, ids, [[], edits], streams=request.lens)
        lens_b = lens_a = None
        if request.lens:
            lens_b = _lens_result(session, request, ids, base["stream"], tid)
            lens_a = _lens_result(session, request, ids, abl["stream"], tid)
        return AblationResult(
            request=request,
            model=session.name,
            components=tuple(c.spec for c in comps),
            tokens=session.decode_each(ids.numpy()),
            token_ids=ids.numpy().astype(np.int64),
            target=str(session.decode_each([tid])[0]),
            target_id=tid,
            compare=None if cid is None else str(session.decode_each([cid])[0]),
            compare_id=cid,
            baseline=_stats(base["logits"], tid, cid),
            ablated=_stats(abl["logits"], tid, cid),
            lens_baseline=lens_b,
            lens_ablated=lens_a,
        )

    return session.cached(("ablate", request), compute)


# ===================================================================== batched replay
def _fit(value: Any, n: int) -> Any:
    """Give batch-1 tensors (dim ≥ 2) of a block's arguments a batch of n (a view)."""
    if isinstance(value, torch.Tensor):
        if n > 1 and value.dim() >= 2 and value.shape[0] == 1:
            return value.expand(n, *value.shape[1:])
        return value
    if isinstance(value, tuple):
        return tuple(_fit(v, n) for v in value)
    if isinstance(value, list):
        return [_fit(v, n) for v in value]
    return value


def _rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """A writable [n, ...] copy of x (x has batch 1 or n)."""
    if x.shape[0] == n:
        return x.clone()
    return x.expand(n, *x.shape[1:]).clone()


def _apply_rows(x: torch.Tensor, n: int, items: list[tuple[int, Edit]], inp: torch.Tensor | None) -> torch.Tensor:
    x = _rows(x, n)
    for b, e in items:
        _assign(x[b], e, None if inp is None else inp[b if inp.shape[0] == n else 0])
    return x


def replay(session: ModelSession, run: CleanRun, rows: Sequence[Sequence[Edit]]) -> torch.Tensor:
    """Last-position logits [B, V] (float32) of B edited runs, replaying blocks from the first edit.

    Blocks below the earliest edited layer are not run: their output is the clean run's. The
    replay starts from the cached input at batch 1; the first edit expands it to B rows. When
    the last block has no edits, its output projection and MLP run on the last position only.
    Call under ``session.lock``, with gradients off.
    """
    n = len(rows)
    L = session.n_layers
    start = min(e.layer for row in rows for e in row)
    groups: dict[tuple[str, int], list[tuple[int, Edit]]] = defaultdict(list)
    for b, row in enumerate(rows):
        for e in row:
            groups[e.site, e.layer].append((b, e))
    with _hooked() as handles:
        for (site, layer), items in sorted(groups.items(), key=lambda kv: (kv[0][1], _SITE_ORDER[kv[0][0]])):
            block = _block_module(session, layer)
            if site in ("head", "neuron"):
                def pre(mod, args, items=items):
                    return (_apply_rows(args[0], n, items, None),) + tuple(args[1:])
                handles.append(block.get_submodule(_site_path(session, site)).register_forward_pre_hook(pre))
            elif site in ("attn", "mlp"):
                def post(mod, args, out, items=items):
                    if isinstance(out, tuple):
                        return (_apply_rows(out[0], n, items, None),) + tuple(out[1:])
                    return _apply_rows(out, n, items, None)
                handles.append(block.get_submodule(_site_path(session, site)).register_forward_hook(post))
            else:
                def post_blk(mod, args, kwargs, out, items=items):
                    inp = args[0] if args else kwargs["hidden_states"]
                    if isinstance(out, tuple):
                        return (_apply_rows(out[0], n, items, inp),) + tuple(out[1:])
                    return _apply_rows(out, n, items, inp)
                handles.append(block.register_forward_hook(post_blk, with_kwargs=True))
        if TRIM_LAST_BLOCK and run.n_tokens > 1 and all(layer < L - 1 for _, layer in groups):
            # Only the last position of the last block is read: its output projection and MLP are
            # position-wise, so run them on that position alone. The block's residual adds then
            # broadcast, leaving the other positions meaningless but the last one exact.
            last = _block_module(session, L - 1)

            def last_only(mod, args):
                return (args[0][:, -1:],) + tuple(args[1:])

            for path in (session.adapter.attn_out, session.adapter.mlp):
                handles.append(last.get_submodule(path).register_forward_pre_hook(last_only))
        h = None
        for l in range(start, L):
            args, kwargs = run.calls[l]
            if args:
                h = args[0] if h is None else h
                b = h.shape[0]
                out = _block_module(session, l)(h, *_fit(args[1:], b), **_fit(kwargs, b))
            else:  # hidden states passed by keyword
                h = kwargs["hidden_states"] if h is None else h
                b = h.shape[0]
                kw = _fit(kwargs, b)
                kw["hidden_states"] = h
                out = _block_module(session, l)(**kw)
            h = _first(out)
    last = h[:, -1]
    if last.shape[0] != n:
        last = last.expand(n, -1)
    return _unembed_last(session, last)


def chunks(items: Sequence[tuple[int, Any]], n_tokens: int, max_tokens: int | None = None,
           merge_tokens: int | None = None) -> list[list[tuple[int, Any]]]:
    """Group (layer, item) pairs, sorted by layer, into forwards of ≤ max_tokens rows × tokens.

    A chunk holds one layer's items; the next layer's join it while the chunk is under
    ``merge_tokens`` (short prompts: fewer, fuller forwards). Defaults: ``CHUNK_TOKENS``,
    ``MERGE_TOKENS``.
    """
    max_tokens = CHUNK_TOKENS if max_tokens is None else max_tokens
    merge_tokens = MERGE_TOKENS if merge_tokens is None else merge_tokens
    max_rows = max(1, max_tokens // max(1, n_tokens))
    out: list[list] = []
    cur: list = []
    for item in sorted(items, key=lambda it: it[0]):
        if cur and (len(cur) >= max_rows or (item[0] != cur[-1][0] and len(cur) * n_tokens >= merge_tokens)):
            out.append(cur)
            cur = []
        cur.append(item)
    if cur:
        out.append(cur)
    return out


class _Cancelled(Exception):
    """Carries a partial result out of a cached computation (so it is not cached)."""

    def __init__(self, result) -> None:
        super().__init__("cancelled")
        self.result = result


# ================================================================================ sweep
def _sweep_components(session: ModelSession, request: SweepRequest, geom: Geometry,
                      run: CleanRun) -> tuple[list[Component], tuple[int, ...], np.ndarray | None]:
    if request.kind == "heads":
        comps = [Component(l, "head", h) for l in range(geom.n_layers) for h in range(geom.n_heads)]
        return comps, (geom.n_layers, geom.n_heads), None
    if request.kind == "blocks":
        comps = [Component(l, k) for l in range(geom.n_layers) for k in ("attn", "mlp")]
        return comps, (geom.n_layers, 2), None
    acts = run.stacked("neuron").float()            # [L, T, d_mlp]
    peak_pos = acts.abs().argmax(dim=1)             # [L, d_mlp]
    peak = acts.gather(1, peak_pos[:, None]).squeeze(1)  # signed peak [L, d_mlp]
    order = torch.argsort(peak.abs().reshape(-1), descending=True, stable=True)[: request.top_n]
    comps = [Component(int(i) // geom.d_mlp, "neuron", int(i) % geom.d_mlp) for i in order]
    return comps, (len(comps),), peak.reshape(-1)[order].cpu().numpy().astype(np.float32)


def _check_sweep(session: ModelSession, request: SweepRequest, geom: Geometry) -> None:
    if request.kind not in SWEEP_KINDS:
        raise AblationError(f"unknown sweep kind {request.kind!r}: use one of {', '.join(SWEEP_KINDS)}")
    if request.method not in METHODS:
        raise AblationError(f"unknown sweep method {request.method!r}: use one of {', '.join(METHODS)}")
    _check_mode(request.mode)
    if request.kind == "neurons" and not 1 <= request.top_n <= geom.n_layers * geom.d_mlp:
        raise AblationError(f"top-n must be between 1 and {geom.n_layers * geom.d_mlp}, got {request.top_n}")


def sweep(session: ModelSession, request: SweepRequest, ctx=None) -> SweepResult:
    """Ablate components one at a time; returns the effect of each on the metric.

    ``ctx`` (a ``JobContext`` or anything with ``report`` and ``cancelled``) gets
    ``report(done, total, partial=SweepResult)`` after every batch; when ``ctx.cancelled``
    turns true the sweep stops and returns what finished (NaN elsewhere). Complete results
    are cached per request.
    """
    try:
        result = session.cached(("sweep", request), lambda: _sweep(session, request, ctx))
    except _Cancelled as c:
        return c.result
    if ctx is not None:
        ctx.report(result.done, result.total, partial=result, message="done")
    return result


def _sweep(session: ModelSession, request: SweepRequest, ctx) -> SweepResult:
    geom = geometry(session)
    _check_sweep(session, request, geom)
    ids = session.encode(request.prompt)
    tid, cid = _resolve_tokens(session, request.target, request.compare_token)
    site_of = {"heads": "head", "blocks": None, "neurons": "neuron"}[request.kind]
    sites = {"attn", "mlp"} if site_of is None else {site_of}
    run = run_clean(session, ids, sites)
    comps, shape, peaks = _sweep_components(session, request, geom, run)
    sites = _sites_for(comps)
    source = replacement_source(session, ids, sites, request.mode, request.second_prompt,
                                request.mean_text, "resample ablation")
    base_stats = _stats(run.logits, tid, cid)
    base_metric = float(_metric(run.logits, tid, cid))
    effects = np.full(shape, np.nan, dtype=np.float32)
    flat = effects.reshape(-1)
    total = len(comps)
    done = 0

    def make(done_now: int) -> SweepResult:
        return SweepResult(
            request=request, model=session.name, tokens=session.decode_each(ids.numpy()),
            token_ids=ids.numpy().astype(np.int64), target=str(session.decode_each([tid])[0]),
            target_id=tid, compare=None if cid is None else str(session.decode_each([cid])[0]),
            compare_id=cid, components=tuple(c.spec for c in comps), effects=effects.copy(),
            baseline_logit=base_stats.logit, baseline_prob=base_stats.prob, baseline_metric=base_metric,
            activations=peaks, done=done_now, total=total)

    edits = [component_edit(c, geom, request.mode, source) for c in comps]
    if request.method == "attribution":
        flat[:] = attribution_effects(session, ids, comps, edits, tid, cid)
        done = total
    else:
        if request.method == "exact":
            batches = chunks([(c.layer, i) for i, c in enumerate(comps)], ids.numel())
        else:
            batches = [[(c.layer, i)] for i, c in enumerate(comps)]
        for batch in batches:
            if ctx is not None and ctx.cancelled:
                break
            idx = [i for _, i in batch]
            if request.method == "exact":
                with torch.no_grad(), session.lock:
                    logits = replay(session, run, [[edits[i]] for i in idx])
            else:
                logits = nnsight_runs(session, ids, [[edits[idx[0]]]])[0]["logits"][None]
            flat[idx] = (_metric(logits, tid, cid) - base_metric).cpu().numpy()
            done += len(idx)
            if ctx is not None:
                ctx.report(done, total, partial=make(done), message=f"layer {comps[idx[-1]].layer}")
    result = make(done)
    if done < total:
        raise _Cancelled(result)
    return result


# ========================================================================= attribution
def attribution_effects(session: ModelSession, ids: torch.Tensor, comps: Sequence[Component],
                        edits: Sequence[Edit], tid: int, cid: int | None) -> np.ndarray:
    """Attribution patching: effect ≈ Σ (replacement − activation) · ∂metric/∂activation per
    component, from one forward and one backward pass. Returns [len(comps)] float32."""
    L = session.n_layers
    sites = sorted(_sites_for(comps))
    acts: dict[tuple[str, int], torch.Tensor] = {}
    with session.lock, torch.enable_grad(), _hooked() as handles:
        def leaf(mod, args, out):  # make the graph start at the embeddings
            return out.detach().requires_grad_(True)
        handles.append(session.hf.get_submodule(session.adapter.resid_in).register_forward_hook(leaf))
        for l in range(L):
            block = _block_module(session, l)
            for site in sites:
                mod = block.get_submodule(_site_path(session, site))
                if site in ("head", "neuron"):
                    def cap_in(m, args, l=l, site=site):
                        acts[site, l] = args[0]
                    handles.append(mod.register_forward_pre_hook(cap_in))
                else:
                    def cap_out(m, args, out, l=l, site=site):
                        acts[site, l] = _first(out)
                    handles.append(mod.register_forward_hook(cap_out))
        x = ids[None].to(session.device)
        logits = session.hf(input_ids=x, attention_mask=torch.ones_like(x), logits_to_keep=1).logits[0, -1]
        keys = sorted(acts)
        grads = dict(zip(keys, torch.autograd.grad(_metric(logits.float(), tid, cid), [acts[k] for k in keys])))
    out = np.empty(len(comps), dtype=np.float32)
    with torch.no_grad():
        for i, (c, e) in enumerate(zip(comps, edits)):
            act = acts[c.kind, c.layer][0].detach().float()
            grad = grads[c.kind, c.layer][0].float()
            a, g = act[e.index], grad[e.index]
            repl = torch.zeros_like(a) if e.value is None else e.value.float().expand_as(a)
            out[i] = float(((repl - a) * g).sum())
    return out


# ====================================================================== convenience
def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two arrays (NaNs dropped pairwise; ties get average ranks)."""
    a, b = np.asarray(a, float).reshape(-1), np.asarray(b, float).reshape(-1)
    ok = ~(np.isnan(a) | np.isnan(b))
    a, b = a[ok], b[ok]
    if len(a) < 2:
        return math.nan

    def ranks(x: np.ndarray) -> np.ndarray:
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x), dtype=float)
        for v in np.unique(x):  # average ties
            m = x == v
            if m.sum() > 1:
                r[m] = r[m].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return math.nan
    return float(np.corrcoef(ra, rb)[0, 1])
