"""An SAE's features as index units: the neuron index (``explorer.neurons.index``), reused.

``SAEUnits`` is a unit source of the neuron index: one row (the SAE's layer), ``d_sae`` units,
read from the output of the SAE's site module (the block for ``resid``, its MLP for ``mlp_out``;
``explorer.features.harvest.site_module``) and encoded exactly as the SAE's ``cfg.json`` defines
(``SparseAutoencoder.encode``). The first ``skip_first`` positions of every window (default 1)
read as 0: a window's first token carries the attention-sink activation (~100× the others at
SmolLM2's middle layers), which SAE training leaves out (``TrainConfig.skip_first``) and on which
the features would fire at absurd values, filling every top-example list with position 0.

Everything the neuron index offers then holds for features, in the same file format: top and
random examples, histograms, firing frequency, token patterns, written explanations with
simulation scores, search, and ``units_on_text``. The manifest's
``units`` entry names the SAE (its directory, a SHA-256 of its weights and its config), so the
index re-reads its examples with the same SAE, or says that the SAE changed.

``index_features`` builds such an index; its default directory is ``<SAE directory>/index``.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from explorer.core.jobs import JobContext
from explorer.features.encode import open_sae
from explorer.features.harvest import activations, site_module
from explorer.features.sae import SAEError, SparseAutoencoder, hook_name
from explorer.neurons.index import IndexRequest, NeuronIndex, UnitSource, build_index

INDEX_DIR = "index"  # a feature index's default place, inside the SAE's directory


def weights_digest(sae: SparseAutoencoder) -> str:
    """SHA-256 (16 hex digits) of the SAE's config and float32 weights: which SAE an index holds."""
    h = hashlib.sha256()
    cfg = sae.cfg
    h.update(json.dumps([cfg.architecture, cfg.d_in, cfg.d_sae, cfg.k, cfg.apply_b_dec_to_input,
                         cfg.normalize_activations, cfg.metadata.get("hook_name")]).encode())
    for name, w in sorted(sae.weights().items()):
        h.update(name.encode())
        h.update(np.ascontiguousarray(w.detach().float().cpu().numpy()).tobytes())
    return h.hexdigest()[:16]


class SAEUnits(UnitSource):
    """An SAE's latents at its layer and site, as the index's units (one row)."""

    kind = "sae"
    unit_name = "feature"
    read = "output"

    def __init__(self, sae: SparseAutoencoder, path: str | Path | None = None, skip_first: int = 1) -> None:
        if sae.cfg.site is None:
            raise SAEError("the SAE's cfg.json names no hook (metadata.hook_name), so where it reads is unknown")
        self.sae = sae
        self.layer, self.site = sae.cfg.site
        self.layers = (self.layer,)
        self.n_units = sae.d_sae
        src = path if path is not None else sae.cfg.metadata.get("source_path")
        self.path = str(Path(src).expanduser().resolve()) if src else None
        self.digest = weights_digest(sae)
        if skip_first < 0:
            raise SAEError(f"skip_first must be ≥ 0, got {skip_first}")
        self.skip_first = skip_first

    @classmethod
    def from_manifest(cls, session, units: dict) -> SAEUnits:
        """The source a feature index was built from (its SAE re-opened and checked)."""
        path = units.get("path")
        if not path or not Path(path).exists():
            raise SAEError(f"the feature index's SAE ({path}) is no longer there; its examples cannot be re-read")
        sae = open_sae(session, path, any_model=True)
        source = cls(sae, path, skip_first=int(units.get("skip_first", 1)))
        want = (units.get("sae") or {}).get("weights_sha256")
        if want and want != source.digest:
            raise SAEError(f"the SAE at {path} changed since the index was built (weights {source.digest}, "
                           f"index {want}); build the index again")
        return source

    def modules(self, session) -> list[torch.nn.Module]:
        self.sae = self.sae.to(session.device)
        return [site_module(session, self.layer, self.site)]

    def units(self, x: torch.Tensor) -> torch.Tensor:
        f = self.sae.encode(x)
        f[:, :self.skip_first] = 0.0   # the attention sink's positions (see the module docstring)
        return f

    def activations(self, session, layers: list[int], ids: torch.Tensor) -> list[torch.Tensor]:
        if any(layer != self.layer for layer in layers):
            raise SAEError(f"the SAE reads layer {self.layer}, not {layers}")
        self.sae = self.sae.to(session.device)
        x = activations(session, ids, self.layer, self.site).float()
        with torch.no_grad():
            f = self.units(x)
        return [f for _ in layers]

    def describe(self) -> dict[str, Any]:
        cfg = self.sae.cfg
        return {"kind": self.kind, "unit_name": self.unit_name, "path": self.path, "skip_first": self.skip_first,
                "sae": {"weights_sha256": self.digest, "architecture": cfg.architecture, "d_in": cfg.d_in,
                        "d_sae": cfg.d_sae, "k": cfg.k, "hook_name": hook_name(self.layer, self.site),
                        "layer": self.layer, "site": self.site, "model_name": cfg.metadata.get("model_name")}}

    def site_text(self, session) -> str:
        return f"{hook_name(self.layer, self.site)} → SAE encode"


