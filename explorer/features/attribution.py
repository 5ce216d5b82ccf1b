"""Attribution of a target logit to SAE features: activation × gradient, per position and in total.

The prompt runs through the whole model with the SAE spliced in at its site *with its error
term*: the site's output becomes ``decode(f) + (x − decode(f))`` where the error is a constant,
so the forward pass is the model's own (to float rounding) while the target logit at the last
position becomes a function of the feature activations ``f``. One backward pass gives
∂logit/∂f; a feature's attribution at a position is ``f · ∂logit/∂f`` there, the first-order
estimate of how much the logit falls when that feature is zeroed at that position (Marks et al.
2024, "Sparse feature circuits"; the same activation × gradient as attribution patching). The
result ranks features by their total over positions (by absolute value) and keeps, for the top
ones, every position's attribution (a heatmap).

A transcoder (MLP input → MLP output) is spliced in the same way at its MLP: the features are
encoded from the MLP's input and the MLP's output becomes ``decode(f) + (out − decode(f))``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from explorer.core.jobs import JobContext
from explorer.core.requests import build_request
from explorer.core.results import Result, array
from explorer.features.encode import open_sae
from explorer.features.harvest import site_module
from explorer.features.sae import MLP_IN, SAEError
from explorer.interventions.edits import mlp_input


@dataclass(frozen=True)
class AttributionRequest:
    """A prompt, the SAE, the target token (None: the model's top-1 at the last position)."""

    prompt: str
    sae: str = ""
    target: str | None = None
    top_n: int = 20
    any_model: bool = False


@dataclass(frozen=True, eq=False)
class FeatureAttribution(Result):
    """The ``top_n`` features by |total attribution| to the target logit, and per position."""

    prompt: str
    sae: str
    layer: int
    site: str
    target: str
    target_id: int
    logit: float                  # the target's logit at the last position
    token_ids: np.ndarray = array("T", "int64")
    tokens: np.ndarray = array("T", "str")
    features: np.ndarray = array("N", "int64")        # ranked by |total|
    totals: np.ndarray = array("N", "float64")        # Σ over positions of activation × gradient
    per_position: np.ndarray = array("T N", "float64")
    activations: np.ndarray = array("T N", "float32")


def feature_attribution(session, request: AttributionRequest | str | None = None, /, *,
                        ctx: JobContext | None = None, **fields: Any) -> FeatureAttribution:
    """Attribute the target logit at the last position to the SAE's features (module docstring).

    >>> from explorer.features.attribution import feature_attribution
    >>> from explorer.features.train import train_sae
    >>> _ = train_sae(session, layer=3, width=64, k=4, max_tokens=2048, window=64, batch=256,
    ...               batch_windows=8, eval_windows=2, out_dir="sae")
    >>> att = feature_attribution(session, "The capital of France is", sae="sae", target=" Paris", top_n=5)
    >>> att.target, att.features.shape, att.per_position.shape
    (' Paris', (5,), (5, 5))
    """
    session.require_local("SAE feature attribution")
    request = build_request(AttributionRequest, request, fields)
    if not request.sae:
        raise SAEError("no SAE given: pass the directory of an SAE in the SAELens layout")
    if request.top_n < 1:
        raise SAEError(f"top_n must be ≥ 1, got {request.top_n}")
    sae = open_sae(session, request.sae, any_model=request.any_model)
    layer, site = sae.cfg.site
    ids = session.encode(request.prompt)
    # a transcoder reads the MLP's input and writes its output: splice at the MLP module
    module = site_module(session, layer, "mlp_out" if site == MLP_IN else site)
    held: dict[str, torch.Tensor] = {}

    def hook(_module, args, kwargs, out):
        x = out[0] if isinstance(out, tuple) else out
        read = mlp_input(args, kwargs) if site == MLP_IN else x
        f = sae.encode(read[0].detach().float()).detach().requires_grad_(True)
        recon = sae.decode(f, read[0].detach().float())
        error = (x[0].detach().float() - recon).detach()
        y = (recon + error).to(x.dtype)[None]
        held["f"] = f
        return (y, *out[1:]) if isinstance(out, tuple) else y

    with session.lock, torch.enable_grad():
        handle = module.register_forward_hook(hook, with_kwargs=True)
        try:
            logits = session.hf(ids[None].to(session.device)).logits[0, -1].float()
        finally:
            handle.remove()
        if request.target is None:
            tid = int(logits.argmax())
        else:
            tid = session.token_id(request.target)
        logit = logits[tid]
        (grad,) = torch.autograd.grad(logit, [held["f"]])
    f = held["f"].detach()
    att = (f * grad).double()                       # [T, d_sae]
    totals = att.sum(0)
    n = min(request.top_n, sae.d_sae)
    order = totals.abs().topk(n).indices
    return FeatureAttribution(
        prompt=request.prompt, sae=str(request.sae), layer=layer, site=site,
        target=str(session.decode_each([tid])[0]), target_id=tid, logit=float(logit.detach()),
        token_ids=ids.numpy().astype(np.int64), tokens=np.array(session.decode_each(ids.numpy()).tolist(), dtype=str),
        features=order.cpu().numpy().astype(np.int64), totals=totals[order].cpu().numpy(),
        per_position=att[:, order].cpu().numpy(), activations=f[:, order].cpu().numpy().astype(np.float32))
