"""Activation patching (causal tracing): which (layer, position) carries the clean answer?

For every layer and position, the clean prompt's activation at one site is written into the
corrupted prompt's run at the same place, and the metric at the last position is read:

    metric   = logit(target) − logit(compare_token)    (or logit(target) alone without one)
    restored = (metric_patched − metric_corrupt) / (metric_clean − metric_corrupt)

so 0 means the patch changed nothing and 1 means it fully restored the clean metric.

Sites: ``resid`` = the residual stream after block L (the block's output), ``attn`` / ``mlp``
= the output of block L's attention / MLP module; ``features`` = SAE features (``sae``), one row
per feature instead of per layer (``explorer.features.sweeps.feature_patch``). Both prompts must have the same number of
tokens (position i is patched from position i).

The corrupted run is computed once; each layer's patches (one batch row per position) replay
only blocks L.. from its cached input, as the ablation sweep does (see ``explorer.interventions.edits``).
``patched_metric`` is the plain nnsight path (one trace, one forward per patch set) used to
check it.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from explorer.analyses.lens import layer_labels
from explorer.core.jobs import JobContext, cached_unless_cancelled
from explorer.core.requests import build_request
from explorer.core.results import Result, array, sized
from explorer.core.session import ModelSession
from explorer.interventions.edits import (
    CleanRun,
    Edit,
    EditError,
    edit_batches,
    measure_batches,
    metric,
    nnsight_runs,
    resolve_tokens,
    run_clean,
    target_fields,
)

SITES = ("resid", "attn", "mlp")   # and "features" (routed to explorer.features.sweeps)


@dataclass(frozen=True)
class PatchRequest:
    clean: str
    corrupt: str
    target: str
    site: str = "resid"
    compare_token: str | None = None
    sae: str | None = None      # site "features": the SAE folder,
    features: str = ""          # the features patched ("123, 456"; "" = the top_n that differ most)
    top_n: int = 20


@dataclass(frozen=True, eq=False)
class PatchResult(Result):
    """``restored`` [L, T]: fraction of the clean-vs-corrupt metric gap restored by patching
    (layer, position); ``patched`` [L, T] the raw metric. NaN = not (yet) computed."""

    request: PatchRequest
    model: str
    clean_tokens: np.ndarray = array("T", "str")
    corrupt_tokens: np.ndarray = array("T", "str")
    target: str
    target_id: int
    compare: str | None
    compare_id: int | None
    site: str
    layer_labels: tuple[str, ...] = sized("L")  # "L0", ...
    clean_metric: float
    corrupt_metric: float
    patched: np.ndarray = array("L T", "float32")
    restored: np.ndarray = array("L T", "float32")
    done: int = 0
    total: int = 0

    @property
    def complete(self) -> bool:
        return self.done == self.total


def encode_pair(session: ModelSession, request: PatchRequest) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean and corrupted prompts' token ids, which must be of equal length."""
    clean_ids, corrupt_ids = session.encode(request.clean), session.encode(request.corrupt)
    if clean_ids.numel() != corrupt_ids.numel():
        raise EditError(
            f"patching needs clean and corrupted prompts of equal token length: the clean prompt is "
            f"{clean_ids.numel()} tokens, the corrupted one {corrupt_ids.numel()}; "
            "change words so both tokenise to the same length")
    return clean_ids, corrupt_ids


def check_gap(clean_metric: float, corrupt_metric: float) -> None:
    """Refuse prompts whose metrics are equal: no fraction of their gap can be restored."""
    if abs(clean_metric - corrupt_metric) < 1e-6 * max(1.0, abs(clean_metric)):
        raise EditError(
            f"the clean and corrupted prompts give the same metric ({clean_metric:.4g}): there is "
            "nothing to restore; pick prompts whose predictions differ")


def patch_cells(session: ModelSession, corrupt: CleanRun, cells: Sequence[tuple[int, tuple[int, int]]],
                edits_for: Callable[[tuple[int, int]], list[Edit]], tid: int, cid: int | None,
                patched: np.ndarray, *, ctx, make: Callable[[int], PatchResult],
                message: Callable[[tuple[int, int]], str]) -> PatchResult:
    """Run each cell's patch (``(layer, (row, position))``, edits from ``edits_for((row, position))``)
    on the corrupted run, batched, and write its metric into ``patched[row, position]``.
    ``make(done)`` builds the (partial) result: see ``measure_batches``."""
    def store(keys: list[tuple[int, int]], values: torch.Tensor) -> None:
        for (r, p), v in zip(keys, values.cpu().numpy()):
            patched[r, p] = v

    return measure_batches(session, corrupt, edit_batches(session, cells, corrupt.n_tokens), edits_for, store,
                           tid, cid, make=make, message=message, ctx=ctx)


