"""SAE features in the ablation sweep and in activation patching (``sweep(kind="features")`` and
``patch(site="features")`` route here).

**Feature sweep** (``feature_sweep``): the SAE's features are encoded from the clean run's
activation at its site; the ``top_n`` features with the largest peak activation over the prompt
(never-active ones left out) are ablated one at a time at every position, the error term kept
(``explorer.features.edits.feature_edit``: x ← x − f_j(x)·W_dec[j]), and the effect on the metric
(ablated − baseline; the metric is the target's logit, minus ``compare_token``'s when given) is
reported in a ``SweepResult``: ``components`` "sae:F", ``effects`` [N], ``activations`` the peaks.
``method="exact"`` replays only blocks from the SAE's layer up, one batch row per feature (as the
component sweep does); ``"sequential"`` is one plain nnsight run per feature.

**Feature patching** (``feature_patch``): the clean and corrupted prompts (equal token lengths)
are encoded at the SAE's site; for each chosen feature and each position, the corrupted run's
feature activation there is clamped to its clean value (error term of the corrupted run kept),
and the fraction of the metric gap restored is reported in a ``PatchResult`` whose rows are the
features (``layer_labels`` "f123"; ``site`` "features"). Features: ``features`` ("123, 456") or
the ``top_n`` with the largest Σ_t |f_clean − f_corrupt| (features equal in both runs left out).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from explorer.core.jobs import JobContext
from explorer.features.edits import feature_edit, parse_features, sae_for
from explorer.features.harvest import activations
from explorer.features.sae import MLP_IN, SAEError
from explorer.interventions.ablation import SweepRequest, SweepResult, sweep_edits
from explorer.interventions.edits import EditError, metric, resolve_tokens, run_clean, target_fields
from explorer.interventions.patching import PatchRequest, PatchResult, check_gap, encode_pair, patch_cells

if TYPE_CHECKING:
    from explorer.core.session import ModelSession

_RUN_SITE = {"resid": "resid", "mlp": "mlp"}   # the edit site of an SAE -> the clean run's capture site


def _sae(session: ModelSession, path: str | None):
    if not path:
        raise EditError("features need an SAE: give the SAE folder (cfg.json + sae_weights.safetensors)")
    sae = sae_for(session, path)
    edit = feature_edit(sae, [0])      # the SAE's edit site and layer
    return sae, edit.layer, edit.site


def site_features(session: ModelSession, sae, layer: int, site: str, ids: torch.Tensor):
    """(the clean run with the site captured, the SAE's features at every position [T, d_sae] float32).
    A transcoder's features come from the MLP's input, read by a pass stopped at that MLP."""
    if sae.cfg.is_transcoder:
        run = run_clean(session, ids)
        x = activations(session, ids[None], layer, MLP_IN)[0]
    else:
        run = run_clean(session, ids, {_RUN_SITE[site]})
        x = run.acts[_RUN_SITE[site]][layer]
    with torch.no_grad():
        f = sae.encode(x.to(sae.W_dec.device).float()).float()
    return run, f


def feature_sweep(session: ModelSession, request: SweepRequest, ctx: JobContext | None = None) -> SweepResult:
    """Ablate each of the ``top_n`` most active SAE features (``request.sae``) one at a time."""
    if request.method not in ("exact", "sequential"):
        raise EditError(f"a feature sweep runs exact or sequential, not {request.method!r} (attribution covers "
                        "model components only)")
    if request.mode != "zero":
        raise EditError(f"a feature sweep ablates features to 0 (mode zero), not {request.mode!r}")
    if request.top_n < 1:
        raise EditError(f"top-n must be at least 1, got {request.top_n}")
    sae, layer, site = _sae(session, request.sae)
    ids = session.encode(request.prompt)
    tid, cid = resolve_tokens(session, request.target, request.compare_token)
    run, f = site_features(session, sae, layer, site, ids)
    peak_pos = f.abs().argmax(dim=0)                                   # [d_sae]
    peak = f.gather(0, peak_pos[None]).squeeze(0)                      # signed peak per feature
    order = [int(j) for j in torch.argsort(peak.abs(), descending=True, stable=True)[:request.top_n]
             if float(peak[j]) != 0.0]
    if not order:
        raise SAEError("no SAE feature is active on this prompt: nothing to ablate")
    base_metric = float(metric(run.logits, tid, cid))
    logits = run.logits.float()
    effects = np.full(len(order), np.nan, dtype=np.float32)
    edits = [feature_edit(sae, [j], 0.0) for j in order]

    def make(done_now: int) -> SweepResult:
        return SweepResult(
            request=request, model=session.name, tokens=session.decode_each(ids.numpy()),
            token_ids=ids.numpy().astype(np.int64), **target_fields(session, tid, cid),
            components=tuple(f"sae:{j}" for j in order), effects=effects.copy(),
            baseline_logit=float(logits[tid]), baseline_prob=float(torch.softmax(logits, -1)[tid]),
            baseline_metric=base_metric, activations=peak[order].cpu().numpy().astype(np.float32),
            done=done_now, total=len(order))

    return sweep_edits(session, run, edits, request.method, tid, cid, base_metric, effects, ctx=ctx, make=make,
                       message=lambda i: f"feature {order[i]}")


def feature_patch(session: ModelSession, request: PatchRequest, ctx: JobContext | None = None) -> PatchResult:
    """Clamp each chosen feature, at each position, of the corrupted run to its clean activation."""
    sae, layer, site = _sae(session, request.sae)
    clean_ids, corrupt_ids = encode_pair(session, request)
    tid, cid = resolve_tokens(session, request.target, request.compare_token)
    clean, f_clean = site_features(session, sae, layer, site, clean_ids)
    corrupt, f_corrupt = site_features(session, sae, layer, site, corrupt_ids)
    clean_metric = float(metric(clean.logits, tid, cid))
    corrupt_metric = float(metric(corrupt.logits, tid, cid))
    check_gap(clean_metric, corrupt_metric)
    if request.features.strip():
        specs = parse_features(request.features)
        if any(v != 0.0 for _, v in specs):
            raise SAEError("patching sets features to their clean activations: list feature numbers only (no =V)")
        feats = list(dict.fromkeys(f for f, _ in specs))
        bad = [j for j in feats if not 0 <= j < sae.d_sae]
        if bad:
            raise SAEError(f"feature {bad[0]} is out of range: the SAE has features 0..{sae.d_sae - 1}")
    else:
        if request.top_n < 1:
            raise EditError(f"top-n must be at least 1, got {request.top_n}")
        diff = (f_clean - f_corrupt).abs().sum(0)
        feats = [int(j) for j in torch.argsort(diff, descending=True, stable=True)[:request.top_n]
                 if float(diff[j]) > 0.0]
        if not feats:
            raise SAEError("no SAE feature differs between the clean and corrupted runs: nothing to patch")
    T, N = clean_ids.numel(), len(feats)
    patched = np.full((N, T), np.nan, dtype=np.float32)
    gap = clean_metric - corrupt_metric

    def make(done_now: int) -> PatchResult:
        return PatchResult(
            request=request, model=session.name, clean_tokens=session.decode_each(clean_ids.numpy()),
            corrupt_tokens=session.decode_each(corrupt_ids.numpy()), **target_fields(session, tid, cid),
            site="features", layer_labels=tuple(f"f{j}" for j in feats), clean_metric=clean_metric,
            corrupt_metric=corrupt_metric, patched=patched.copy(),
            restored=((patched - corrupt_metric) / gap).astype(np.float32), done=done_now, total=N * T)

    def edits_for(cell: tuple[int, int]) -> list:
        r, p = cell
        return [feature_edit(sae, [feats[r]], float(f_clean[p, feats[r]]), positions=[p])]

    cells = [(layer, (r, p)) for r in range(N) for p in range(T)]
    return patch_cells(session, corrupt, cells, edits_for, tid, cid, patched, ctx=ctx, make=make,
                       message=lambda cell: f"feature {feats[cell[0]]}")
