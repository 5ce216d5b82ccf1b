"""From the residual stream to logits: the final norm, the unembedding matrix W_U and its bias.

``Unembedding`` is the one place that turns hidden states into logits for every analysis (the
logit lens, ablation and patching replays, the demonstrations' label logits, direct logit
attribution, the explainer's rating tokens, the bias probes). A family whose final logits are
transformed after the unembedding (Gemma's final-logit soft-capping, ``cap·tanh(z/cap)``)
changes ``logits`` here and nowhere else (``cap``). ``rows`` gives the raw W_U rows and biases
for analyses that decompose the pre-transform logit into linear parts (DLA).
"""
from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from explorer.core.adapters import Adapter, adapter_for
from explorer.core.errors import UnsupportedModelError
from explorer.core.placement import execution_device, is_offloaded, materialized


class Unembedding:
    """Residual-stream vectors → logits for one model (a Hugging Face causal LM).

    ``final_norm`` is the module applied before the unembedding (None when the hidden states
    given are already normed, e.g. a base model's ``last_hidden_state``); ``lock`` guards calls
    of the norm (see ``norm``).
    """

    def __init__(self, unembed: torch.nn.Module, final_norm: torch.nn.Module | None = None,
                 lock: threading.RLock | None = None, softcap: float | None = None) -> None:
        if getattr(unembed, "weight", None) is None:
            raise UnsupportedModelError(f"the unembedding {type(unembed).__name__} has no weight matrix")
        if softcap is not None and not softcap > 0:
            raise UnsupportedModelError(f"the final-logit soft-cap must be positive, got {softcap}")
        self.unembed = unembed
        self.final_norm = final_norm
        self.softcap = None if softcap is None else float(softcap)
        self.lock = lock if lock is not None else threading.RLock()
        self._cast: dict[torch.dtype, torch.Tensor] = {}

    @classmethod
    def of(cls, model, adapter: Adapter | None = None, lock: threading.RLock | None = None) -> Unembedding:
        """The unembedding of a model, from its family's adapter (found from its config when not
        given); a model of no known family gets its output embeddings without a final norm."""
        if adapter is None:
            try:
                adapter = adapter_for(getattr(model.config, "model_type", "?"))
            except UnsupportedModelError:
                return cls(model.get_output_embeddings(), None, lock)
        softcap = getattr(model.config, adapter.logit_softcap, None) if adapter.logit_softcap else None
        return cls(model.get_submodule(adapter.unembed), model.get_submodule(adapter.final_norm), lock,
                   softcap=softcap)

    # ------------------------------------------------------------------ parts
    @property
    def device(self) -> torch.device:
        """Where the logits are computed (the unembedding's execution device)."""
        return execution_device(self.unembed)

    @property
    def offloaded(self) -> bool:
        """W_U lives on the CPU or disk between forwards (accelerate offload): ``weight`` is then
        a ``meta`` tensor (its shape is right) and ``logits``/``rows`` load it for each call."""
        return is_offloaded(self.unembed)

    @contextmanager
    def _readout(self, dtype: torch.dtype | None) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """(W_U, bias) as real tensors on the execution device for the duration of the context."""
        if not self.offloaded:
            yield self.weight(dtype), self.bias()
            return
        with self.lock, materialized(self.unembed):
            weight = self.unembed.weight
            # A cast of an offloaded W_U is not kept: that would hold the copy offloading saves.
            yield weight if dtype is None else weight.to(dtype), self.bias()

    def weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W_U [vocab, d_model], optionally cast once and kept (e.g. bfloat16 for a faster lens).

        Offloaded: the ``meta`` placeholder (shape only); use ``logits`` or ``rows``."""
        weight = self.unembed.weight
        if weight.device.type == "meta":
            return weight
        if dtype is None or dtype == weight.dtype:
            return weight
        if dtype not in self._cast:
            self._cast[dtype] = weight.detach().to(dtype)
        return self._cast[dtype]

    def bias(self) -> torch.Tensor | None:
        return getattr(self.unembed, "bias", None)

    @property
    def vocab_size(self) -> int:
        return int(self.unembed.weight.shape[0])

    def rows(self, tokens: int | Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The W_U rows and bias entries of some tokens (the raw linear readout, before any
        transform ``logits`` applies): for decompositions of a logit into parts."""
        idx = torch.as_tensor(tokens, device=self.device)
        with self._readout(None) as (weight, bias):
            return weight[idx].clone(), None if bias is None else bias[idx].clone()

    def norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """The final norm of residual-stream vectors (outside a trace).

        Under the lock: nnsight hooks the module, so a call while another thread's trace runs
        would be taken as that trace's forward reaching the norm (an OutOfOrderError there).
        """
        if self.final_norm is None:
            return hidden
        with self.lock:
            return self.final_norm(hidden)  # offloaded or sharded: its accelerate hook places it

    def cap(self, logits: torch.Tensor) -> torch.Tensor:
        """The family's transform of float32 logits after the unembedding (Gemma 2's soft-cap
        ``cap·tanh(z/cap)``; nothing for most families): in place, unless gradients flow."""
        if self.softcap is None:
            return logits
        if logits.requires_grad:  # attribution patching differentiates through the cap
            return torch.tanh(logits / self.softcap) * self.softcap
        return logits.div_(self.softcap).tanh_().mul_(self.softcap)

    # ----------------------------------------------------------------- logits
    def logits(self, hidden: torch.Tensor, *, tokens: Sequence[int] | torch.Tensor | None = None,
               dtype: torch.dtype | None = None, out: torch.Tensor | None = None,
               normed: bool = False) -> torch.Tensor:
        """Float32 logits [..., vocab] of residual-stream vectors ``hidden`` [..., d_model].

        ``normed``: ``hidden`` has been through the final norm already. ``tokens``: only these
        tokens' logits [..., len(tokens)] (only their W_U rows are read). ``dtype``: the matmul's
        precision (W_U cast once; the result is float32 either way). ``out``: a float32 buffer
        [n, vocab] for 2-d ``hidden`` to write into (no fresh vocabulary-sized allocation).
        """
        x = hidden if normed else self.norm(hidden)
        if tokens is not None:
            weight, bias = self.rows(tokens)
            z = x.to(weight.device, weight.dtype) @ weight.t()
            return self.cap((z if bias is None else z + bias).float())
        with self._readout(dtype) as (weight, bias):
            bias = None if bias is None else bias.to(weight.dtype)
            x = x.to(weight.device, weight.dtype)  # a sharded model's final norm may sit elsewhere
            if out is not None and weight.dtype == out.dtype and out.device == weight.device:
                if bias is None:
                    return self.cap(torch.mm(x, weight.t(), out=out))
                return self.cap(torch.addmm(bias, x, weight.t(), out=out))
            logits = F.linear(x, weight, bias).float()
        if out is None:
            return self.cap(logits)
        return self.cap(out.copy_(logits))  # a reduced-precision matmul; the reductions stay in float32
