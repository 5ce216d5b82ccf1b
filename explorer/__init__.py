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
    **{name: "analyses.probes" for name in ("ProbeRequest", "ProbeResult", "run_probes")},
    **{name: "analyses.ccs" for name in ("CCSRequest", "CCSResult", "run_ccs")},
    **{name: "analyses.patchscope" for name in ("PatchscopeRequest", "PatchscopeResult", "patchscope")},
    **{name: "analyses.hidden" for name in ("HiddenRequest", "HiddenStates", "collect_hidden")},
    **{name: "training.bias_datasets" for name in ("BiasDatasetRequest", "BiasDatasetResult", "bias_dataset")},
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'explorer' has no attribute {name!r}")
