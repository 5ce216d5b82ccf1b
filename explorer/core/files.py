"""Atomic writes: a file or directory is written under a temporary name, then renamed into place.

A reader (or a resumed job) therefore sees either the old complete version or the new complete
one, never a half-written file, even when the process is killed mid-write. Temporary names
start with ``.tmp-`` in the target's own directory (a rename is atomic only within one
filesystem), so leftovers of a kill are easy to find and remove (``remove_temporaries``).
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

TMP_PREFIX = ".tmp-"


def _temporary_name(path: Path) -> Path:
    # Unique per writer; created by the writer itself, so it gets the usual permissions.
    return path.parent / f"{TMP_PREFIX}{path.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary file path beside ``path``; when the block ends without error it replaces ``path``.

    >>> import tempfile
    >>> target = Path(tempfile.mkdtemp()) / "a.txt"
    >>> with atomic_path(target) as tmp:
    ...     _ = tmp.write_text("done")
    >>> target.read_text()
    'done'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_json(path: str | os.PathLike, data: Any, **dumps: Any) -> Path:
    """Write ``data`` as JSON to ``path`` atomically (``dumps`` go to ``json.dumps``)."""
    return atomic_write_text(path, json.dumps(data, **dumps))


def atomic_write_lines(path: str | os.PathLike, rows: list[dict]) -> Path:
    """Rewrite a JSON-lines file atomically (no NaN: JSON has none)."""
    return atomic_write_text(path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in rows))


@contextmanager
def atomic_dir(path: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """A temporary directory beside ``path``, renamed to ``path`` when the block ends without error.

    An existing ``path`` is an error unless ``replace`` (then it is removed just before the
    rename). On error the temporary directory is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists() and replace:
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def remove_temporaries(directory: str | os.PathLike) -> None:
    """Remove what an interrupted atomic write left in ``directory``."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for p in directory.glob(f"{TMP_PREFIX}*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def save_arrays(path: str | os.PathLike, arrays: dict[str, np.ndarray],
                metadata: dict[str, str] | None = None) -> Path:
    """Write numpy arrays (and string metadata) to a safetensors file atomically."""
    import numpy as np
    from safetensors.numpy import save_file

    with atomic_path(path) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp), metadata=metadata)
    return Path(path)


def load_arrays(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The arrays and metadata of a safetensors file; ``ValueError`` names an unreadable one."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except Exception as e:
        raise ValueError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0]})") from None
