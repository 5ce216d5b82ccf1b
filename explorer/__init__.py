"""Interp Explorer engine: model attachment, analyses, results. Never imports panel or bokeh."""
from .errors import ExplorerError
from .lens import CompareRequest, LensComparison, LensRequest, LensResult, compare_prompts, logit_lens
from .session import ModelInfo, ModelSession

__all__ = [
    "CompareRequest", "ExplorerError", "LensComparison", "LensRequest", "LensResult",
    "ModelInfo", "ModelSession", "compare_prompts", "logit_lens",
]
