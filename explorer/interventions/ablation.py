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

Every ablation is an ``Edit`` (``explorer.interventions.edits``, shared with patching and
steering). ``ablate`` runs the clean and the edited prompt as two invokes of one nnsight trace
(``nnsight_runs``). The exact sweep reuses the clean run (``run_clean``, ``replay``): an
ablation at layer L cannot change blocks below L, so only blocks L.. are replayed, one batch
row per ablation, and only the last position is unembedded. ``method="sequential"`` is the
plain reference (one nnsight trace per ablation); ``method="attribution"`` is attribution
patching (one forward and one backward pass: effect ≈ (replacement − activation) · ∂metric/∂activation).
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import nnsight
import numpy as np
import torch

from explorer.analyses.lens import LensRequest, LensResult, layer_labels, reduce_rows
from explorer.core.components import Component, Geometry, components_for, geometry, split_specs
from explorer.core.errors import EmptyPromptError
from explorer.core.jobs import JobContext, cached_unless_cancelled
from explorer.core.modules import submodule
from explorer.core.requests import build_request
from explorer.core.results import Result, array, sized
from explorer.core.session import ModelSession
from explorer.interventions.edits import (
    SITE_ORDER,
    CleanRun,
    Edit,
    EditError,
    component_edit,
    edit_batches,
    first,
    hooked,
    last_logits,
    measure_batches,
    metric,
    nnsight_runs,
    resolve_tokens,
    run_clean,
    site_path,
    target_fields,
)

MODES = ("zero", "mean", "resample")
SWEEP_KINDS = ("heads", "blocks", "neurons", "features")
METHODS = ("exact", "sequential", "attribution")
MEAN_TOKENS = 2048     # tokens of text the mean activations are taken over
MEAN_SEQ = 128         # tokens per row when computing means
MEAN_BATCH = 8         # rows per forward when computing means

AblationError = EditError  # bad ablation, sweep or patching input


# =============================================================================== requests
def _norm_specs(specs: str | Sequence[str]) -> tuple[str, ...]:
    return tuple(split_specs(specs))


@dataclass(frozen=True)
class AblationRequest:
    """Ablate ``components`` (specs such as '3.1', '5:1024', 'mlp:2'; a comma-separated string
    is accepted) while predicting ``target`` after ``prompt``. With ``sae`` (an SAE folder in the
    SAELens layout) specs ``sae:F`` ablate feature F and ``sae:F=V`` clamp it to V, the SAE's error
    term kept (``explorer.features.edits``; whatever the mode)."""

    prompt: str
    target: str
    components: tuple[str, ...]
    mode: str = "zero"
    second_prompt: str | None = None   # resample: the prompt the replacement activations come from
    compare_token: str | None = None   # report target − compare logit difference too
    mean_text: str | None = None       # mean: the text to average over (None = default corpus)
    lens: bool = True                  # also compute the logit lens of both runs
    top_k: int = 10                    # lens top-k
    sae: str | None = None             # an SAE folder, for 'sae:F' / 'sae:F=V' specs

    def __post_init__(self) -> None:
        object.__setattr__(self, "components", _norm_specs(self.components))


def is_feature_spec(spec: str) -> bool:
    """'sae:123' or 'sae:123=5': an SAE feature, not a model component."""
    return spec.lower().startswith("sae:")


def _feature_edits(session: ModelSession, request: AblationRequest) -> tuple[list[Edit], tuple[str, ...]]:
    """The edit of the request's ``sae:`` specs and their canonical spellings (none: ([], ()))."""
    feats = [s for s in request.components if is_feature_spec(s)]
    if not feats:
        return [], ()
    if not request.sae:
        raise AblationError(f"{feats[0]} is an SAE feature: give the SAE folder (cfg.json + sae_weights.safetensors)")
    from explorer.features.edits import feature_edits, parse_features, sae_for

    specs = parse_features(feats)
    names = tuple(f"sae:{f}" if v == 0 else f"sae:{f}={v:g}" for f, v in specs)
    return feature_edits(sae_for(session, request.sae), feats), names


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
    tokens: np.ndarray = array("T", "str")
    token_ids: np.ndarray = array("T", "int64")
    target: str
    target_id: int
    compare: str | None
    compare_id: int | None
    baseline: TargetStats
    ablated: TargetStats
    lens_baseline: LensResult | None = None
    lens_ablated: LensResult | None = None

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
    """Ablate every head (``kind="heads"``), every block's attention and MLP (``"blocks"``),
    the ``top_n`` most active neurons (``"neurons"``) or the ``top_n`` most active features of
    the SAE in folder ``sae`` (``"features"``, error term kept: ``explorer.features.sweeps``),
    one at a time."""

    prompt: str
    target: str
    kind: str = "heads"
    mode: str = "zero"
    top_n: int = 50
    method: str = "exact"
    second_prompt: str | None = None
    compare_token: str | None = None
    mean_text: str | None = None
    sae: str | None = None             # an SAE folder, for kind="features"


