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
import types
import typing
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import IO, Any

import numpy as np

from explorer.core.errors import ExplorerError
from explorer.core.files import atomic_path
from explorer.core.results import RESULT_TYPES, Result

SCHEMA_VERSION = 1
MAX_UNCOMPRESSED = 4 << 30  # refuse zip bombs: 4 GiB of content at most
# Modules defining result types: imported before loading so every type is registered.
RESULT_MODULES = ("core.session", "analyses.lens", "analyses.heads", "analyses.demonstrations",
                  "interventions.ablation", "interventions.patching", "neurons.index", "neurons.describe",
                  "training.swap", "training.bias", "training.intervene", "training.checkpoints",
                  "analyses.hidden", "analyses.probes", "analyses.ccs", "analyses.patchscope", "training.bias_datasets",
                  "interventions.generate", "interventions.steering", "training.steer_compare",
                  "features.train", "features.encode", "features.attribution",
                  "features.card", "features.browse", "neurons.units")
PICKLE_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth", ".joblib")
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
    return {"name": info.name, "architecture": info.architecture, "n_layers": info.n_layers,
            "n_heads": info.n_heads, "n_kv_heads": info.n_kv_heads, "config_hash": info.config_hash,
            "weights_hash": session.cached(("weights-hash",), lambda: weights_hash(session.hf))}


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


def _entries(entries: Iterable[Entry | Result]) -> list[Entry]:
    return [e if isinstance(e, Entry) else Entry(type(e).__name__, e) for e in entries]


