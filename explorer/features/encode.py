"""A prompt's SAE features: at every position, the most active features and their activations.

The SAE (a directory in the SAELens layout, or a hub id in the local cache) is opened once per
session and checked against the model (``saelens_io.check_fits``: width, layer, model); the
prompt runs up to the SAE's site (the pass stopped there) and the activations are encoded exactly
as the SAE's ``cfg.json`` architecture defines (``explorer.features.sae``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from explorer.core.jobs import JobContext
from explorer.core.requests import build_request
from explorer.core.results import Result, array
from explorer.features.harvest import activations
from explorer.features.sae import SAEError, SparseAutoencoder
from explorer.features.saelens_io import WEIGHTS_FILE, check_fits, load_sae, resolve_sae_dir


@dataclass(frozen=True)
class EncodeRequest:
    """A prompt, the SAE (directory or cached hub id), and how many features per position."""

    prompt: str
    sae: str = ""
    top_k: int = 10
    any_model: bool = False   # skip the check that the SAE was trained on this model


@dataclass(frozen=True, eq=False)
class FeatureActivations(Result):
    """Per position, the ``top_k`` most active features (-1 and 0.0 where fewer are active)."""

    prompt: str
    sae: str
    layer: int
    site: str
    d_sae: int
    architecture: str
    token_ids: np.ndarray = array("T", "int64")
    tokens: np.ndarray = array("T", "str")
    features: np.ndarray = array("T K", "int64")
    activations: np.ndarray = array("T K", "float32")
    l0: np.ndarray = array("T", "int64")          # active features at each position

    def per_position(self) -> list[list[dict]]:
        """[[{"feature", "activation"}, ...] per position], active features only, strongest first."""
        return [[{"feature": int(f), "activation": float(a)} for f, a in zip(fs, acts) if f >= 0]
                for fs, acts in zip(self.features, self.activations)]


def open_sae(session, spec: str | Path | SparseAutoencoder, *, any_model: bool = False) -> SparseAutoencoder:
    """The SAE ``spec`` on the session's device, checked against its model; directories are
    read once per session (until their weights file changes)."""
    if isinstance(spec, SparseAutoencoder):
        check_fits(spec, session, any_model=any_model)
        return spec.to(session.device)
    path = resolve_sae_dir(spec)
    weights = path / WEIGHTS_FILE
    stamp = weights.stat().st_mtime_ns if weights.exists() else 0
    sae = session.cached(("sae", str(path.resolve()), stamp), lambda: load_sae(path, device=session.device))
    check_fits(sae, session, any_model=any_model)
    return sae


def top_features(sae: SparseAutoencoder, x: torch.Tensor, top_k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features [T, n], activations [T, n], L0 [T]) of vectors ``x`` [T, d_in]: the ``top_k``
    largest activations per vector, -1 / 0.0 past the active ones."""
    with torch.no_grad():
        f = sae.encode(x)
        n = min(top_k, sae.d_sae)
        vals, idx = f.topk(n, dim=-1)
        idx = torch.where(vals > 0, idx, torch.full_like(idx, -1))
        vals = torch.where(vals > 0, vals, torch.zeros_like(vals))
        return idx.cpu().numpy().astype(np.int64), vals.cpu().numpy().astype(np.float32), \
            (f > 0).sum(-1).cpu().numpy().astype(np.int64)


def encode_prompt(session, request: EncodeRequest | str | None = None, /, *, ctx: JobContext | None = None,
                  **fields: Any) -> FeatureActivations:
    """The top features of an SAE at every token of a prompt.

    >>> from explorer.features.encode import encode_prompt
    >>> from explorer.features.train import train_sae
    >>> _ = train_sae(session, layer=3, width=64, k=4, max_tokens=2048, window=64, batch=256,
    ...               batch_windows=8, eval_windows=2, out_dir="sae")
    >>> feats = encode_prompt(session, "The nurse said that", sae="sae", top_k=3)
    >>> feats.tokens.tolist(), feats.features.shape, int(feats.l0.max()) <= 4
    (['The', ' nurse', ' said', ' that'], (4, 3), True)
    """
    request = build_request(EncodeRequest, request, fields)
    if not request.sae:
        raise SAEError("no SAE given: pass the directory of an SAE in the SAELens layout")
    if request.top_k < 1:
        raise SAEError(f"top_k must be ≥ 1, got {request.top_k}")
    sae = open_sae(session, request.sae, any_model=request.any_model)
    layer, site = sae.cfg.site
    ids = session.encode(request.prompt)
    x = activations(session, ids[None], layer, site)[0].float()
    features, acts, l0 = top_features(sae, x, request.top_k)
    return FeatureActivations(
        prompt=request.prompt, sae=str(request.sae), layer=layer, site=site, d_sae=sae.d_sae,
        architecture=sae.cfg.architecture, token_ids=ids.numpy().astype(np.int64),
        tokens=np.array(session.decode_each(ids.numpy()).tolist(), dtype=str), features=features,
        activations=acts, l0=l0)