@dataclass(frozen=True, eq=False)
class SweepResult(Result):
    """Effect of each single ablation on the metric (ablated − baseline). NaN = not finished.

    ``effects`` is [layer, head] for heads, [layer, 2] (attention, MLP) for blocks and [N] for
    neurons (most active first); ``components`` lists the specs in ``effects``' flat order.
    """

    request: SweepRequest
    model: str
    tokens: np.ndarray = array("T", "str")
    token_ids: np.ndarray = array("T", "int64")
    target: str
    target_id: int
    compare: str | None
    compare_id: int | None
    components: tuple[str, ...] = sized("C")
    effects: np.ndarray = array("*", "float32")  # [L, H], [L, 2] or [C] (see above); NaN where not computed
    baseline_logit: float
    baseline_prob: float
    baseline_metric: float
    activations: np.ndarray | None = array("C", "float32", default=None)  # neurons: signed peak on the prompt
    done: int = 0
    total: int = 0

    @property
    def complete(self) -> bool:
        return self.done == self.total

    def relations(self) -> str | None:
        if self.effects.size != len(self.components):
            return f"effects has {self.effects.size} values for {len(self.components)} components"
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


def _encode_second(session: ModelSession, ids: torch.Tensor, second: str | None, what: str) -> torch.Tensor:
    if second is None or not second.strip():
        raise AblationError(f"{what} needs a second prompt with the same number of tokens as the prompt")
    ids2 = session.encode(second)
    if ids2.numel() != ids.numel():
        raise AblationError(
            f"{what} needs prompts of equal token length (position i replaces position i): the prompt "
            f"is {ids.numel()} tokens, the second prompt {ids2.numel()}; add or remove words to match")
    return ids2


def _stats(logits: torch.Tensor, tid: int, cid: int | None) -> TargetStats:
    logits = logits.float()
    logp = torch.log_softmax(logits, -1)
    return TargetStats(
        logit=float(logits[tid]),
        prob=float(logp[tid].exp()),
        rank=int((logits > logits[tid]).sum()) + 1,
        logit_diff=None if cid is None else float(logits[tid] - logits[cid]),
    )


def _sites_for(comps: Iterable[Component]) -> set[str]:
    return {c.kind for c in comps}




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
        paths = {site: site_path(session, site) for site in sites}
        order = sorted(sites, key=lambda s: SITE_ORDER[s])  # visit in execution order
        totals: dict[str, list[torch.Tensor]] = {}
        for batch in rows.split(MEAN_BATCH):
            saved: dict[str, list] = {s: [] for s in order}
            with torch.no_grad(), session.lock:
                x = batch.to(session.device)
                with session.trace(x, logits_to_keep=1):  # no ``session`` in here: see session.trace
                    nnsight.save(saved)
                    for blk in blocks:
                        inp = blk.input if "block" in order else None
                        for site in order:
                            if site == "block":
                                out = first(blk.output)
                                value = out - inp.to(out.device)
                            elif site in ("head", "neuron"):
                                value = submodule(blk, paths[site]).input
                            else:
                                value = first(submodule(blk, paths[site]).output)
                            saved[site].append(value.float().sum(dim=(0, 1)).save())
            for site in order:
                sums = [v.detach() for v in saved[site]]
                totals[site] = sums if site not in totals else [a + b for a, b in zip(totals[site], sums)]
        dev = session.device  # one device for a sharded model's layers
        return {s: (torch.stack([t.to(dev) for t in totals[s]]) / rows.numel()).to(session.dtype) for s in sites}

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


