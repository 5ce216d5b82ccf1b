"""Interp Explorer engine: model attachment, analyses, results. Never imports panel or bokeh.

Names are imported lazily so that light commands (``python -m explorer setup``) start fast.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "ExplorerError": "core.errors",
    "ModelInfo": "core.session",
    "ModelSession": "core.session",
    "CompareRequest": "analyses.lens",
    "LensComparison": "analyses.lens",
    "LensRequest": "analyses.lens",
    "LensResult": "analyses.lens",
    "compare_prompts": "analyses.lens",
    "logit_lens": "analyses.lens",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'explorer' has no attribute {name!r}")