def default_feature_index_dir(sae_dir: str | Path) -> Path:
    """Where ``index_features`` puts an SAE's index by default: ``<sae_dir>/index``."""
    return Path(sae_dir).expanduser() / INDEX_DIR


def index_features(session, sae: str | Path | SparseAutoencoder, request: IndexRequest | str | None = None, /, *,
                   ctx: JobContext | None = None, out_dir: str | Path | None = None, any_model: bool = False,
                   skip_first: int = 1, **fields: Any) -> NeuronIndex:
    """Build (or resume, or reopen) the index of an SAE's features over a corpus: the neuron
    index (``explorer.neurons.index.build_index``, same request fields) with the SAE's latents as
    its units. ``out_dir`` None: ``<SAE directory>/index`` (an in-memory SAE needs ``out_dir``);
    ``skip_first``: leading positions of each window read as 0 (see the module docstring).

    >>> from explorer.features.train import train_sae
    >>> from explorer.features.units import index_features
    >>> _ = train_sae(session, layer=3, width=64, k=4, max_tokens=2048, window=64, batch=256,
    ...               batch_windows=8, eval_windows=2, out_dir="sae")
    >>> index = index_features(session, "sae", max_tokens=512, window=32, top_k=4, n_random=2)
    >>> index.unit_name, index.layers, index.n_units, len(index.top_examples(3, 0)) <= 4
    ('feature', [3], 64, True)
    """
    model = open_sae(session, sae, any_model=any_model)
    path = None if isinstance(sae, SparseAutoencoder) else model.cfg.metadata.get("source_path", str(sae))
    if out_dir is None:
        if path is None:
            raise SAEError("an SAE given as an object needs out_dir (where to write its index)")
        out_dir = default_feature_index_dir(path)
    return build_index(session, request, ctx=ctx, out_dir=out_dir, source=SAEUnits(model, path, skip_first), **fields)


def open_feature_index(sae_dir: str | Path | None = None, index_dir: str | Path | None = None) -> NeuronIndex:
    """The feature index at ``index_dir`` (or ``<sae_dir>/index``), checked to be an SAE's."""
    if index_dir is None:
        if sae_dir is None:
            raise SAEError("give the SAE directory or the index directory")
        index_dir = default_feature_index_dir(sae_dir)
    p = Path(index_dir).expanduser()
    if not (p / "manifest.json").exists():
        where = f"{sae_dir}" if sae_dir is not None else f"{p}"
        raise SAEError(f"no feature index for {where} yet (no {p}/manifest.json); build one with `sae index`")
    index = NeuronIndex.open(p)
    if index.unit_kind != "sae":
        raise SAEError(f"{p} is a {index.unit_kind} index, not an SAE's feature index")
    return index
