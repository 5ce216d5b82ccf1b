"""SAE features as edits of a forward pass (``explorer.interventions.edits``): clamp, ablate, steer.

- ``feature_edit(sae, features, values)``: at the SAE's site, each listed feature's activation
  ``f_j`` is set to ``v_j`` *keeping the SAE's error term*: ``x ← x + Σ_j (v_j − f_j(x)) · W_dec[j]``
  (``values`` 0 ablates them). Clamping every feature to its own activation changes nothing.
  The op is registered with ``register_op`` under a name of its own per SAE, so the ablation,
  patching and replay runners apply it like any other edit.
- ``steer_edit(sae, feature, alpha)``: adds ``alpha · W_dec[feature]`` (the feature's decoder
  direction) to the site's output: an ordinary ``add`` edit.

Sites: an SAE on ``resid`` edits the block's output (edit site ``resid``), one on ``mlp_out``
the MLP's output (edit site ``mlp``). ``positions`` None edits every position.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from explorer.features.sae import SAEError, SparseAutoencoder
from explorer.interventions.edits import Edit, register_op

_EDIT_SITES = {"resid": "resid", "mlp_out": "mlp"}
_names = itertools.count()


def _op_name(sae: SparseAutoencoder) -> str:
    """The edit op of this SAE (registered once per SAE object)."""
    name = getattr(sae, "edit_op_name", None)
    if name is None:
        name = f"sae-clamp-{next(_names)}"

        def clamp(x: torch.Tensor, value: torch.Tensor | None) -> torch.Tensor:
            feats, vals = value[0].long(), value[1].float()
            f = sae.encode(x.float())[..., feats]
            return x + ((vals - f) @ sae.W_dec[feats]).to(x.dtype)

        register_op(name, clamp)
        sae.edit_op_name = name
    return name


def _site(sae: SparseAutoencoder) -> tuple[int, str]:
    site = sae.cfg.site
    if site is None:
        raise SAEError("the SAE's cfg.json names no hook (metadata.hook_name), so where to edit is unknown")
    return site[0], _EDIT_SITES[site[1]]


def _index(positions: Sequence[int] | None) -> tuple:
    return (slice(None),) if positions is None else (list(positions),)


def feature_edit(sae: SparseAutoencoder, features: Sequence[int], values: float | Sequence[float] = 0.0,
                 positions: Sequence[int] | None = None) -> Edit:
    """Clamp ``features`` to ``values`` (0: ablate) at ``positions`` (None: all), error term kept."""
    feats = [int(f) for f in features]
    if not feats:
        raise SAEError("no features to edit")
    bad = [f for f in feats if not 0 <= f < sae.d_sae]
    if bad:
        raise SAEError(f"feature {bad[0]} is out of range: the SAE has features 0..{sae.d_sae - 1}")
    vals = [float(values)] * len(feats) if isinstance(values, (int, float)) else [float(v) for v in values]
    if len(vals) != len(feats):
        raise SAEError(f"{len(feats)} features but {len(vals)} values")
    layer, site = _site(sae)
    value = torch.tensor([feats, vals], dtype=torch.float64, device=sae.W_dec.device)
    return Edit(site, layer, _index(positions), value, op=_op_name(sae))


def steer_edit(sae: SparseAutoencoder, feature: int, alpha: float, positions: Sequence[int] | None = None) -> Edit:
    """Add ``alpha`` × the feature's decoder direction at ``positions`` (None: all)."""
    if not 0 <= int(feature) < sae.d_sae:
        raise SAEError(f"feature {feature} is out of range: the SAE has features 0..{sae.d_sae - 1}")
    layer, site = _site(sae)
    return Edit(site, layer, _index(positions), float(alpha) * sae.W_dec[int(feature)].detach(), op="add")
