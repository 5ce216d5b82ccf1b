"""Activations at one site of a model, with the forward pass stopped right after it; splicing.

Sites (``explorer.features.sae.SITES``): ``resid``, the output of block ``layer`` (the residual
stream after it: SAELens's ``blocks.L.hook_resid_post``), and ``mlp_out``, the output of block
``layer``'s MLP module (``blocks.L.hook_mlp_out``); a transcoder reads ``mlp_in``, the MLP
module's input (after the block's pre-MLP norm: ``blocks.L.ln2.hook_normalized``), and is trained
on (``mlp_in``, ``mlp_out``) pairs of one pass (``stream_pairs``). As in the neuron index
(``explorer.neurons.index``), a plain forward hook on the site's module takes its output and
raises to end the pass there: the later blocks, the final norm and the unembedding never run.
Plain torch hooks, not an nnsight trace (which routes every module through its interleaver, for
nothing a read-only pass needs); they exist only while ``session.lock`` is held.

``stream_activations`` streams a corpus in batches of windows and yields each batch's
activations as it is computed (nothing else is kept). ``spliced`` replaces the site's output with
a function of it for the forward passes inside the block (the SAE's reconstruction, for the
Δ LM loss; ``spliced_mlp`` replaces the MLP's output with a function of its input, for a
transcoder); ``lm_loss`` is the mean next-token cross-entropy.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import numpy as np
import torch

from explorer.core.corpus import Window, batched
from explorer.features.sae import MLP_IN, SITES, SAEError
from explorer.interventions.edits import mlp_input


class _Stop(Exception):
    """Raised at the site: the rest of the forward pass is not needed."""


def site_module(session, layer: int, site: str) -> torch.nn.Module:
    """The module whose output is the site (block ``layer``, or its MLP; ``mlp_in``: the MLP,
    whose input is the site)."""
    if site not in SITES and site != MLP_IN:
        raise SAEError(f"unknown site {site!r} (use {', '.join(SITES + (MLP_IN,))})")
    if not 0 <= layer < session.n_layers:
        raise SAEError(f"layer {layer} is out of range: the model has layers 0..{session.n_layers - 1}")
    block = session.hf_blocks()[layer]
    return block if site == "resid" else block.get_submodule(session.adapter.mlp)


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The MLP call's hidden states (``mlp_input``), or an error when it had no tensor input."""
    x = mlp_input(args, kwargs)
    if x is None:
        raise SAEError("the MLP was called without a tensor input")
    return x


def _read(session, ids: torch.Tensor, layer: int, module: torch.nn.Module, what: str, take) -> tuple:
    got: list = []

    def hook(_module, args, kwargs, out):
        got.append(take(args, kwargs, out))
        raise _Stop

    with torch.no_grad(), session.lock:
        handle = module.register_forward_hook(hook, with_kwargs=True)
        try:
            session.hf(ids.to(session.device))
        except _Stop:
            pass
        finally:
            handle.remove()
    if not got:
        raise SAEError(f"the forward pass never reached layer {layer}'s {what}")
    return got[0]


def activations(session, ids: torch.Tensor, layer: int, site: str) -> torch.Tensor:
    """The site's activations [B, T, d_model] (the model's dtype, on its device) for token ids
    [B, T]; the forward stops right after the site."""
    module = site_module(session, layer, site)
    if site == MLP_IN:
        return _read(session, ids, layer, module, site, lambda a, kw, out: _input(a, kw))
    return _read(session, ids, layer, module, site, lambda a, kw, out: _first(out))


def mlp_pairs(session, ids: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(MLP input, MLP output) of block ``layer``, each [B, T, d_model], from one pass stopped
    right after the MLP: a transcoder's (input, target)."""
    module = site_module(session, layer, "mlp_out")
    return _read(session, ids, layer, module, "MLP", lambda a, kw, out: (_input(a, kw), _first(out)))


def stream_activations(session, windows: Iterable[Window], layer: int, site: str,
                       batch_windows: int) -> Iterator[tuple[list[Window], torch.Tensor]]:
    """(windows, activations [B, W, d_model]) for each batch of ``batch_windows`` windows."""
    for batch in batched(windows, batch_windows):
        ids = torch.from_numpy(np.stack([w.ids for w in batch]))
        yield batch, activations(session, ids, layer, site)


@contextmanager
def spliced_mlp(session, layer: int, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Inside the block, block ``layer``'s MLP output is replaced by ``fn(mlp_input, mlp_output)``
    (cast back to the output's dtype): a transcoder spliced in. Hold ``session.lock`` around it."""
    module = site_module(session, layer, "mlp_out")

    def hook(_module, args, kwargs, out):
        x = _first(out)
        y = fn(_input(args, kwargs), x).to(x.dtype)
        return (y, *out[1:]) if isinstance(out, tuple) else y

    handle = module.register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def spliced(session, layer: int, site: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Inside the block, forward passes of ``session.hf`` have the site's output replaced by
    ``fn(output)`` (cast back to the output's dtype). Hold ``session.lock`` around it."""
    if site == MLP_IN:
        raise SAEError("an MLP's input is not spliced; a transcoder replaces the MLP's output (spliced_mlp)")
    module = site_module(session, layer, site)

    def hook(_module, _args, out):
        x = _first(out)
        y = fn(x).to(x.dtype)
        return (y, *out[1:]) if isinstance(out, tuple) else y

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def lm_loss(session, ids: torch.Tensor) -> float:
    """Mean next-token cross-entropy (nats) of token ids [B, T] over all B·(T−1) predictions."""
    with torch.no_grad(), session.lock:
        logits = session.hf(ids.to(session.device)).logits.float()
    return float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                   ids[:, 1:].reshape(-1).to(logits.device)))
