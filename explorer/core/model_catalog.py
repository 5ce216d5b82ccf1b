"""Which models can be attached from this machine, found without loading them or the network.

Three places are looked at: folders the user names (a model directory, or a folder of them),
the project's own model cache (where the embedded default is converted), and the local Hugging
Face hub cache (``models--org--name/snapshots/<revision>/config.json``). Only ``config.json``
is read: a model whose ``model_type`` has no adapter is listed with a note, not hidden.

>>> choices = local_models(hf_cache="/nonexistent", include_project_cache=False)
>>> choices
()
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from explorer.core.adapters import ADAPTERS

SOURCES = ("folder", "project", "hf-cache")


@dataclass(frozen=True)
class ModelChoice:
    """One model the picker offers: ``family`` is its adapter's family, None when unsupported."""

    name: str
    path: str
    source: str  # one of SOURCES
    model_type: str
    family: str | None
    note: str = ""  # why it cannot be attached (empty when it can)

    @property
    def supported(self) -> bool:
        return self.family is not None

    def to_dict(self) -> dict:
        return {**asdict(self), "supported": self.supported}


def hf_cache_dir() -> Path:
    """The local Hugging Face hub cache: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
    ``~/.cache/huggingface/hub`` (read from the environment now, not at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(home).expanduser() / "hub"


def describe_dir(path: str | Path, name: str | None = None, source: str = "folder") -> ModelChoice | None:
    """A model directory as a choice (None when it has no config.json)."""
    path = Path(path).expanduser()
    config = path / "config.json"
    if not config.is_file():
        return None
    name = name or path.resolve().name
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return ModelChoice(name, str(path), source, "?", None, f"config.json unreadable ({type(e).__name__})")
    model_type = str(data.get("model_type", "?")) if isinstance(data, dict) else "?"
    adapter = ADAPTERS.get(model_type)
    if adapter is None:
        return ModelChoice(name, str(path), source, model_type, None,
                           f"no adapter for model type '{model_type}'")
    return ModelChoice(name, str(path), source, model_type, adapter.family)


def scan_folder(folder: str | Path, source: str = "folder") -> list[ModelChoice]:
    """The folder itself when it is a model directory, else its model subdirectories (sorted)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        return []
    itself = describe_dir(folder, source=source)
    if itself is not None:
        return [itself]
    found = []
    for sub in sorted(folder.iterdir()):
        if sub.is_dir() and not sub.name.startswith("."):
            choice = describe_dir(sub, source=source)
            if choice is not None:
                found.append(choice)
    return found


def _hf_snapshot(repo: Path) -> Path | None:
    """The revision of a cached repo to offer: the one ``refs/main`` names, else the newest."""
    snapshots = repo / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = repo / "refs" / "main"
    if ref.is_file():
        main = snapshots / ref.read_text(encoding="utf-8").strip()
        if (main / "config.json").is_file():
            return main
    revisions = [d for d in snapshots.iterdir() if (d / "config.json").is_file()]
    return max(revisions, key=lambda d: d.stat().st_mtime) if revisions else None


def scan_hf_cache(root: str | Path | None = None) -> list[ModelChoice]:
    """Models in a Hugging Face hub cache (``hf_cache_dir()`` by default) that hold a config.json,
    named ``org/name``; only the file system is read."""
    root = Path(root).expanduser() if root is not None else hf_cache_dir()
    if not root.is_dir():
        return []
    found = []
    for repo in sorted(root.glob("models--*")):
        snapshot = _hf_snapshot(repo) if repo.is_dir() else None
        if snapshot is not None:
            name = repo.name[len("models--"):].replace("--", "/")
            choice = describe_dir(snapshot, name=name, source="hf-cache")
            if choice is not None:
                found.append(choice)
    return found


def local_models(extra_dirs: tuple[str | Path, ...] | list = (), *, hf_cache: str | Path | None = None,
                 include_project_cache: bool = True) -> tuple[ModelChoice, ...]:
    """Every model the picker offers: the named folders, the project's model cache (the embedded
    default's), then the HF hub cache; one entry per directory."""
    found: list[ModelChoice] = []
    for folder in extra_dirs:
        found += scan_folder(folder)
    if include_project_cache:
        from explorer.core.defaults import default_model_dir

        found += scan_folder(default_model_dir().parent, source="project")
    found += scan_hf_cache(hf_cache)
    seen: set[str] = set()
    unique = []
    for choice in found:
        key = str(Path(choice.path).resolve())
        if key not in seen:
            seen.add(key)
            unique.append(choice)
    return tuple(unique)


__all__ = ["ModelChoice", "SOURCES", "describe_dir", "hf_cache_dir", "local_models", "scan_folder",
           "scan_hf_cache"]