def ablate(session: ModelSession, request: AblationRequest | str | None = None, /, *,
           ctx: JobContext | None = None, **fields: Any) -> AblationResult:
    """Baseline and ablated target stats (and logit lens) of one prompt; cached per request.

    >>> from explorer import ablate
    >>> result = ablate(session, "The capital of France is", target=" Paris", components="mlp:0")
    >>> result.components, result.baseline.rank, result.effect < 0   # the first MLP matters here
    (('mlp:0',), 1, True)
    """
    request = build_request(AblationRequest, request, fields)

    def compute() -> AblationResult:
        _check_mode(request.mode)
        if request.lens and not 1 <= request.top_k <= 100:
            raise AblationError(f"top-k must be between 1 and 100, got {request.top_k}")
        geom = geometry(session)
        specs = [s for s in request.components if not is_feature_spec(s)]
        comps = components_for(session, specs) if specs or len(specs) == len(request.components) else ()
        feature_edits, feature_names = _feature_edits(session, request)
        ids = session.encode(request.prompt)
        tid, cid = resolve_tokens(session, request.target, request.compare_token)
        source = replacement_source(session, ids, _sites_for(comps), request.mode, request.second_prompt,
                                    request.mean_text, "resample ablation") if comps else None
        edits = [component_edit(c, geom, request.mode, source) for c in comps] + feature_edits
        base, abl = nnsight_runs(session, ids, [[], edits], streams=request.lens)
        lens_b = lens_a = None
        if request.lens:
            lens_b = _lens_result(session, request, ids, base["stream"], tid)
            lens_a = _lens_result(session, request, ids, abl["stream"], tid)
        return AblationResult(
            request=request,
            model=session.name,
            components=tuple(c.spec for c in comps) + feature_names,
            tokens=session.decode_each(ids.numpy()),
            token_ids=ids.numpy().astype(np.int64),
            **target_fields(session, tid, cid),
            baseline=_stats(base["logits"], tid, cid),
            ablated=_stats(abl["logits"], tid, cid),
            lens_baseline=lens_b,
            lens_ablated=lens_a,
        )

    return session.cached(("ablate", request), compute)


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
    if request.method == "attribution":
        session.require_local("the attribution sweep (a backward pass through the model)")
    if request.kind == "neurons" and not 1 <= request.top_n <= geom.n_layers * geom.d_mlp:
        raise AblationError(f"top-n must be between 1 and {geom.n_layers * geom.d_mlp}, got {request.top_n}")


def sweep(session: ModelSession, request: SweepRequest | str | None = None, /, *,
          ctx: JobContext | None = None, **fields: Any) -> SweepResult:
    """Ablate components one at a time; returns the effect of each on the metric.

    ``ctx`` (a ``JobContext`` or anything with ``report`` and ``cancelled``) gets
    ``report(done, total, partial=SweepResult)`` after every batch; when ``ctx.cancelled``
    turns true the sweep stops and returns what finished (NaN elsewhere). Complete results
    are cached per request.

    >>> from explorer import sweep
    >>> result = sweep(session, "The capital of France is", target=" Paris", kind="blocks")
    >>> result.effects.shape, result.complete          # [layer, (attention, MLP)]
    ((30, 2), True)
    """
    request = build_request(SweepRequest, request, fields)
    if request.kind == "features":
        from explorer.features.sweeps import feature_sweep

        run = lambda: feature_sweep(session, request, ctx)  # noqa: E731
    else:
        run = lambda: _sweep(session, request, ctx)  # noqa: E731
    return cached_unless_cancelled(session, ("sweep", request), run, ctx)


