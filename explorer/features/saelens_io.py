"""Reading and writing SAEs in the SAELens layout: a directory with ``cfg.json`` and
``sae_weights.safetensors``.

Written (SAELens 6 format): ``cfg.json`` holds ``architecture``, ``d_in``, ``d_sae``, ``dtype``,
``device``, ``apply_b_dec_to_input``, ``normalize_activations``, ``reshape_activations``, ``k``
(topk) and ``metadata`` (``model_name``, ``hook_name``, ``hook_layer``, ``context_size``,
``prepend_bos``, ``dataset_path``, ``sae_lens_version`` "6.0.0" so that SAELens reads it as its
current format, and ours under ``explorer``); the safetensors file holds ``W_enc`` [d_in, d_sae],
``b_enc``, ``W_dec`` [d_sae, d_in], ``b_dec`` (and ``threshold`` for JumpReLU).

Transcoders (``SAEConfig.d_out`` set) are written as SAELens 6 writes them: ``architecture``
``transcoder`` (ReLU) or ``jumprelu_transcoder``, ``d_out``, ``apply_b_dec_to_input`` false, and
the output hook as ``metadata.hook_name_out``; ``W_dec`` is [d_sae, d_out]. A TopK transcoder is
written as ``topk_transcoder`` with ``k``: SAELens 6 has no such class (it would refuse the
file), which is why training offers BatchTopK, saved as ``jumprelu_transcoder``, which it reads.

Read: the same, and the flat pre-6 configs (``hook_name`` or ``hook_point``, ``model_name``,
``activation_fn_str``/``activation_fn`` with ``activation_fn_kwargs.k`` for TopK under
``architecture: standard``), from a local directory or a Hugging Face hub id already in the local
cache (``owner/repo`` or ``owner/repo/sub/folder``; nothing is downloaded). ``check_fits`` names
both sides of a width or model mismatch.

>>> import tempfile, torch
>>> from explorer.features.sae import SAEConfig, SparseAutoencoder
>>> sae = SparseAutoencoder.init(SAEConfig(d_in=4, d_sae=8, architecture="topk", k=2,
...                                        metadata={"hook_name": "blocks.1.hook_resid_post"}))
>>> path = save_sae(sae, tempfile.mkdtemp())
>>> back = load_sae(path)
>>> back.cfg.architecture, back.cfg.k, back.cfg.site, torch.equal(back.W_enc, sae.W_enc)
('topk', 2, (1, 'resid'), True)
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from explorer.core.files import atomic_write_json, load_arrays, save_arrays
from explorer.features.sae import SAEConfig, SAEError, SparseAutoencoder

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SAELENS_FORMAT_VERSION = "6.0.0"  # the SAELens config format these files follow


# ------------------------------------------------------------------------------ writing
def saelens_config(sae: SparseAutoencoder) -> dict[str, Any]:
    """The ``cfg.json`` dict of an SAE (SAELens 6 layout)."""
    cfg = sae.cfg
    arch = cfg.architecture
    if cfg.is_transcoder:
        arch = _TRANSCODER_NAMES[arch]
    meta = {"sae_lens_version": SAELENS_FORMAT_VERSION, "sae_lens_training_version": None,
            "model_name": None, "hook_name": None, "hook_layer": None, **cfg.metadata}
    if meta.get("hook_name") and meta.get("hook_layer") is None:
        meta["hook_layer"] = int(meta["hook_name"].split(".")[1])
    out: dict[str, Any] = {"architecture": arch, "d_in": cfg.d_in, "d_sae": cfg.d_sae,
                           "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
                           "normalize_activations": cfg.normalize_activations, "reshape_activations": "none"}
    if cfg.architecture == "topk":
        out["k"] = cfg.k
    if cfg.is_transcoder:
        out["d_out"] = cfg.d_out
    out["metadata"] = meta
    return out


def save_sae(sae: SparseAutoencoder, path: str | Path) -> Path:
    """Write ``cfg.json`` and ``sae_weights.safetensors`` into directory ``path`` (each file
    atomically; the config last, so a directory with a config has matching weights)."""
    out = Path(path).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    (out / CFG_FILE).unlink(missing_ok=True)
    arrays = {k: v.float().cpu().numpy() for k, v in sae.weights().items()}
    save_arrays(out / WEIGHTS_FILE, arrays, {"format": "pt"})
    atomic_write_json(out / CFG_FILE, saelens_config(sae), indent=1, allow_nan=False)
    return out


# ------------------------------------------------------------------------------ reading
def resolve_sae_dir(spec: str | Path) -> Path:
    """The directory of an SAE: a local directory with ``cfg.json``, or a hub id already in the
    local Hugging Face cache (``owner/repo`` or ``owner/repo/sub/folder``)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / CFG_FILE).exists():
            raise SAEError(f"{spec} has no {CFG_FILE}: not an SAE directory in the SAELens layout")
        return path
    if path.exists():
        raise SAEError(f"{spec} is a file; pass the SAE's directory (with {CFG_FILE} and {WEIGHTS_FILE})")
    parts = str(spec).strip("/").split("/")
    if len(parts) >= 2 and not str(spec).startswith((".", "/", "~")):
        repo, sub = "/".join(parts[:2]), "/".join(parts[2:])
        try:
            from huggingface_hub import snapshot_download

            root = Path(snapshot_download(repo, local_files_only=True))
        except Exception:
            root = None
        if root is not None:
            found = root / sub if sub else root
            if (found / CFG_FILE).exists():
                return found
            raise SAEError(f"{repo} is in the local Hugging Face cache but has no {sub + '/' if sub else ''}"
                           f"{CFG_FILE}")
    raise SAEError(f"SAE not found: {spec} (pass a directory with {CFG_FILE} and {WEIGHTS_FILE}, or a hub id "
                   "already in the local Hugging Face cache)")


