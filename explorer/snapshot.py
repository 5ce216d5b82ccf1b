"""Session snapshots: results saved to one zip that reopens without the model.

Layout: ``manifest.json`` (schema version, model identity, package versions, creation time, the
list of results), one JSON per result under ``results/``, and every array as ``.npy`` under
``arrays/``, read back with ``allow_pickle=False``. Nothing is ever unpickled or executed:
loading validates every part and names what is wrong in a ``SnapshotError``.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import io
import json
import os
import tempfile
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .errors import ExplorerError
from .results import RESULT_TYPES, Result

SCHEMA_VERSION = 1
MAX_UNCOMPRESSED = 4 << 30  # refuse zip bombs: 4 GiB of content at most
# Modules defining result types: imported before loading so every type is registered.
RESULT_MODULES = ("session", "lens", "swap", "heads", "ablation", "patching", "neurons", "describe", "demonstrations")
_PACKAGES = ("interp-explorer", "torch", "transformers", "nnsight", "numpy", "panel", "bokeh")


class SnapshotError(ExplorerError):
    """A snapshot that cannot be read; the message says which part is wrong."""


@dataclass(frozen=True)
class Entry:
    label: str
    result: Result


@dataclass(frozen=True)
class Snapshot:
    manifest: dict
    entries: tuple[Entry, ...]

    @property
    def results(self) -> list[Result]:
        return [e.result for e in self.entries]

    @property
    def model(self) -> dict:
        return self.manifest.get("model") or {}


# ------------------------------------------------------------------- identity
def weights_hash(model) -> str:
    """A fast fingerprint of a model's weights: names, shapes and sampled values of every tensor."""
    h = hashlib.sha256()
    for name, p in model.state_dict().items():
        flat = p.detach().reshape(-1)
        h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
        sample = flat[:: max(1, flat.numel() // 4096)][:4096].float().cpu().numpy()
        h.update(sample.tobytes())
    return h.hexdigest()[:16]


def model_identity(session) -> dict:
    """What a snapshot records about the model that made its results."""
    info = session.info()
    if not hasattr(session, "_weights_hash"):
        session._weights_hash = weights_hash(session.hf)
    return {"name": info.name, "architecture": info.architecture, "n_layers": info.n_layers,
            "config_hash": info.config_hash, "weights_hash": session._weights_hash}


def model_differences(manifest_model: dict, identity: dict) -> list[str]:
    """How the attached model differs from the one a snapshot was made with (empty = same)."""
    return [f"{key}: snapshot {manifest_model.get(key)!r}, attached {identity.get(key)!r}"
            for key in ("name", "config_hash", "weights_hash")
            if manifest_model.get(key) != identity.get(key)]


def _versions() -> dict:
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


# -------------------------------------------------------------------- writing
def _encode(value: Any, prefix: str, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(value, np.ndarray):
        name = f"arrays/{prefix}.npy"
        arrays[name] = value
        return {"$array": name, "dtype": value.dtype.str, "shape": list(value.shape)}
    if isinstance(value, Result):
        out = {"type": type(value).__name__}
        for f in dataclasses.fields(value):
            out[f.name] = _encode(getattr(value, f.name), f"{prefix}.{f.name}", arrays)
        return out
    if dataclasses.is_dataclass(value):
        return {f.name: _encode(getattr(value, f.name), f"{prefix}.{f.name}", arrays)
                for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_encode(v, f"{prefix}.{i}", arrays) for i, v in enumerate(value)]
    if isinstance(value, np.generic):
        return value.item()
    return value


def save_snapshot(path: str | os.PathLike, entries: Iterable[Entry | Result], model: dict | None = None) -> Path:
    """Write results (with labels) and the model's identity to one zip, atomically."""
    path = Path(path)
    items = [e if isinstance(e, Entry) else Entry(type(e).__name__, e) for e in entries]
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": model or {},
        "packages": _versions(),
        "results": [],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for i, entry in enumerate(items):
                arrays: dict[str, np.ndarray] = {}
                body = _encode(entry.result, f"r{i:03d}", arrays)
                name = f"results/r{i:03d}.json"
                zf.writestr(name, json.dumps(body, ensure_ascii=False))
                for array_name, array in arrays.items():
                    buf = io.BytesIO()
                    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
                    zf.writestr(array_name, buf.getvalue())
                manifest["results"].append({"file": name, "type": body["type"], "label": entry.label})
            zf.writestr("manifest.json", json.dumps(manifest, indent=1, ensure_ascii=False))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def append_to_snapshot(path: str | os.PathLike, result: Result, label: str | None = None,
                       model: dict | None = None) -> Path:
    """Add a result to a snapshot file, creating it when absent."""
    path = Path(path)
    entries: list[Entry] = []
    if path.exists():
        snap = load_snapshot(path)
        entries = list(snap.entries)
        if model and snap.model and model_differences(snap.model, model):
            raise SnapshotError(f"{path} was made with another model ({'; '.join(model_differences(snap.model, model))})")
        model = model or snap.model
    entries.append(Entry(label or type(result).__name__, result))
    return save_snapshot(path, entries, model)


# -------------------------------------------------------------------- reading
def _read_json(zf: zipfile.ZipFile, name: str) -> Any:
    try:
        raw = zf.read(name)
    except KeyError:
        raise SnapshotError(f"snapshot is missing {name}") from None
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SnapshotError(f"{name} is not valid JSON ({e})") from None


def _read_array(zf: zipfile.ZipFile, ref: dict) -> np.ndarray:
    name = ref.get("$array")
    if not isinstance(name, str) or not name.endswith(".npy"):
        raise SnapshotError(f"bad array reference {ref!r}")
    try:
        raw = zf.read(name)
    except KeyError:
        raise SnapshotError(f"snapshot is missing the array {name}") from None
    try:
        array = np.load(io.BytesIO(raw), allow_pickle=False)
    except ValueError as e:
        if "pickle" in str(e):
            raise SnapshotError(f"{name} holds pickled objects; refusing to load it") from None
        raise SnapshotError(f"{name} is not a valid .npy array ({e})") from None
    except Exception as e:
        raise SnapshotError(f"{name} is not a valid .npy array ({type(e).__name__}: {e})") from None
    if not isinstance(array, np.ndarray):
        raise SnapshotError(f"{name} is not a single array")
    if list(array.shape) != ref.get("shape") or array.dtype.str != ref.get("dtype"):
        raise SnapshotError(f"{name} has shape {list(array.shape)} {array.dtype.str}, "
                            f"expected {ref.get('shape')} {ref.get('dtype')}")
    return array


def _decode(value: Any, zf: zipfile.ZipFile) -> Any:
    if isinstance(value, dict):
        if "$array" in value:
            return _read_array(zf, value)
        return {k: _decode(v, zf) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v, zf) for v in value]
    return value


def _check_shapes(result: Result, name: str) -> None:
    """Per-type consistency beyond each array's own declared shape."""
    check = getattr(result, "validate", None)
    if check is not None:
        problem = check()
        if problem:
            raise SnapshotError(f"{name}: {problem}")


def _register_result_types() -> None:
    import importlib

    for module in RESULT_MODULES:
        importlib.import_module(f"explorer.{module}")


def _build(body: Any, name: str) -> Result:
    if not isinstance(body, dict) or not isinstance(body.get("type"), str):
        raise SnapshotError(f"{name} does not describe a result")
    cls = RESULT_TYPES.get(body["type"])
    if cls is None:
        raise SnapshotError(f"{name} has an unknown result type {body['type']!r}")
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in body]
    if missing:
        raise SnapshotError(f"{name} ({body['type']}) lacks {', '.join(missing)}")
    try:
        result = cls.from_dict(body)
        _check_shapes(result, name)
    except SnapshotError:
        raise
    except Exception as e:
        raise SnapshotError(f"{name} ({body['type']}) is malformed: {type(e).__name__}: {e}") from None
    return result


def load_snapshot(path: str | os.PathLike) -> Snapshot:
    """Read and validate a snapshot; any problem raises ``SnapshotError`` naming it."""
    path = Path(path)
    if not path.is_file():
        raise SnapshotError(f"no snapshot file at {path}")
    _register_result_types()
    try:
        with zipfile.ZipFile(path) as zf:
            members = zf.infolist()
            if sum(m.file_size for m in members) > MAX_UNCOMPRESSED:
                raise SnapshotError(f"{path.name} unpacks to more than {MAX_UNCOMPRESSED >> 30} GiB; refusing it")
            pickles = [m.filename for m in members if m.filename.endswith((".pkl", ".pickle", ".pt", ".pth"))]
            if pickles:
                raise SnapshotError(f"{path.name} contains pickled files ({', '.join(pickles[:3])}); refusing it")
            manifest = _read_json(zf, "manifest.json")
            if not isinstance(manifest, dict):
                raise SnapshotError("manifest.json is not an object")
            version = manifest.get("schema_version")
            if version != SCHEMA_VERSION:
                raise SnapshotError(f"unknown snapshot schema version {version!r} (this version reads {SCHEMA_VERSION})")
            listed = manifest.get("results")
            if not isinstance(listed, list):
                raise SnapshotError("manifest.json has no list of results")
            entries = []
            for item in listed:
                if not isinstance(item, dict) or not isinstance(item.get("file"), str):
                    raise SnapshotError(f"manifest.json lists a malformed result entry {item!r}")
                body = _decode(_read_json(zf, item["file"]), zf)
                entries.append(Entry(str(item.get("label", "")), _build(body, item["file"])))
    except SnapshotError:
        raise
    except zipfile.BadZipFile as e:
        raise SnapshotError(f"{path.name} is not a snapshot: not a readable zip ({e})") from None
    except Exception as e:  # anything else a damaged file can provoke: still one clear error
        raise SnapshotError(f"{path.name} is corrupt: {type(e).__name__}: {e}") from None
    return Snapshot(manifest=manifest, entries=tuple(entries))