def _sweep(session: ModelSession, request: SweepRequest, ctx) -> SweepResult:
    geom = geometry(session)
    _check_sweep(session, request, geom)
    ids = session.encode(request.prompt)
    tid, cid = resolve_tokens(session, request.target, request.compare_token)
    site_of = {"heads": "head", "blocks": None, "neurons": "neuron"}[request.kind]
    sites = {"attn", "mlp"} if site_of is None else {site_of}
    run = run_clean(session, ids, sites)
    comps, shape, peaks = _sweep_components(session, request, geom, run)
    sites = _sites_for(comps)
    source = replacement_source(session, ids, sites, request.mode, request.second_prompt,
                                request.mean_text, "resample ablation")
    base_stats = _stats(run.logits, tid, cid)
    base_metric = float(metric(run.logits, tid, cid))
    effects = np.full(shape, np.nan, dtype=np.float32)
    flat = effects.reshape(-1)
    total = len(comps)

    def make(done_now: int) -> SweepResult:
        return SweepResult(
            request=request, model=session.name, tokens=session.decode_each(ids.numpy()),
            token_ids=ids.numpy().astype(np.int64), **target_fields(session, tid, cid),
            components=tuple(c.spec for c in comps), effects=effects.copy(),
            baseline_logit=base_stats.logit, baseline_prob=base_stats.prob, baseline_metric=base_metric,
            activations=peaks, done=done_now, total=total)

    planned = [component_edit(c, geom, request.mode, source) for c in comps]
    if request.method == "attribution":
        flat[:] = attribution_effects(session, ids, comps, planned, tid, cid)
        return make(total)
    return sweep_edits(session, run, planned, request.method, tid, cid, base_metric, flat, ctx=ctx, make=make,
                       message=lambda i: f"layer {comps[i].layer}")


def sweep_edits(session: ModelSession, run: CleanRun, planned: Sequence[Edit], method: str, tid: int,
                cid: int | None, base_metric: float, effects: np.ndarray, *, ctx,
                make: Callable[[int], SweepResult], message: Callable[[int], str]) -> SweepResult:
    """Apply each planned edit alone to ``run``'s prompt and write metric − ``base_metric`` into
    ``effects[i]`` (a flat view); ``method`` "exact" replays batches of them, "sequential" runs
    one nnsight trace each. ``make(done)`` builds the (partial) result: see ``measure_batches``."""
    def store(idx: list[int], values: torch.Tensor) -> None:
        effects[idx] = (values - base_metric).cpu().numpy()

    batches = edit_batches(session, [(e.layer, i) for i, e in enumerate(planned)], run.n_tokens,
                           one_each=method == "sequential")
    return measure_batches(session, run, batches, lambda i: [planned[i]], store, tid, cid, make=make,
                           message=message, ctx=ctx, plain=method == "sequential")


# ========================================================================= attribution
def attribution_effects(session: ModelSession, ids: torch.Tensor, comps: Sequence[Component],
                        edits: Sequence[Edit], tid: int, cid: int | None) -> np.ndarray:
    """Attribution patching: effect ≈ Σ (replacement − activation) · ∂metric/∂activation per
    component, from one forward and one backward pass. Returns [len(comps)] float32."""
    L = session.n_layers
    sites = sorted(_sites_for(comps))
    acts: dict[tuple[str, int], torch.Tensor] = {}
    with session.lock, torch.enable_grad(), hooked() as handles:
        def leaf(mod, args, out):  # make the graph start at the embeddings
            return out.detach().requires_grad_(True)
        handles.append(session.hf.get_submodule(session.adapter.resid_in).register_forward_hook(leaf))
        for l in range(L):
            block = session.hf_blocks()[l]
            for site in sites:
                mod = block.get_submodule(site_path(session, site))
                if site in ("head", "neuron"):
                    def cap_in(m, args, l=l, site=site):
                        acts[site, l] = args[0]
                    handles.append(mod.register_forward_pre_hook(cap_in))
                else:
                    def cap_out(m, args, out, l=l, site=site):
                        acts[site, l] = first(out)
                    handles.append(mod.register_forward_hook(cap_out))
        logits = last_logits(session, ids)
        keys = sorted(acts)
        grads = dict(zip(keys, torch.autograd.grad(metric(logits, tid, cid), [acts[k] for k in keys])))
    out = np.empty(len(comps), dtype=np.float32)
    with torch.no_grad():
        for i, (c, e) in enumerate(zip(comps, edits)):
            act = acts[c.kind, c.layer][0].detach().float()
            grad = grads[c.kind, c.layer][0].float()
            a, g = act[e.index], grad[e.index]
            repl = torch.zeros_like(a) if e.value is None else e.value.to(a.device).float().expand_as(a)
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