def new_manifest(model: dict | None = None) -> dict:
    """A manifest for results made now (its list of result files is filled in when written)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": dict(model or {}),
        "packages": _versions(),
        "results": [],
    }


def snapshot_of(entries: Iterable[Entry | Result], model: dict | None = None) -> Snapshot:
    """A snapshot in memory (e.g. a session's history), as ``load_snapshot`` would return it."""
    items = _entries(entries)
    manifest = new_manifest(model)
    manifest["results"] = [{"file": f"results/r{i:03d}.json", "type": type(e.result).__name__, "label": e.label}
                           for i, e in enumerate(items)]
    return Snapshot(manifest=manifest, entries=tuple(items))


def _write(target: str | IO[bytes], items: list[Entry], model: dict | None) -> None:
    """Write the zip (manifest, one JSON per result, arrays as .npy) to a path or a binary file."""
    manifest = new_manifest(model)
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as zf:
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


def save_snapshot(path: str | os.PathLike, entries: Iterable[Entry | Result], model: dict | None = None) -> Path:
    """Write results (with labels) and the model's identity to one zip, atomically."""
    path = Path(path)
    items = _entries(entries)
    with atomic_path(path) as tmp:
        _write(str(tmp), items, model)
    return path


def snapshot_bytes(entries: Iterable[Entry | Result], model: dict | None = None) -> bytes:
    """The snapshot zip in memory (what the app's "Save snapshot" download sends)."""
    buf = io.BytesIO()
    _write(buf, _entries(entries), model)
    return buf.getvalue()


def append_to_snapshot(path: str | os.PathLike, result: Result, label: str | None = None,
                       model: dict | None = None) -> Path:
    """Add a result to a snapshot file, creating it when absent."""
    path = Path(path)
    entries: list[Entry] = []
    if path.exists():
        snap = load_snapshot(path)
        entries = list(snap.entries)
        if model and snap.model and model_differences(snap.model, model):
            differences = "; ".join(model_differences(snap.model, model))
            raise SnapshotError(f"{path} was made with another model ({differences})")
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


def _array_header(raw: bytes, name: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) from a .npy header, read without loading the data."""
    fp = io.BytesIO(raw)
    try:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
        else:
            raise ValueError(f"unknown .npy version {version}")
    except Exception as e:
        raise SnapshotError(f"{name} is not a valid .npy array ({e})") from None
    return tuple(shape), dtype, fp.tell()


def _read_array(zf: zipfile.ZipFile, ref: dict) -> np.ndarray:
    name = ref.get("$array")
    if not isinstance(name, str) or not name.endswith(".npy"):
        raise SnapshotError(f"bad array reference {ref!r}")
    try:
        raw = zf.read(name)
    except KeyError:
        raise SnapshotError(f"snapshot is missing the array {name}") from None
    # The header first: object arrays (pickles) and wrong shapes are refused before any data is read.
    shape, dtype, offset = _array_header(raw, name)
    if dtype.hasobject:
        raise SnapshotError(f"{name} holds pickled objects; refusing to load it")
    if list(shape) != ref.get("shape") or dtype.str != ref.get("dtype"):
        raise SnapshotError(f"{name} has shape {list(shape)} {dtype.str}, "
                            f"expected {ref.get('shape')} {ref.get('dtype')}")
    if len(raw) - offset != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
        raise SnapshotError(f"{name} holds {len(raw) - offset} bytes of data, not the {shape} {dtype.str} "
                            "its header announces")
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
    return array


def _decode(value: Any, zf: zipfile.ZipFile) -> Any:
    if isinstance(value, dict):
        if "$array" in value:
            return _read_array(zf, value)
        return {k: _decode(v, zf) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v, zf) for v in value]
    return value


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _type_problem(tp: Any, value: Any, where: str) -> str | None:
    """Why ``value`` is not of the annotated type ``tp`` (None when it is), recursing into dataclasses.

    ``from_dict`` builds whatever the JSON holds; this is what stops a string where a number
    belongs (or an array of objects) from reaching the charts.
    """
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        problems = [_type_problem(a, value, where) for a in args if a is not type(None)]
        return None if any(p is None for p in problems) else problems[0]
    if value is None:
        return f"{where} is null"
    if tp is Any:
        return None
    if tp is np.ndarray:
        if not isinstance(value, np.ndarray):
            return f"{where} is not an array"
        return f"{where} holds objects" if value.dtype.hasobject else None
    if tp is bool:
        ok = isinstance(value, (bool, np.bool_))
    elif tp is int:
        ok = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    elif tp is float:
        ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    elif tp is str:
        ok = isinstance(value, str)
    elif origin is tuple:
        if not isinstance(value, tuple):
            return f"{where} is not a list"
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(value)
        elif len(args) != len(value):
            return f"{where} has {len(value)} items, expected {len(args)}"
        for i, (a, v) in enumerate(zip(args, value)):
            if problem := _type_problem(a, v, f"{where}[{i}]"):
                return problem
        return None
    elif isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, tp):
            return f"{where} is not a {tp.__name__}"
        hints = _hints(tp)
        for f in dataclasses.fields(tp):
            if problem := _type_problem(hints[f.name], getattr(value, f.name), f"{where}.{f.name}"):
                return problem
        return None
    else:
        return None  # an annotation this checker does not know: from_dict's own result stands
    return None if ok else f"{where} should be {tp.__name__}, not {type(value).__name__}"


def _check_result(result: Result, name: str) -> None:
    """Every field of the annotated type (nested results too), then ``validate()``: the arrays'
    declared shapes (dtypes were restored by ``from_dict``) and the result's own relations."""
    cls = type(result)
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if problem := _type_problem(hints[f.name], getattr(result, f.name), f.name):
            raise SnapshotError(f"{name} ({cls.__name__}): {problem}")
    if problem := result.validate():
        raise SnapshotError(f"{name} ({cls.__name__}): {problem}")


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
        _check_result(result, name)
    except SnapshotError:
        raise
    except Exception as e:
        raise SnapshotError(f"{name} ({body['type']}) is malformed: {type(e).__name__}: {e}") from None
    return result


def _check_manifest(manifest: Any) -> list:
    """The manifest's own fields; returns its list of results."""
    if not isinstance(manifest, dict):
        raise SnapshotError("manifest.json is not an object")
    version = manifest.get("schema_version")
    if type(version) is not int or version != SCHEMA_VERSION:  # (True == 1 in Python)
        raise SnapshotError(f"unknown snapshot schema version {version!r} (this version reads {SCHEMA_VERSION})")
    for key, kind in (("model", dict), ("packages", dict), ("created", str)):
        if key in manifest and not isinstance(manifest[key], kind):
            raise SnapshotError(f"manifest.json: {key} should be {'an object' if kind is dict else 'a string'}")
    for key, value in manifest.get("model", {}).items():
        if not isinstance(value, (str, int, float, bool, type(None))):
            raise SnapshotError(f"manifest.json: model {key} should be a plain value")
    listed = manifest.get("results")
    if not isinstance(listed, list):
        raise SnapshotError("manifest.json has no list of results")
    for item in listed:
        if not isinstance(item, dict) or not isinstance(item.get("file"), str) \
                or not item["file"].startswith("results/") or not item["file"].endswith(".json"):
            raise SnapshotError(f"manifest.json lists a malformed result entry {_short(item)}")
        if not isinstance(item.get("label", ""), str) or not isinstance(item.get("type", ""), str):
            raise SnapshotError(f"manifest.json: the entry for {item['file']} has a label or type that is not text")
    return listed


def _short(value: Any, n: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= n else text[: n - 1] + "…"


def _load(source: str | IO[bytes], name: str) -> Snapshot:
    _register_result_types()
    try:
        with zipfile.ZipFile(source) as zf:
            members = zf.infolist()
            if sum(m.file_size for m in members) > MAX_UNCOMPRESSED:
                raise SnapshotError(f"{name} unpacks to more than {MAX_UNCOMPRESSED >> 30} GiB; refusing it")
            pickles = [m.filename for m in members if m.filename.lower().endswith(PICKLE_SUFFIXES)]
            if pickles:
                raise SnapshotError(f"{name} contains pickled files ({', '.join(pickles[:3])}); refusing it")
            manifest = _read_json(zf, "manifest.json")
            entries = []
            for item in _check_manifest(manifest):
                result = _build(_decode(_read_json(zf, item["file"]), zf), item["file"])
                if item.get("type", type(result).__name__) != type(result).__name__:
                    raise SnapshotError(f"manifest.json says {item['file']} is a {item['type']}, "
                                        f"but it holds a {type(result).__name__}")
                entries.append(Entry(item.get("label", ""), result))
    except SnapshotError:
        raise
    except zipfile.BadZipFile as e:
        raise SnapshotError(f"{name} is not a snapshot: not a readable zip ({e})") from None
    except Exception as e:  # anything else a damaged file can provoke: still one clear error
        raise SnapshotError(f"{name} is corrupt: {type(e).__name__}: {e}") from None
    return Snapshot(manifest=manifest, entries=tuple(entries))


def load_snapshot(path: str | os.PathLike) -> Snapshot:
    """Read and validate a snapshot; any problem raises ``SnapshotError`` naming it."""
    path = Path(path)
    if not path.is_file():
        raise SnapshotError(f"no snapshot file at {path}")
    return _load(str(path), path.name)


def read_snapshot(data: bytes, name: str = "the snapshot") -> Snapshot:
    """``load_snapshot`` for bytes in memory (an uploaded file)."""
    if not isinstance(data, (bytes, bytearray)) or not data:
        raise SnapshotError(f"{name} is empty")
    return _load(io.BytesIO(bytes(data)), name)
