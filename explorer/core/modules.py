"""Finding a model's parts: dotted module paths, and the sizes and weights of its projections.

The adapters (``explorer.core.adapters``) name each part by a dotted path from the model
(``model.layers``, ``mlp.down_proj``); ``submodule`` follows such a path through torch modules
and nnsight envoys alike, so every analysis resolves paths the same way.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is not imported here: the CLI checks arguments with these before loading it
    import torch


def submodule(root, path: str):
    """The module below ``root`` at a dotted ``path`` (numbers index module lists).

    Works on plain torch modules and on nnsight envoys (inside a trace).

    >>> import torch
    >>> layers = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Linear(2, 3))])
    >>> submodule(torch.nn.ModuleDict({"layers": layers}), "layers.0.0").out_features
    3
    """
    for part in path.split("."):
        root = root[int(part)] if part.isdigit() else getattr(root, part)
    return root


def is_conv1d(module) -> bool:
    """GPT-2's ``Conv1D``: a linear layer whose weight is stored [in, out]."""
    return type(module).__name__ == "Conv1D"


def in_features(module) -> int:
    """The input width of a linear projection (``Linear`` or GPT-2's ``Conv1D``)."""
    if hasattr(module, "in_features"):
        return int(module.in_features)
    if hasattr(module, "nx"):  # Conv1D
        return int(module.nx)
    return int(module.weight.shape[0] if is_conv1d(module) else module.weight.shape[-1])


def linear_weight(module) -> torch.Tensor:
    """A projection's weight as [out, in] (``Linear``'s layout), whatever its class."""
    return module.weight.t() if is_conv1d(module) else module.weight
