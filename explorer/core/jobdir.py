"""A resumable job's directory: a manifest, atomic checkpoints, and the check that a restart
continues the same job.

Long jobs that write to disk (the neuron index build, the intervention run, SAE training) keep
their state in a directory so that a cancelled, killed or failed job resumes where its last
checkpoint left it and ends exactly as an uninterrupted one:

- the **manifest** (a JSON file; the job names it) says what the job is (``kind`` and the
  settings that must not change between runs of it), its status and progress; it is rewritten
  atomically, so it is always complete;
- **checkpoints** are directories ``step-NNNNNN`` under a ``checkpoints`` folder; each is written
  under a temporary name and renamed into place, so a listed checkpoint is always complete;
- the **resume check** compares the saved manifest with the settings of the job asked for now
  and names what differs (``differences``), so a directory is never continued with other settings.

>>> import tempfile
>>> job = JobDir(tempfile.mkdtemp(), manifest="run.json")
>>> job.read() is None                     # a new job
True
>>> job.write({"kind": "demo", "settings": {"lr": 0.1}, "status": "running"})
>>> with job.checkpoints().new(5) as d:   # written under a temporary name, then renamed
...     _ = (d / "state.json").write_text("{}")
>>> [step for step, _ in job.checkpoints().list()]
[5]
>>> JobDir.differences(job.read()["settings"], {"lr": 0.2})
['lr']
"""
from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from explorer.core.errors import ExplorerError
from explorer.core.files import atomic_dir, atomic_write_json, remove_temporaries

_STEP = re.compile(r"^step-(\d+)$")


class JobDirError(ExplorerError):
    """A job directory whose manifest cannot be read."""


def step_name(step: int) -> str:
    """The directory name of the checkpoint at ``step``: ``step-000040``."""
    return f"step-{step:06d}"


def step_of(path: str | Path) -> int | None:
    """The step of a checkpoint directory (None when the name is not ``step-N``)."""
    m = _STEP.match(Path(path).name)
    return int(m.group(1)) if m else None


class Checkpoints:
    """The complete checkpoints in one folder, by step."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def list(self) -> list[tuple[int, Path]]:
        """(step, directory) of every complete checkpoint, oldest first."""
        if not self.root.is_dir():
            return []
        found = [(step_of(p), p) for p in self.root.iterdir() if p.is_dir()]
        return sorted((s, p) for s, p in found if s is not None)

    def steps(self) -> set[int]:
        return {s for s, _ in self.list()}

    def latest(self) -> tuple[int, Path] | None:
        """The newest complete checkpoint, or None."""
        found = self.list()
        return found[-1] if found else None

    def path(self, step: int) -> Path:
        return self.root / step_name(step)

    @contextmanager
    def new(self, step: int, *, replace: bool = False) -> Iterator[Path]:
        """A directory to write the checkpoint of ``step`` into; it appears under its name
        (``path(step)``) only when the block ends without error."""
        with atomic_dir(self.path(step), replace=replace) as tmp:
            yield tmp

    def drop(self, *, after: int | None = None, before: int | None = None) -> None:
        """Remove the checkpoints later than ``after`` / earlier than ``before``."""
        for step, path in self.list():
            if (after is not None and step > after) or (before is not None and step < before):
                shutil.rmtree(path)

    def clean(self) -> None:
        """Remove what a checkpoint interrupted mid-write left behind."""
        remove_temporaries(self.root)


class JobDir:
    """One job's directory: its manifest (JSON, written atomically) and its checkpoints."""

    def __init__(self, path: str | Path, manifest: str = "manifest.json") -> None:
        self.path = Path(path).expanduser()
        self.manifest_path = self.path / manifest

    def exists(self) -> bool:
        return self.manifest_path.exists()

    def read(self) -> dict | None:
        """The saved manifest, or None when the directory holds none."""
        if not self.manifest_path.exists():
            return None
        try:
            data = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise JobDirError(f"{self.manifest_path} is not readable ({e}); delete the directory "
                              "or choose another one") from None
        if not isinstance(data, dict):
            raise JobDirError(f"{self.manifest_path} does not hold a JSON object")
        return data

    def write(self, manifest: Mapping[str, Any], **dumps: Any) -> None:
        """Replace the manifest atomically (the directory is created when missing)."""
        atomic_write_json(self.manifest_path, dict(manifest), **{"indent": 1, "allow_nan": False, **dumps})

    def update(self, **changes: Any) -> dict:
        """Rewrite the manifest with some entries changed (status, progress, ...); returns it."""
        data = {**(self.read() or {}), **changes}
        self.write(data)
        return data

    def checkpoints(self, under: str | Path = "") -> Checkpoints:
        """The checkpoints folder ``<dir>/<under>/checkpoints``."""
        return Checkpoints(self.path / under / "checkpoints")

    @staticmethod
    def differences(saved: Mapping[str, Any], current: Mapping[str, Any],
                    ignore: Iterable[str] = ()) -> list[str]:
        """The names whose saved and current values differ (those in ``ignore`` may differ):
        what would make a restart continue another job than the one asked for."""
        skip = set(ignore)
        keys = [k for k in dict.fromkeys([*saved, *current]) if k not in skip]
        return [k for k in keys if saved.get(k) != current.get(k)]
