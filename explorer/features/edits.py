"""SAE features as edits of a forward pass (``explorer.interventions.edits``): clamp, ablate, steer.

- ``feature_edit(sae, features, values)``: at the SAE's site, each listed feature's activation
  ``f_j`` is set to ``v_j`` *keeping the SAE's error term*: ``x ← x + Σ_j (v_j − f_j(x)) · W_dec[j]``
  (``values`` 0 ablates them). Clamping every feature to its own activation changes nothing.
  The op is registered with ``register_op`` under a name of its own per SAE, so the ablation,
  patching and replay runners apply it like any other edit.
- ``steer_edit(sae, feature, alpha)``: adds ``alpha · W_dec[feature]`` (the feature's decoder
  direction) to the site's output: an ordinary ``add`` edit.

- ``parse_features("123, 456=5")``: feature specs as typed in the app and the CLI (a bare number
  ablates, ``F=V`` clamps to V; an optional ``sae:`` prefix is allowed); ``feature_edits(sae,
  text)`` is the one edit they describe.
- ``sae_for(session, path)``: an SAE folder opened for a session's model (checked to fit, on its
  device), kept while its files are unchanged, so repeated runs reuse one registered edit op.
- ``feature_vector(sae, feature)``: a feature's decoder direction as a unit ``SteeringVector``
  (method "sae-feature"), for the Steering and Generate tabs.

Sites: an SAE on ``resid`` edits the block's output (edit site ``resid``), one on ``mlp_out``
the MLP's output (edit site ``mlp``). A transcoder (MLP input → MLP output) edits the MLP's output
too; its features are encoded from the MLP's input at the same positions (an op that reads it:
``register_op(reads_input=True)``), so clamping is ``out ← out + Σ_j (v_j − f_j(in)) · W_dec[j]``,
the transcoder's error term kept. ``positions`` None edits every position.
"""
from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from explorer.features.sae import MLP_IN, SAEError, SparseAutoencoder
from explorer.features.saelens_io import WEIGHTS_FILE, check_fits, load_sae, resolve_sae_dir
from explorer.interventions.edits import Edit, register_op

_EDIT_SITES = {"resid": "resid", "mlp_out": "mlp", MLP_IN: "mlp"}  # a transcoder writes the MLP's output
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

        def clamp_transcoder(x: torch.Tensor, value: torch.Tensor | None, mlp_in: torch.Tensor) -> torch.Tensor:
            feats, vals = value[0].long(), value[1].float()
            f = sae.encode(mlp_in.float())[..., feats]
            return x + ((vals - f) @ sae.W_dec[feats]).to(x.dtype)

        if sae.cfg.is_transcoder:
            register_op(name, clamp_transcoder, reads_input=True)
        else:
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


_SPEC = re.compile(r"^(?:sae:)?(\d+)(?:\s*=\s*([-+0-9.eE]+|[-+]?inf|nan))?$")


def parse_features(text: str | Sequence[str]) -> list[tuple[int, float]]:
    """Feature specs: ``"123, 456=5"`` → [(123, 0.0), (456, 5.0)] (a bare number ablates).

    >>> parse_features("123, sae:456=5")
    [(123, 0.0), (456, 5.0)]
    """
    items = text.replace(",", " ").split() if isinstance(text, str) else [str(t).strip() for t in text]
    items = [i for i in _join_equals(items) if i]
    out = []
    for item in items:
        m = _SPEC.match(item)
        value = None
        if m:
            try:
                value = float(m.group(2)) if m.group(2) is not None else 0.0
            except ValueError:
                value = None
        if m is None or value is None or not np.isfinite(value):
            raise SAEError(f"bad feature spec {item!r}: use a feature number (ablate) or F=VALUE (clamp), "
                           f"e.g. '123, 456=5.0'")
        out.append((int(m.group(1)), value))
    if not out:
        raise SAEError("no features given: e.g. '123, 456=5.0' (a number ablates, F=VALUE clamps)")
    return out


def _join_equals(items: list[str]) -> list[str]:
    """'456 = 5' split on spaces → '456=5'."""
    out: list[str] = []
    for item in items:
        if out and (item.startswith("=") or out[-1].endswith("=")):
            out[-1] += item
        else:
            out.append(item)
    return out


def feature_edits(sae: SparseAutoencoder, text: str | Sequence[str],
                  positions: Sequence[int] | None = None) -> list[Edit]:
    """The edit that ablates / clamps the features ``text`` lists (``parse_features``), error term kept."""
    specs = parse_features(text)
    return [feature_edit(sae, [f for f, _ in specs], [v for _, v in specs], positions)]


_OPEN: dict[tuple, SparseAutoencoder] = {}


def sae_for(session, path: str | Path) -> SparseAutoencoder:
    """The SAE in folder ``path`` for ``session``'s model: checked to fit (``check_fits``) and on
    the session's device; the same object while its weights file is unchanged."""
    folder = resolve_sae_dir(path)
    weights = folder / WEIGHTS_FILE
    stamp = weights.stat().st_mtime_ns if weights.exists() else None
    key = (str(folder), stamp, str(session.device))
    sae = _OPEN.get(key)
    if sae is None:
        sae = load_sae(folder, device=session.device)
        if len(_OPEN) >= 8:
            _OPEN.clear()
        _OPEN[key] = sae
    check_fits(sae, session)
    return sae


def sae_label(sae: SparseAutoencoder) -> str:
    """A short name of the SAE: its folder and site, e.g. 'sae-l1 L1 resid'."""
    name = Path(str(sae.cfg.metadata.get("source_path", "sae"))).name
    site = sae.cfg.site
    return f"{name} L{site[0]} {site[1]}" if site else name


def feature_vector(sae: SparseAutoencoder, feature: int, model: str = "", fingerprint: str = ""):
    """Feature ``feature``'s decoder row, normalised, as a ``SteeringVector`` at the SAE's layer
    (method "sae-feature"); steering adds it at the block's output."""
    from explorer.interventions.steering import SteeringVector

    if not 0 <= int(feature) < sae.d_sae:
        raise SAEError(f"feature {feature} is out of range: the SAE has features 0..{sae.d_sae - 1}")
    layer, _ = _site(sae)
    row = sae.W_dec[int(feature)].detach().float().cpu().numpy().astype(np.float64)
    norm = float(np.linalg.norm(row))
    if norm == 0:
        raise SAEError(f"feature {feature}'s decoder row is zero: it has no direction")
    label = f"feature {int(feature)} of {sae_label(sae)}"
    return SteeringVector(model=model, layer=int(layer), method="sae-feature",
                          vector=(row / norm).astype(np.float32), positive=(label,), negative=(),
                          positive_tokens=("",), negative_tokens=(), fingerprint=fingerprint)