# Our architecture (the activation) of a transcoder, by its SAELens name, and back.
_TRANSCODER_NAMES = {"standard": "transcoder", "jumprelu": "jumprelu_transcoder", "topk": "topk_transcoder"}
_TRANSCODERS = {v: k for k, v in _TRANSCODER_NAMES.items()}


def _activation(raw: dict) -> str:
    return str(raw.get("activation_fn") or raw.get("activation_fn_str") or "relu")


def config_from_saelens(raw: dict) -> SAEConfig:
    """An ``SAEConfig`` from a SAELens ``cfg.json`` dict, current or pre-6 (flat) format."""
    if not isinstance(raw, dict):
        raise SAEError(f"{CFG_FILE} does not hold a JSON object")
    meta = raw.get("metadata") or raw.get("meta") or {}
    if not isinstance(meta, dict):
        meta = {}
    meta = dict(meta)
    for old, new in (("hook_point", "hook_name"), ("hook_point_layer", "hook_layer")):
        if old in raw and new not in raw:
            raw = {**raw, new: raw[old]}
    for key in ("model_name", "hook_name", "hook_layer", "context_size", "prepend_bos", "dataset_path",
                "hook_name_out"):
        if meta.get(key) is None and raw.get(key) is not None:
            meta[key] = raw[key]
    arch = str(raw.get("architecture", "standard"))
    k = raw.get("k")
    d_out = None
    if arch in _TRANSCODERS:
        arch = _TRANSCODERS[arch]
        d_out = raw.get("d_out", raw.get("d_in"))
        raw = {**raw, "apply_b_dec_to_input": False}    # SAELens: never for transcoders
        if arch == "standard" and _activation(raw) != "relu":
            raise SAEError(f"unsupported activation {_activation(raw)!r} for a transcoder (supported: relu)")
    if arch == "standard" and _activation(raw) == "topk":   # pre-6: TopK as a standard SAE's activation
        arch = "topk"
        k = (raw.get("activation_fn_kwargs") or {}).get("k", k)
    elif arch == "standard" and d_out is None and _activation(raw) != "relu":
        raise SAEError(f"unsupported activation {_activation(raw)!r} for a standard SAE (supported: relu, topk)")
    norm = raw.get("normalize_activations", "none")
    if isinstance(norm, bool):  # old configs: True meant the April-update scaling
        norm = "expected_average_only_in" if norm else "none"
    if norm is None:
        norm = "none"
    if raw.get("reshape_activations", "none") not in ("none", None):
        raise SAEError(f"unsupported reshape_activations {raw['reshape_activations']!r} (attention hook_z SAEs)")
    try:
        cfg = SAEConfig(d_in=int(raw["d_in"]), d_sae=int(raw["d_sae"]), architecture=arch,
                        k=int(k) if k is not None else None,
                        apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)),
                        normalize_activations=str(norm), metadata=meta,
                        d_out=int(d_out) if d_out is not None else None)
    except KeyError as e:
        raise SAEError(f"{CFG_FILE} lacks {e}") from None
    except (TypeError, ValueError) as e:
        raise SAEError(f"{CFG_FILE} has a malformed value ({e})") from None
    cfg.check()
    return cfg


