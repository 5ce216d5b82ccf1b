"""Patchscopes (Ghandeharioun et al. 2024): decode a hidden state by patching it into an identity prompt.

For a source prompt P, block l's output at a source position i is written over block l's output
at the identity prompt's placeholder position (its last token by default), and the identity
prompt's next-token prediction at its last position is read. The default identity prompt,
``"cat -> cat\\n1135 -> 1135\\nhello -> hello\\n?"``, asks the model to repeat what it is given,
so the prediction says which token the patched state stands for. One row per block. (With that
default the next token after "?" is mostly " ->", the format's own continuation; an identity
prompt ending in "? ->" with ``placeholder=-2`` reads the repeated token instead: on the default
model " Paris" from block 0 to block 12 for "… Paris".)

The source states come from one lens trace of P (``explorer.analyses.lens.residual_streams``).
The patched runs are batched: every (block, position) pair is one row of a batch of identical
identity prompts (no padding needed), and a forward hook on each block writes the rows that
belong to it. Only the last position's logits are computed. At the last block the patched
state goes straight to the final norm, so that row equals the logit lens of the source state.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from explorer.analyses.lens import residual_streams
from explorer.core.errors import ExplorerError
from explorer.core.requests import build_request
from explorer.core.results import Result, array, sized
from explorer.core.session import ModelSession

DEFAULT_IDENTITY = "cat -> cat\n1135 -> 1135\nhello -> hello\n?"


class PatchscopeError(ExplorerError):
    """Positions or options a patchscope cannot use."""


@dataclass(frozen=True)
class PatchscopeRequest:
    """``positions`` None = every position of the prompt; negative positions count from the end."""

    prompt: str
    positions: tuple[int, ...] | None = None
    identity: str = DEFAULT_IDENTITY
    placeholder: int = -1
    top_k: int = 10
    batch_size: int = 64


@dataclass(frozen=True, eq=False)
class PatchscopeResult(Result):
    """Arrays are [L, P(, k)]: block l, source position ``positions[p]``."""

    request: PatchscopeRequest
    model: str
    tokens: np.ndarray = array("T", "str")              # the source prompt's tokens
    positions: np.ndarray = array("P", "int64")         # non-negative
    layer_labels: tuple[str, ...] = sized("L")          # "L0" … one per block
    identity_tokens: np.ndarray = array("Ti", "str")
    placeholder: int                                    # non-negative position in the identity prompt
    top_ids: np.ndarray = array("L P k", "int64")
    top_tokens: np.ndarray = array("L P k", "str")
    top_probs: np.ndarray = array("L P k", "float32")

    def relations(self) -> str | None:
        if np.any(self.positions >= len(self.tokens)) or np.any(self.positions < 0):
            return "a source position lies outside the prompt"
        return None

    def summary(self, column: int = 0) -> dict:
        """The ``patchscope --json`` object for one source position (a column)."""
        return {"layers": list(self.layer_labels),
                "top_tokens": [[str(t) for t in row] for row in self.top_tokens[:, column]],
                "top_probs": [[float(p) for p in row] for row in self.top_probs[:, column]],
                "position": int(self.positions[column]), "token": str(self.tokens[self.positions[column]]),
                "identity": self.request.identity, "model": self.model}


def _resolve(position: int, length: int, what: str) -> int:
    p = position + length if position < 0 else position
    if not 0 <= p < length:
        raise PatchscopeError(f"{what} {position} is outside the {length} tokens (use 0..{length - 1} "
                              f"or a negative count from the end)")
    return p


def patch_states(session: ModelSession, identity_ids: torch.Tensor, placeholder: int,
                 layers: list[int], states: torch.Tensor) -> torch.Tensor:
    """Next-token logits [B, V] of the identity prompt with block ``layers[b]``'s output at
    ``placeholder`` replaced by ``states[b]`` (one batch row per b)."""
    B = len(layers)
    ids = identity_ids[None].expand(B, -1).to(session.device)
    layer_t = torch.tensor(layers)
    values = states.to(session.device, session.dtype)

    def hook(layer: int):
        rows = torch.nonzero(layer_t == layer)[:, 0]
        if len(rows) == 0:
            return None
        rows_dev = rows.to(session.device)

        def on_output(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            h = h.clone()
            # a sharded model's block may sit on another device than the inputs
            h[rows_dev.to(h.device), placeholder] = values[rows_dev].to(h.device)
            return (h, *output[1:]) if isinstance(output, tuple) else h
        return on_output

    handles = []
    with torch.no_grad(), session.lock:
        try:
            for layer, block in enumerate(session.hf_blocks()):
                fn = hook(layer)
                if fn is not None:
                    handles.append(block.register_forward_hook(fn))
            return session.hf(input_ids=ids, logits_to_keep=1).logits[:, -1].float()
        finally:
            for h in handles:
                h.remove()


def patchscope(session: ModelSession, request: PatchscopeRequest | None = None, /, *, ctx=None,
               **fields) -> PatchscopeResult:
    """The identity prompt's next-token top-k with each block's state of the prompt patched in.

    >>> from explorer import patchscope
    >>> r = patchscope(session, "The capital of France is", positions=(-1,), top_k=3)
    >>> r.top_tokens.shape == (session.n_layers, 1, 3)
    True
    """
    session.require_local("Patchscope")
    request = build_request(PatchscopeRequest, request, fields)
    vocab = session.unembed_weight().shape[0]
    if not 1 <= request.top_k <= min(100, vocab):
        raise PatchscopeError(f"top-k must be between 1 and 100, got {request.top_k}")
    if request.batch_size < 1:
        raise PatchscopeError(f"batch size must be at least 1, got {request.batch_size}")
    src = session.encode(request.prompt)
    try:
        ident = session.encode(request.identity)
    except ExplorerError as e:
        raise PatchscopeError(f"identity prompt: {e}") from None
    T = len(src)
    positions = tuple(range(T)) if request.positions is None else request.positions
    if not positions:
        raise PatchscopeError("no source position given")
    resolved = [_resolve(p, T, "position") for p in positions]
    placeholder = _resolve(request.placeholder, len(ident), "placeholder position")
    (stream,) = residual_streams(session, [src])                       # [R, T, d]; row 0 = embeddings
    L = session.n_layers
    jobs = [(layer, j) for layer in range(L) for j in range(len(resolved))]
    top_ids = torch.empty(L, len(resolved), request.top_k, dtype=torch.long)
    top_probs = torch.empty(L, len(resolved), request.top_k, dtype=torch.float32)
    for start in range(0, len(jobs), request.batch_size):
        if ctx is not None and ctx.cancelled:
            raise PatchscopeError("cancelled")
        chunk = jobs[start:start + request.batch_size]
        layers = [layer for layer, _ in chunk]
        states = torch.stack([stream[layer + 1, resolved[j]] for layer, j in chunk])
        probs = patch_states(session, ident, placeholder, layers, states).softmax(-1)
        p, i = probs.topk(request.top_k, dim=-1)
        for row, (layer, j) in enumerate(chunk):
            top_ids[layer, j], top_probs[layer, j] = i[row].cpu(), p[row].cpu()
        if ctx is not None:
            ctx.report(min(start + request.batch_size, len(jobs)), len(jobs), message="patching")
    ids_np = top_ids.numpy()
    return PatchscopeResult(
        request=request, model=session.name, tokens=session.decode_each(src.numpy()),
        positions=np.array(resolved, dtype=np.int64), layer_labels=tuple(f"L{i}" for i in range(L)),
        identity_tokens=session.decode_each(ident.numpy()), placeholder=placeholder, top_ids=ids_np,
        top_tokens=session.decode_each(ids_np), top_probs=top_probs.numpy(),
    )