class _Setup:
    """Validated inputs: ids, token ids, clean activations and the corrupted run."""

    def __init__(self, session: ModelSession, request: PatchRequest) -> None:
        if request.site not in SITES:
            raise EditError(f"unknown patching site {request.site!r}: use one of {', '.join(SITES)}")
        self.clean_ids, self.corrupt_ids = encode_pair(session, request)
        self.tid, self.cid = resolve_tokens(session, request.target, request.compare_token)
        self.site = request.site
        clean = run_clean(session, self.clean_ids, {request.site})
        self.clean_acts = clean.stacked(request.site)          # [L, T, d]
        self.clean_metric = float(metric(clean.logits, self.tid, self.cid))
        self.corrupt: CleanRun = run_clean(session, self.corrupt_ids)
        self.corrupt_metric = float(metric(self.corrupt.logits, self.tid, self.cid))
        check_gap(self.clean_metric, self.corrupt_metric)

    def edits(self, layer: int, positions: Iterable[int]) -> list[Edit]:
        return [Edit(self.site, layer, (p,), self.clean_acts[layer, p]) for p in positions]

    def restored(self, metric: float | np.ndarray) -> float | np.ndarray:
        return (metric - self.corrupt_metric) / (self.clean_metric - self.corrupt_metric)


def patch(session: ModelSession, request: PatchRequest | str | None = None, /, *,
          ctx: JobContext | None = None, **fields: Any) -> PatchResult:
    """Patch each (layer, position) of the clean run into the corrupted one; ``restored`` [L, T].

    ``ctx`` gets ``report(done, total, partial=PatchResult)`` after each batch and is checked
    for ``cancelled`` between batches. Complete results are cached per request.

    >>> from explorer import patch
    >>> result = patch(session, "The capital of France is", corrupt="The capital of Italy is",
    ...                target=" Paris", compare_token=" Rome")
    >>> result.restored.shape, float(result.restored[-1, -1].round(3))  # the last layer restores all
    ((30, 5), 1.0)
    """
    request = build_request(PatchRequest, request, fields)
    if request.site == "features":
        from explorer.features.sweeps import feature_patch

        run = lambda: feature_patch(session, request, ctx)  # noqa: E731
    else:
        run = lambda: _patch(session, request, ctx)  # noqa: E731
    return cached_unless_cancelled(session, ("patch", request), run, ctx)


def _patch(session: ModelSession, request: PatchRequest, ctx) -> PatchResult:
    setup = _Setup(session, request)
    L, T = session.n_layers, setup.clean_ids.numel()
    patched = np.full((L, T), np.nan, dtype=np.float32)
    total = L * T

    def make(done_now: int) -> PatchResult:
        return PatchResult(
            request=request, model=session.name,
            clean_tokens=session.decode_each(setup.clean_ids.numpy()),
            corrupt_tokens=session.decode_each(setup.corrupt_ids.numpy()),
            **target_fields(session, setup.tid, setup.cid), site=setup.site,
            layer_labels=layer_labels(L)[1:],
            clean_metric=setup.clean_metric, corrupt_metric=setup.corrupt_metric,
            patched=patched.copy(), restored=setup.restored(patched).astype(np.float32),
            done=done_now, total=total)

    cells = [(l, (l, p)) for l in range(L) for p in range(T)]
    return patch_cells(session, setup.corrupt, cells, lambda k: setup.edits(k[0], [k[1]]), setup.tid, setup.cid,
                       patched, ctx=ctx, make=make, message=lambda k: f"layer {k[0]}")


def patched_metric(session: ModelSession, request: PatchRequest,
                   patch_sets: Sequence[Sequence[tuple[int, Sequence[int]]]]) -> tuple[float, float, list[float]]:
    """The plain nnsight path: (clean metric, corrupt metric, [metric of each patch set]).

    A patch set is a list of (layer, positions) whose clean activations are all written into
    one corrupted forward; each set is one invoke of one nnsight trace. An empty set gives the
    corrupted metric itself.
    """
    setup = _Setup(session, request)
    edit_sets = [[e for layer, positions in ps for e in setup.edits(layer, positions)] for ps in patch_sets]
    runs = nnsight_runs(session, setup.corrupt_ids, edit_sets)
    values = [float(metric(r["logits"], setup.tid, setup.cid)) for r in runs]
    return setup.clean_metric, setup.corrupt_metric, values


def restored_fraction(session: ModelSession, request: PatchRequest,
                      patches: Sequence[tuple[int, Sequence[int]]]) -> float:
    """Fraction restored by one patch set, through the plain nnsight path."""
    clean, corrupt, (value,) = patched_metric(session, request, [patches])
    return (value - corrupt) / (clean - corrupt)
