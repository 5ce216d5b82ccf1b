"""A session's history: every result computed, in order, with a label. Snapshots store it.

One history per user session (a browser tab, a notebook); the model session is shared, the
history is not, so results never leak between users.
"""
from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable

from explorer.core.results import Result
from explorer.persistence.snapshot import Entry


class History:
    """An append-only, thread-safe list of labelled results with change listeners."""

    def __init__(self, entries: list[Entry] | tuple[Entry, ...] = (), limit: int = 500) -> None:
        self._entries: list[Entry] = list(entries)
        self._lock = threading.Lock()
        self._listeners: list[Callable[[Entry], None]] = []
        self.closed = False  # a closed session's history: late results (a job ending) are not kept
        self.limit = limit  # oldest results drop off first: memory stays bounded in long sessions
        self.model = ""  # set once the session switches model: new labels then start "[model] "

    def add(self, result: Result, label: str | None = None) -> Entry:
        label = label or type(result).__name__
        with self._lock:
            if self.model:
                label = f"[{self.model}] {label}"
            entry = Entry(label, result)
            if self.closed:
                return entry
            if self._entries and self._entries[-1].result is result:
                return self._entries[-1]  # a cached result shown again is not a new entry
            self._entries.append(entry)
            del self._entries[: max(0, len(self._entries) - self.limit)]
            listeners = list(self._listeners)
        for listener in listeners:
            listener(entry)
        return entry

    def switch_model(self, old: str, new: str) -> None:
        """Label results by the model that made them from now on: entries kept so far (made with
        ``old`` when no switch came before) get ``[old]`` in front, later ones ``[new]``."""
        with self._lock:
            if not self.model:
                self._entries = [dataclasses.replace(e, label=f"[{old}] {e.label}") for e in self._entries]
            self.model = new

    def on_add(self, listener: Callable[[Entry], None]) -> None:
        with self._lock:
            self._listeners.append(listener)

    @property
    def entries(self) -> tuple[Entry, ...]:
        with self._lock:
            return tuple(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def close(self) -> None:
        """Drop every result and keep none added later (the session has gone)."""
        with self._lock:
            self.closed = True
            self._entries.clear()
            self._listeners.clear()