def load_sae(spec: str | Path, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """Open an SAE in the SAELens layout (see the module docstring); ``device`` places its weights."""
    path = resolve_sae_dir(spec)
    try:
        raw = json.loads((path / CFG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SAEError(f"{path / CFG_FILE} is not readable JSON ({e})") from None
    cfg = config_from_saelens(raw)
    if not (path / WEIGHTS_FILE).exists():
        raise SAEError(f"{path} has {CFG_FILE} but no {WEIGHTS_FILE}")
    try:
        arrays, _ = load_arrays(path / WEIGHTS_FILE)
    except ValueError as e:
        raise SAEError(str(e)) from None
    weights = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in arrays.items()}
    if "finetuning_scaling_factor" in weights or "scaling_factor" in weights:
        scale = weights.get("finetuning_scaling_factor", weights.get("scaling_factor"))
        if not torch.allclose(scale, torch.ones_like(scale)):
            raise SAEError("this SAE has a finetuning scaling factor, which is not supported here")
    if raw.get("rescale_acts_by_decoder_norm"):
        weights = _fold_decoder_norm(weights)
    meta = dict(cfg.metadata, source_path=str(path))
    cfg = SAEConfig(**{**cfg.__dict__, "metadata": meta})
    return SparseAutoencoder(cfg, weights).to(device)


def _fold_decoder_norm(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SAELens's ``rescale_acts_by_decoder_norm`` (TopK): pre-activations are multiplied by each
    decoder row's norm before the top k are chosen, and activations divided by it again before
    decoding. Folding the norms into the weights (encoder columns × n, decoder rows ÷ n) gives the
    same features and reconstruction with a plain encode/decode."""
    if "W_dec" not in weights or "W_enc" not in weights:
        raise SAEError(f"{WEIGHTS_FILE} lacks W_enc or W_dec")
    n = weights["W_dec"].norm(dim=-1)
    if bool((n == 0).any()):
        raise SAEError("rescale_acts_by_decoder_norm is set but a decoder row is zero (its scale is undefined)")
    out = dict(weights, W_enc=weights["W_enc"] * n, W_dec=weights["W_dec"] / n[:, None])
    if "b_enc" in weights:
        out["b_enc"] = weights["b_enc"] * n
    return out


# ------------------------------------------------------------------------------ fitting a model
def _short(name: str | None) -> str:
    return str(name or "").rstrip("/").split("/")[-1].lower()


def check_fits(sae: SparseAutoencoder, session, *, any_model: bool = False) -> tuple[int, str]:
    """The (layer, site) the SAE reads in ``session``'s model, or an ``SAEError`` naming both sides:
    a width (``d_in`` vs the model's ``d_model``), a layer out of range, or another model (by its
    name, and by config hash for SAEs trained here; ``any_model`` skips the model check)."""
    site = sae.cfg.site
    if site is None:
        raise SAEError("the SAE's cfg.json names no hook (metadata.hook_name), so where it reads is unknown")
    layer, where = site
    d_model = int(session.hf.config.hidden_size)
    if sae.d_in != d_model:
        raise SAEError(f"the SAE reads vectors of width {sae.d_in} but {session.name} has d_model {d_model}: "
                       "it was trained on another model")
    if sae.cfg.is_transcoder:
        out = sae.cfg.site_out
        if where != "mlp_in" or out is None or out != (layer, "mlp_out"):
            raise SAEError(f"this app reads transcoders from an MLP's input to the same MLP's output; this one reads "
                           f"{sae.cfg.metadata.get('hook_name')} and writes {sae.cfg.metadata.get('hook_name_out')}")
        if sae.cfg.d_out != d_model:
            raise SAEError(f"the transcoder writes vectors of width {sae.cfg.d_out} but {session.name} has d_model "
                           f"{d_model}: it was trained on another model")
    if not 0 <= layer < session.n_layers:
        raise SAEError(f"the SAE reads layer {layer} but {session.name} has layers 0..{session.n_layers - 1}")
    if not any_model:
        meta = sae.cfg.metadata
        ours = (meta.get("explorer") or {}).get("config_hash")
        info = session.info()
        if ours and ours != info.config_hash:
            raise SAEError(f"the SAE was trained on {meta.get('model_name')} (config {ours}) but the attached model "
                           f"is {info.name} (config {info.config_hash}); pass any_model=True (--any-model) to use it")
        name = meta.get("model_name")
        if not ours and name and _short(name) != _short(info.name) and _short(name) != _short(info.path):
            raise SAEError(f"the SAE was trained on {name} but the attached model is {info.name}; "
                           "pass any_model=True (--any-model) to use it anyway")
    return layer, where
