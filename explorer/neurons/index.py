"""Neuron index: top-activating and random examples and activation statistics of every MLP neuron.

A neuron is one input feature of a block's MLP down/out projection (``adapter.mlp_out``): the
activations that the projection reads. ``build_index`` streams a corpus in windows of ``window``
tokens (``explorer.core.corpus.token_windows``), runs the model on ``batch_windows`` windows per
forward pass and reduces each layer's neuron activations as the forward reaches them (the model
stops after the last layer's; nothing of a batch is kept but its reductions). On the model's
device it updates:

- **Top examples** (exact, running): an *example* is a window; its activation is the neuron's
  maximum over the window's tokens, at ``position`` (the first such token). Per neuron the
  ``top_k`` windows with the highest maxima are kept: each batch's per-window maxima are
  reduced with ``torch.topk`` and merged with the running top-k by a second ``topk``.
- **Random examples**: ``n_random`` windows chosen uniformly without replacement by bottom-k
  priority sampling: window ``i`` gets the seeded hash priority ``splitmix64(seed, i)`` and the
  windows with the smallest priorities are kept. The choice depends only on the seed and the
  windows, not on batching or on a restart. These windows are shared by all neurons; each neuron
  gets its own seeded random position in each of them (and the activation there).
- **Statistics**: firing frequency (share of tokens with activation > 0), mean, standard
  deviation and minimum over every token; maximum from the top example. **Quantiles** are
  approximate: a per-neuron histogram over a systematic 1-in-``hist_stride`` subsample of the
  tokens (positions ``0, s, 2s, …`` of each window) with fixed bins shared by every model:
  16 log-spaced bins per decade for |a| in [1e-3, 1e3] on each side of zero, one bin for
  |a| < 1e-3, and an underflow and an overflow bin; a quantile is linearly interpolated in its
  bin (bounded by the exact minimum and maximum), so its relative error is about ±8%.

**Units.** The neurons are one *unit source* (``UnitSource``): the arrays have one row per
indexed layer and one column per unit. ``build_index(..., source=...)`` indexes another source
with the same code and file format; ``explorer.features.units.SAEUnits`` is an SAE's latents at
its layer (one row), and its manifest adds a ``units`` entry (kind, layers, count, the SAE) that
the neuron index's manifest does not have, so neuron indexes are written exactly as before.
Readers take model layers (``NeuronIndex.layers``, ``row``); "neuron" in the names below means
any unit.

State is O(layers × neurons × (top_k + n_random + bins)), whatever the corpus size; the token
ids of the windows seen are appended to a work file on disk (4 bytes per token) so the kept
windows can be gathered at the end. Every ``checkpoint_seconds`` (or ``checkpoint_every``
batches, where set) the state is checkpointed in the build's job directory
(``explorer.core.jobdir``: written under a temporary name, then renamed); a build that is
cancelled, killed or fails resumes from its last checkpoint and ends with exactly the index an
uninterrupted build gives.

Files in the index directory (no pickle anywhere):

- ``manifest.json``: format, version, model (name, config hash, tokenizer path, layers, neurons,
  MLP site), corpus (path, size, hash of the first MiB, format, text field), settings, tokens
  and windows done, whether the build is complete.
- ``index.safetensors``: the arrays (see ``NeuronIndex``); the kept windows' token ids.
- ``vocab.json``: the decoded string of every token id in the kept windows, so the index is
  readable (tokens shown as text) without the model or its tokenizer.
- ``.work/``: while a build is incomplete, its job directory (``explorer.core.jobdir``):
  ``job.json`` (the build's key), ``checkpoints/step-N/state.safetensors`` (the state after
  N windows) and the token stream.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import nnsight
import numpy as np
import torch

from explorer.core.components import geometry
from explorer.core.corpus import CorpusError, batched, corpus_fingerprint, detect_format, iter_documents, token_windows
from explorer.core.errors import ExplorerError
from explorer.core.files import atomic_write_text, load_arrays, save_arrays
from explorer.core.jobdir import JobDir
from explorer.core.jobs import JobContext
from explorer.core.modules import submodule
from explorer.core.requests import build_request
from explorer.core.results import Result, array
from explorer.core.session import ModelSession

FORMAT = "interp-explorer-neuron-index"
VERSION = 1
QUANTILE_LEVELS = (0.001, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 0.999)
_BINS_PER_DECADE = 16
_DECADES = (-3, 3)
_MASK = (1 << 64) - 1
CHECKPOINT_FILE = "state.safetensors"  # in each checkpoint directory of an incomplete build


class IndexError_(ExplorerError):
    """A neuron index that is missing, malformed or does not match the model/corpus."""


NeuronIndexError = IndexError_


def hist_edges() -> np.ndarray:
    """The fixed histogram bin edges (float64, ascending): ±log-spaced, with a bin around zero."""
    lo, hi = _DECADES
    pos = np.logspace(lo, hi, (hi - lo) * _BINS_PER_DECADE + 1)
    return np.concatenate([-pos[::-1], pos])


def hist_bins(x: torch.Tensor) -> torch.Tensor:
    """Bin numbers (int64, 0 .. len(hist_edges())) of values; bin b holds (edges[b-1], edges[b]].

    Computed arithmetically from log10 (a few elementwise passes, several times faster than a
    binary search over the edges); values within float rounding of an edge may land in the
    neighbouring bin.
    """
    lo, hi = _DECADES
    per_side = (hi - lo) * _BINS_PER_DECADE        # log bins on each side of zero
    centre = per_side + 1                          # the bin (-10**lo, 10**lo]
    ax = x.abs()
    j = ax.clamp(10.0 ** lo, 10.0 ** hi).log10_().sub_(lo).mul_(_BINS_PER_DECADE).floor_()
    j = j.clamp_(max=per_side - 1)
    j = torch.where(ax > 10.0 ** hi, per_side, j)
    bins = torch.where(x > 0, j + (centre + 1), (centre - 1) - j)
    return torch.where(ax <= 10.0 ** lo, centre, bins).long()


@dataclass(frozen=True)
class IndexRequest:
    """What to index. ``corpus_path`` None is the default corpus; ``max_tokens`` None is all of it."""

    corpus_path: str | None = None
    max_tokens: int | None = 100_000
    window: int = 64
    top_k: int = 20
    n_random: int = 20
    batch_windows: int = 16
    corpus_format: str = "auto"
    text_field: str = "text"
    text_mode: str = "lines"
    split: str | None = None
    seed: int = 0
    hist_stride: int = 8
    # A checkpoint every ``checkpoint_seconds`` of building, or every ``checkpoint_every``
    # batches where set (neither changes the result): a killed build redoes at most that much.
    checkpoint_every: int | None = None
    checkpoint_seconds: float = 60.0
    fused: str = "auto"        # fuse the per-token statistics with torch.compile: auto / on / off


# ------------------------------------------------------------------------------ helpers
def _splitmix(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def window_priority(seed: int, window: int) -> int:
    """The seeded pseudo-random priority of a window (smallest ``n_random`` are sampled)."""
    return _splitmix(_splitmix(seed & _MASK) ^ window)


def random_positions(seed: int, window_index: int, n_layers: int, n_neurons: int, window: int) -> torch.Tensor:
    """The per-neuron random position in a sampled window: [L, N] int64, reproducible."""
    g = torch.Generator().manual_seed((window_priority(seed, window_index) >> 1) & ((1 << 62) - 1))
    return torch.randint(window, (n_layers, n_neurons), generator=g)


def neuron_activations(session, layers: list[int], ids: torch.Tensor) -> list[torch.Tensor]:
    """Neuron activations (the MLP out-projection's input) of some layers: [B, T, N] float32 each.

    ``ids`` is [B, T]; one nnsight trace, layers read in execution order. The model stops
    right after the last requested site (the later layers are never run).
    """
    blocks = session.blocks()
    order = sorted(set(layers))
    path = session.adapter.mlp_out
    saved: dict[int, Any] = {}
    x = ids.to(session.device)
    with torch.no_grad(), session.lock:
        with session.trace(x, logits_to_keep=1) as tracer:  # no ``session`` in here: see session.trace
            nnsight.save(saved)
            for layer in order:
                saved[layer] = submodule(blocks[layer], path).input.save()
            tracer.stop()
    return [saved[layer].detach().float() for layer in layers]


class UnitSource:
    """Where an index's units come from: the per-layer activations it reduces.

    The index's arrays have one row per entry of ``layers`` (model layers, in execution order)
    and ``n_units`` units per row. A source names, for each row, the module whose input
    (``read="input"``) or output (``"output"``) holds the site, and turns that tensor into unit
    activations [B, T, n_units] (``units``). ``NeuronUnits`` (the default) reads every layer's MLP
    neurons; ``explorer.features.units.SAEUnits`` an SAE's latents at its layer and site. A
    source that is not the neurons adds ``describe()`` to the manifest (and to the index's key).
    """

    kind = "neurons"
    unit_name = "neuron"
    read = "input"
    layers: tuple[int, ...] = ()
    n_units: int = 0

    def modules(self, session) -> list[torch.nn.Module]:
        """One module per row, in the order of ``layers``."""
        raise NotImplementedError

    def units(self, x: torch.Tensor) -> torch.Tensor:
        """Unit activations [B, T, n_units] of the site tensor ``x`` (on the index's device)."""
        return x

    def activations(self, session, layers: list[int], ids: torch.Tensor) -> list[torch.Tensor]:
        """Unit activations [B, T, n_units] float32 of ``layers`` for token ids [B, T] (re-reading
        stored examples; the pass may stop after the last site)."""
        raise NotImplementedError

    def describe(self) -> dict | None:
        """The manifest's ``units`` entry (None for the neurons: their manifest has none)."""
        return None

    def site_text(self, session) -> str:
        return f"{session.adapter.blocks}.<layer>.{session.adapter.mlp_out} input"


class NeuronUnits(UnitSource):
    """Every layer's MLP neurons: the input of each block's MLP out-projection."""

    def __init__(self, session) -> None:
        self.layers = tuple(range(session.n_layers))
        self.n_units = geometry(session).d_mlp

    def modules(self, session) -> list[torch.nn.Module]:
        return [blk.get_submodule(session.adapter.mlp_out) for blk in session.hf_blocks()]

    def activations(self, session, layers: list[int], ids: torch.Tensor) -> list[torch.Tensor]:
        return neuron_activations(session, layers, ids)


@dataclass(frozen=True, eq=False)
class PromptActivation(Result):
    """One neuron's activation at every token of a prompt."""

    prompt: str
    layer: int
    neuron: int
    token_ids: np.ndarray = array("T", "int64")
    tokens: np.ndarray = array("T", "str")          # each token decoded on its own
    activations: np.ndarray = array("T", "float32")


@dataclass(frozen=True)
class ActivationRequest:
    """One neuron (``layer``, ``neuron``, counted from 0) read on a prompt."""

    prompt: str
    layer: int = 0
    neuron: int = 0


def prompt_activation(session: ModelSession, request: ActivationRequest | str | None = None, /, *,
                      ctx: JobContext | None = None, **fields: Any) -> PromptActivation:
    """The activation of neuron ``neuron`` of block ``layer`` at every token of ``prompt``.

    >>> from explorer import prompt_activation
    >>> acts = prompt_activation(session, "The nurse said that", layer=3, neuron=17)
    >>> acts.tokens.tolist(), acts.activations.shape
    (['The', ' nurse', ' said', ' that'], (4,))
    """
    request = build_request(ActivationRequest, request, fields)
    prompt, layer, neuron = request.prompt, request.layer, request.neuron
    n_layers, d_mlp = session.n_layers, geometry(session).d_mlp
    if not 0 <= layer < n_layers:
        raise IndexError_(f"layer {layer} is out of range: the model has layers 0..{n_layers - 1}")
    if not 0 <= neuron < d_mlp:
        raise IndexError_(f"neuron {neuron} is out of range: layers have neurons 0..{d_mlp - 1}")
    ids = session.encode(prompt)
    (acts,) = neuron_activations(session, [layer], ids[None])
    return PromptActivation(prompt=prompt, layer=layer, neuron=neuron, token_ids=ids.numpy().astype(np.int64),
                            tokens=np.array(session.decode_each(ids.numpy()).tolist(), dtype=str),
                            activations=acts[0, :, neuron].cpu().numpy().astype(np.float32))


def _load_arrays(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    try:
        return load_arrays(path)
    except ValueError as e:
        raise IndexError_(str(e)) from None


def _fmt_seconds(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "?"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# --------------------------------------------------------------------- reductions
# Builds of at least this many tokens fuse the reductions (``fused="auto"``): compiling costs
# ~10 s the first time on a machine (~1.5 s once torch's on-disk kernel cache has it) and saves
# ~0.1 s per 1,024-token batch of SmolLM2 on 2 CPU cores, so it pays for itself by ~100 batches.
FUSE_MIN_TOKENS = 100_000


def layer_reductions(a: torch.Tensor, stride: int, thr: torch.Tensor, n_pos: torch.Tensor,
                     act_sum: torch.Tensor, act_sumsq: torch.Tensor,
                     act_min: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer's pass over a batch ``a`` [B, W, N]. Returns each window's maximum [B, N] and its
    position (the first token holding it) [B, N], which neurons have a window above their current
    ``top_k``-th maximum ``thr`` [N] (bool), and the histogram bin of every ``stride``-th token of
    each window [B·⌈W/stride⌉, N].

    Adds in place, over every token: the count of positive activations to ``n_pos``, their sum
    and sum of squares to ``act_sum``/``act_sumsq`` (float64), the minimum into ``act_min``.
    Every reduction runs over the window axis first, so that, compiled, they share one loop.
    """
    n = a.shape[-1]
    m, pos = a.max(dim=1)
    n_pos += (a > 0).sum(1).sum(0)
    act_sum += a.sum(1).double().sum(0)
    act_sumsq += (a * a).sum(1).double().sum(0)
    torch.minimum(act_min, a.amin(1).amin(0), out=act_min)
    return m, pos, (m > thr).any(0), hist_bins(a[:, ::stride].reshape(-1, n))


_FUSED: dict[str, Any] = {}


def reductions_for(req: IndexRequest, device: torch.device):
    """``layer_reductions``, compiled into fused kernels when that pays off (see ``fused``).

    Each reduction otherwise reads the layer's activations once more from memory; fused, one
    pass computes them all (4× less time here). Compiled for one batch shape (``batch_windows``):
    the callers use the plain version for a smaller last batch rather than compile again. Where
    compiling is not possible (no C++ compiler, an unsupported device) the plain version is used.
    """
    big = req.max_tokens is None or req.max_tokens >= FUSE_MIN_TOKENS
    if req.fused == "off" or (req.fused == "auto" and not big):
        return layer_reductions
    key = str(device)
    if key not in _FUSED:
        compiled = torch.compile(layer_reductions, dynamic=False)

        def fused(*args):
            if _FUSED.get(key) is layer_reductions:
                return layer_reductions(*args)
            try:
                return compiled(*args)
            except Exception as e:  # compiling failed: say so once, then stay on the plain path
                import logging

                logging.getLogger(__name__).warning("neuron index: fused statistics unavailable (%s); "
                                                    "using the plain path", str(e).splitlines()[0][:200])
                _FUSED[key] = layer_reductions
                return layer_reductions(*args)

        _FUSED[key] = fused
    return _FUSED[key]


# ------------------------------------------------------------------------------ state
class _State:
    """The running index, as tensors on the model's device (plus the random sample's slots)."""

    ARRAYS = ("top_act", "top_win", "top_pos", "rand_pos", "rand_act", "n_pos", "act_sum", "act_sumsq",
              "act_min", "hist")

    def __init__(self, L: int, N: int, req: IndexRequest, device: torch.device) -> None:
        self.L, self.N, self.req, self.device = L, N, req, device
        k, R = req.top_k, req.n_random
        self.edges = torch.tensor(hist_edges(), dtype=torch.float32, device=device)
        self.nb = len(self.edges) + 1
        self.top_act = torch.full((L, N, k), -math.inf, device=device)
        self.top_win = torch.full((L, N, k), -1, dtype=torch.int64, device=device)
        self.top_pos = torch.zeros((L, N, k), dtype=torch.int64, device=device)
        self.rand_pos = torch.zeros((L, N, R), dtype=torch.int64, device=device)
        self.rand_act = torch.zeros((L, N, R), device=device)
        self.n_pos = torch.zeros((L, N), dtype=torch.int64, device=device)
        self.act_sum = torch.zeros((L, N), dtype=torch.float64, device=device)
        self.act_sumsq = torch.zeros((L, N), dtype=torch.float64, device=device)
        self.act_min = torch.full((L, N), math.inf, device=device)
        # bins × neurons, so that each token's count lands by one scatter along dim 0 (stored as
        # [L, N, bins]: see ``arrays``)
        self._hist = torch.zeros((L, self.nb, N), dtype=torch.int32, device=device)
        self.rand_win = np.full(R, -1, dtype=np.int64)
        self.rand_prio = np.zeros(R, dtype=np.uint64)
        self.windows_done = 0
        self.cursor = (0, 0)
        self._reduce = reductions_for(req, device)

    # -------------------------------------------------------------------- update
    @property
    def hist(self) -> torch.Tensor:
        """The histogram counts [L, N, bins]."""
        return self._hist.transpose(1, 2)

    @hist.setter
    def hist(self, value: torch.Tensor) -> None:
        self._hist = value.transpose(1, 2).contiguous()

    def _ones(self, like: torch.Tensor) -> torch.Tensor:
        """int32 ones shaped like ``like`` (kept)."""
        if getattr(self, "_ones_t", None) is None or self._ones_t.shape != like.shape:
            self._ones_t = torch.ones(like.shape, dtype=torch.int32, device=self.device)
        return self._ones_t

    def _rows(self, n: int) -> torch.Tensor:
        """[n, 1] row numbers 0..n-1 on the device (kept)."""
        if getattr(self, "_row_ids", None) is None or len(self._row_ids) != n:
            self._row_ids = torch.arange(n, device=self.device)[:, None]
        return self._row_ids

    def _sample(self, win_ids: list[int]) -> tuple[torch.Tensor | None, list[tuple[int, int, torch.Tensor]]]:
        """Update the random sample's slots; return (old-slot index per new slot, new fills)."""
        R = self.req.n_random
        if R == 0:
            return None, []
        cands = [(int(self.rand_prio[s]), int(self.rand_win[s]), s, -1) for s in range(R) if self.rand_win[s] >= 0]
        cands += [(window_priority(self.req.seed, w), w, -1, b) for b, w in enumerate(win_ids)]
        cands.sort()
        keep = cands[:R]
        if all(c[3] < 0 for c in keep) and len(keep) == int((self.rand_win >= 0).sum()):
            return None, []  # no change (the usual case once the sample has settled)
        old = torch.full((R,), -1, dtype=torch.int64)
        fills = []
        for slot, (prio, w, s, b) in enumerate(keep):
            self.rand_prio[slot], self.rand_win[slot] = prio, w
            if s >= 0:
                old[slot] = s
            else:
                pos = random_positions(self.req.seed, w, self.L, self.N, self.req.window).to(self.device)
                fills.append((slot, b, pos))
        for slot in range(len(keep), R):
            self.rand_win[slot] = -1
        return old, fills

    # A batch is merged in three steps so that each layer is reduced while the forward pass has
    # just produced it (still in cache, and never all layers held at once): ``begin`` before the
    # forward, ``add_layer`` as each layer's activations appear, ``end`` after the last layer.
    def begin(self, win_ids: list[int]) -> None:
        """Start a batch of windows ``win_ids`` (their stream numbers)."""
        B = len(win_ids)
        self._wins = torch.tensor(win_ids, dtype=torch.int64, device=self.device)
        old, self._fills = self._sample(win_ids)
        if old is not None:
            idx = old.clamp_min(0).to(self.device)
            self.rand_pos = self.rand_pos.index_select(2, idx)
            self.rand_act = self.rand_act.index_select(2, idx)
        if getattr(self, "_max", None) is None or self._max.shape[1] != B:
            self._max = torch.empty((self.L, B, self.N), device=self.device)
            self._argmax = torch.empty((self.L, B, self.N), dtype=torch.int64, device=self.device)
            self._cand = torch.empty((self.L, self.N), dtype=torch.bool, device=self.device)
        self._layers_seen = 0

    def add_layer(self, layer: int, a: torch.Tensor) -> None:
        """Reduce one layer's activations ``a`` [B, W, N] of the batch begun."""
        a = a.float()
        # compiled for full batches only: a smaller last batch takes the plain path
        reduce = self._reduce if a.shape[0] == self.req.batch_windows else layer_reductions
        m, pos, cand, bins = reduce(a, self.req.hist_stride, self.top_act[layer, :, self.req.top_k - 1],
                                    self.n_pos[layer], self.act_sum[layer], self.act_sumsq[layer],
                                    self.act_min[layer])
        self._hist[layer].scatter_add_(0, bins, self._ones(bins))
        self._max[layer], self._argmax[layer], self._cand[layer] = m, pos, cand
        # random sample: new slots take this neuron's activation at its random position
        for slot, b, rpos in self._fills:
            self.rand_pos[layer, :, slot] = rpos[layer]
            self.rand_act[layer, :, slot] = a[b].gather(0, rpos[layer][None, :])[0]
        self._layers_seen += 1

    def end(self) -> None:
        """Merge the batch's window maxima into the running top-k (every layer must have been added)."""
        if self._layers_seen != self.L:
            raise RuntimeError(f"neuron index: {self._layers_seen} of {self.L} layers reached the index")
        self._merge_top(self._max, self._argmax, self._cand, self._wins)
        self.windows_done += len(self._wins)

    def _merge_top(self, m: torch.Tensor, pos: torch.Tensor, cand: torch.Tensor, wins: torch.Tensor) -> None:
        """Merge the batch's window maxima ``m`` [L, B, N] (at positions ``pos``) into the running
        top-k, for all layers in one go and only for the neurons ``cand`` [L, N] that have a window
        above their current k-th (once the index settles, a small share of them)."""
        k, B = self.req.top_k, m.shape[1]
        li, ni = cand.nonzero(as_tuple=True)
        if len(li) == 0:
            return
        v = m.permute(0, 2, 1)[li, ni]                              # [n, B]
        p = pos.permute(0, 2, 1)[li, ni]                            # [n, B]
        kk = min(k, B)
        if kk == B:  # every window of the batch is a candidate: no need to rank them first
            j = self._rows(B).t().expand(len(li), B)
        else:
            v, j = v.topk(kk, dim=1)                                # [n, kk]
        nv, sel = torch.cat([self.top_act[li, ni], v], dim=1).topk(k, dim=1)   # [n, k]
        new = sel >= k
        rows = j.gather(1, (sel - k).clamp_min(0))                  # batch row of each entry
        old_sel = sel.clamp_max(k - 1)
        top_win = torch.where(new, wins[rows], self.top_win[li, ni].gather(1, old_sel))
        top_pos = torch.where(new, p.gather(1, rows), self.top_pos[li, ni].gather(1, old_sel))
        self.top_act[li, ni], self.top_win[li, ni], self.top_pos[li, ni] = nv, top_win, top_pos

    # ------------------------------------------------------------------- storage
    def arrays(self) -> dict[str, np.ndarray]:
        out = {name: getattr(self, name).contiguous().cpu().numpy() for name in self.ARRAYS}
        out["rand_win"] = self.rand_win.copy()
        out["rand_prio"] = self.rand_prio.copy()
        return out

    def load(self, arrays: dict[str, np.ndarray]) -> None:
        for name in self.ARRAYS:
            ref = getattr(self, name)
            if name not in arrays or tuple(arrays[name].shape) != tuple(ref.shape):
                raise IndexError_(f"the checkpoint's {name} does not match this model/settings")
            setattr(self, name, torch.from_numpy(np.array(arrays[name])).to(device=self.device, dtype=ref.dtype))
        self.rand_win = np.array(arrays["rand_win"], dtype=np.int64)
        self.rand_prio = np.array(arrays["rand_prio"], dtype=np.uint64)


# ------------------------------------------------------------------------------ build
def _check_request(session, req: IndexRequest) -> None:
    if not 2 <= req.window <= session.context_length:
        raise ExplorerError(f"the window must be 2..{session.context_length} tokens, got {req.window}")
    if req.top_k < 1 or req.n_random < 0 or req.batch_windows < 1 or req.hist_stride < 1:
        raise ExplorerError("top_k, batch_windows and hist_stride must be ≥ 1 and n_random ≥ 0")
    if req.checkpoint_every is not None and req.checkpoint_every < 1:
        raise ExplorerError("checkpoint_every must be ≥ 1 batch")
    if not req.checkpoint_seconds >= 0:
        raise ExplorerError("checkpoint_seconds must be ≥ 0")
    if req.max_tokens is not None and req.max_tokens < req.window:
        raise ExplorerError(f"max tokens ({req.max_tokens}) is less than one window ({req.window} tokens)")


def _settings(req: IndexRequest) -> dict:
    d = asdict(req)
    d.pop("checkpoint_every")
    d.pop("checkpoint_seconds")
    d.pop("fused")  # float rounding only
    d.pop("corpus_path")
    d["separator"] = "\n\n"
    d["hist_bins_per_decade"] = _BINS_PER_DECADE
    d["hist_decades"] = list(_DECADES)
    return d


def index_key(session, req: IndexRequest, corpus: dict, source: UnitSource | None = None) -> str:
    """Hash of everything that determines an index: model, corpus, settings (and units, where
    they are not the neurons)."""
    info = session.info()
    payload = {"model": info.name, "config_hash": info.config_hash, "dtype": info.dtype,
               "corpus": {k: corpus[k] for k in ("size", "head_sha256")}, "settings": _settings(req)}
    units = source.describe() if source is not None else None
    if units is not None:  # the units' identity, not where their files are
        payload["units"] = {k: v for k, v in units.items() if k != "path"}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def default_index_dir(key: str) -> Path:
    from explorer.core.defaults import cache_dir

    return cache_dir() / "neurons" / key


def _resolve_corpus(req: IndexRequest) -> IndexRequest:
    if req.corpus_path is not None:
        return req
    from explorer.core.defaults import ensure_default_corpus

    return replace(req, corpus_path=str(ensure_default_corpus(progress=lambda *_: None)))


def _manifest(session, req: IndexRequest, corpus: dict, key: str, state: _State, complete: bool,
              elapsed: float, source: UnitSource | None = None) -> dict:
    info = session.info()
    fmt = req.corpus_format if req.corpus_format != "auto" else detect_format(req.corpus_path)
    units = source.describe() if source is not None else None
    manifest = {
        "format": FORMAT, "version": VERSION, "key": key, "complete": complete,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "model": {"name": info.name, "path": info.path, "config_hash": info.config_hash,
                  "architecture": info.architecture, "family": info.family, "dtype": info.dtype,
                  "n_layers": state.L, "d_mlp": state.N,
                  "site": f"{session.adapter.blocks}.<layer>.{session.adapter.mlp_out} input",
                  "tokenizer_path": info.path},
        "corpus": dict(corpus, format=fmt, text_field=req.text_field, text_mode=req.text_mode,
                       split=req.split),
        "settings": _settings(req),
        "windows_done": state.windows_done, "tokens_done": state.windows_done * req.window,
        "elapsed_s": round(elapsed, 2),
        "example": "a window; activation = the neuron's max over the window's tokens, at position",
        "quantiles": (f"approximate: per-neuron histogram of a 1-in-{req.hist_stride} token subsample, "
                      f"{_BINS_PER_DECADE} log bins per decade for |a| in [1e-3, 1e3], interpolated"),
    }
    if units is not None:  # another unit source: the model entry keeps the model's own sizes
        manifest["model"].update(n_layers=session.n_layers, d_mlp=geometry(session).d_mlp,
                                 site=source.site_text(session))
        manifest["units"] = dict(units, layers=list(source.layers), n_units=source.n_units)
    return manifest


class _Work:
    """The incomplete build's files: a job directory (``job.json`` names the build by its key;
    state checkpoints) holding the token stream and the windows' provenance."""

    def __init__(self, out: Path, window: int) -> None:
        self.job = JobDir(out / ".work", manifest="job.json")
        self.dir = self.job.path
        self.dir.mkdir(parents=True, exist_ok=True)
        self.checkpoints = self.job.checkpoints()  # step = windows done; the latest is kept
        self.tokens = self.dir / "tokens.bin"   # int32 [windows, window]
        self.prov = self.dir / "prov.bin"       # int64 [windows, 2]: doc, offset
        self.window = window

    def truncate(self, windows: int) -> None:
        for path, row in ((self.tokens, 4 * self.window), (self.prov, 16)):
            with open(path, "ab") as f:
                f.truncate(windows * row)

    def append(self, batch) -> None:
        with open(self.tokens, "ab") as f:
            f.write(np.stack([w.ids for w in batch]).astype(np.int32).tobytes())
        with open(self.prov, "ab") as f:
            f.write(np.array([[w.doc, w.offset] for w in batch], dtype=np.int64).tobytes())

    def read(self, rows: np.ndarray, windows_done: int) -> tuple[np.ndarray, np.ndarray]:
        toks = np.memmap(self.tokens, dtype=np.int32, mode="r", shape=(windows_done, self.window))
        prov = np.memmap(self.prov, dtype=np.int64, mode="r", shape=(windows_done, 2))
        out = np.array(toks[rows]), np.array(prov[rows])
        del toks, prov
        return out


def _checkpoint(work: _Work, state: _State, key: str) -> None:
    step = state.windows_done
    if step in work.checkpoints.steps():
        return  # the same state (a cancel right after a checkpoint)
    meta = {"key": key, "windows_done": str(step),
            "cursor_doc": str(state.cursor[0]), "cursor_offset": str(state.cursor[1])}
    with work.checkpoints.new(step) as tmp:
        save_arrays(tmp / CHECKPOINT_FILE, state.arrays(), meta)
    work.checkpoints.drop(before=step)


def _finalize(session, out: Path, work: _Work, state: _State, req: IndexRequest, corpus: dict, key: str,
              complete: bool, elapsed: float, source: UnitSource | None = None) -> None:
    arr = state.arrays()
    top_win, rand_win = arr["top_win"], arr["rand_win"]
    kept = np.unique(np.concatenate([top_win[top_win >= 0], rand_win[rand_win >= 0]]))
    tokens, prov = work.read(kept, state.windows_done)
    vocab_ids = np.unique(tokens) if tokens.size else np.zeros(0, dtype=np.int64)
    strings = [str(s) for s in session.decode_each(vocab_ids)] if vocab_ids.size else []

    def row_of(w: np.ndarray) -> np.ndarray:
        rows = np.searchsorted(kept, np.where(w >= 0, w, 0))
        return np.where(w >= 0, rows, -1).astype(np.int32)

    arrays = {
        "top_act": arr["top_act"].astype(np.float32), "top_row": row_of(top_win),
        "top_pos": arr["top_pos"].astype(np.int32),
        "rand_row": row_of(rand_win), "rand_pos": arr["rand_pos"].astype(np.int32),
        "rand_act": arr["rand_act"].astype(np.float32),
        "windows": tokens.astype(np.int32), "window_index": kept.astype(np.int64),
        "window_doc": prov[:, 0].astype(np.int64), "window_offset": prov[:, 1].astype(np.int64),
        "n_pos": arr["n_pos"].astype(np.int64), "act_sum": arr["act_sum"], "act_sumsq": arr["act_sumsq"],
        "act_min": arr["act_min"].astype(np.float32), "hist": arr["hist"].astype(np.int32),
        "hist_edges": hist_edges(), "hist_tokens": np.array([_hist_tokens(state.windows_done, req)]),
        "vocab_ids": vocab_ids.astype(np.int64),
    }
    # The manifest goes last: a directory with a manifest always has matching arrays.
    manifest_path = out / "manifest.json"
    if manifest_path.exists():
        manifest_path.unlink()
    save_arrays(out / "index.safetensors", arrays)
    atomic_write_text(out / "vocab.json", json.dumps({"ids": vocab_ids.tolist(), "strings": strings},
                                                      ensure_ascii=False))
    manifest = _manifest(session, req, corpus, key, state, complete, elapsed, source)
    atomic_write_text(manifest_path, json.dumps(manifest, indent=1, ensure_ascii=False))


class _LastSite(Exception):
    """Raised at the last neuron site: the rest of the forward pass is not needed."""


def _reduce_batch(session, state: _State, ids: torch.Tensor, win_ids: list[int],
                  source: UnitSource | None = None) -> None:
    """Run the model on ``ids`` [B, W] and reduce every row's unit activations into ``state``.

    A forward (pre-)hook on each row's module (``source.modules``; the neurons: each layer's MLP
    out-projection, whose input they are) hands the site to ``state.add_layer`` (through
    ``source.units``) as the forward reaches it, and the last one stops the pass (the rest of
    the model is never run). Plain PyTorch hooks on the attached model, not an nnsight trace: a
    trace hands every one of the model's ~400 modules through its interleaver, ~3% of this
    forward, for nothing this read-only pass needs. The hooks exist only while the session lock
    is held, so no other forward ever runs them.
    """
    source = source if source is not None else NeuronUnits(session)
    mods = source.modules(session)

    def pre_hook(row: int):
        def pre(module, args):
            state.add_layer(row, source.units(args[0].to(state.device)))  # a sharded model's layer may sit elsewhere
            if row == len(mods) - 1:
                raise _LastSite
        return pre

    def post_hook(row: int):
        def post(module, args, out):
            x = out[0] if isinstance(out, tuple) else out
            state.add_layer(row, source.units(x.to(state.device)))
            if row == len(mods) - 1:
                raise _LastSite
        return post

    with torch.no_grad(), session.lock:
        state.begin(win_ids)
        if source.read == "input":
            handles = [m.register_forward_pre_hook(pre_hook(row)) for row, m in enumerate(mods)]
        else:
            handles = [m.register_forward_hook(post_hook(row)) for row, m in enumerate(mods)]
        try:
            session.hf(ids)
        except _LastSite:
            pass
        finally:
            for h in handles:
                h.remove()
        state.end()


def _hist_tokens(windows: int, req: IndexRequest) -> int:
    return windows * len(range(0, req.window, req.hist_stride))


def build_index(session: ModelSession, request: IndexRequest | str | None = None, /, *,
                ctx: JobContext | None = None, out_dir: str | Path | None = None,
                source: UnitSource | None = None, **fields: Any) -> NeuronIndex:
    """Build (or resume, or reopen) the neuron index of a corpus; see the module docstring.

    A string request is the corpus path. ``out_dir`` None uses ``cache_dir()/neurons/<key>``
    (key: model, corpus, settings, and the units where ``source`` is not the neurons). A complete
    index there with the same key is opened, not rebuilt. ``source`` None indexes every layer's
    MLP neurons; ``explorer.features.units.SAEUnits(sae)`` an SAE's features (``index_features``).
    Progress goes to ``ctx.report(tokens_done, tokens_total, message="… tokens/s, ETA …")``;
    when ``ctx`` is cancelled the build checkpoints, writes a partial index (``complete`` False)
    and returns it; calling again resumes.

    >>> from explorer import build_index
    >>> index = build_index(session, max_tokens=256, window=32, top_k=4, n_random=2, out_dir="index")
    >>> index.complete, index.tokens_done, len(index.top_examples(layer=3, neuron=17))
    (True, 256, 4)
    """
    session.require_local("building the neuron index")
    req = _resolve_corpus(build_request(IndexRequest, request, fields))
    _check_request(session, req)
    corpus = corpus_fingerprint(req.corpus_path)
    key = index_key(session, req, corpus, source)
    out = Path(out_dir).expanduser() if out_dir is not None else default_index_dir(key)
    manifest_path = out / "manifest.json"
    if manifest_path.exists():
        try:
            old = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = {}
        if old.get("key") != key:
            raise IndexError_(f"{out} holds a neuron index of another model, corpus or settings; "
                              "choose another output directory or delete it")
        if old.get("complete"):
            return NeuronIndex.open(out)
    elif out.exists() and any(p.name != ".work" for p in out.iterdir()):
        if not (out / ".work").exists():
            raise IndexError_(f"{out} exists and is not a neuron index; choose an empty or new directory")
    out.mkdir(parents=True, exist_ok=True)

    source = source if source is not None else NeuronUnits(session)
    L, N = len(source.layers), source.n_units
    state = _State(L, N, req, session.device)
    work = _Work(out, req.window)
    saved = work.job.read()
    if saved is not None and saved.get("key") != key:
        raise IndexError_(f"{out} holds the checkpoint of another build; delete {work.dir} to start over")
    work.checkpoints.clean()
    latest = work.checkpoints.latest() if saved is not None else None
    if latest is not None:
        arrays, meta = _load_arrays(latest[1] / CHECKPOINT_FILE)
        state.load(arrays)
        state.windows_done = int(meta["windows_done"])
        state.cursor = (int(meta["cursor_doc"]), int(meta["cursor_offset"]))
    else:
        for path in (work.tokens, work.prov):
            path.unlink(missing_ok=True)
        work.checkpoints.drop(after=-1)
        work.job.write({"kind": "neuron-index-build", "key": key, "settings": _settings(req)})
    work.truncate(state.windows_done)

    docs = iter_documents(req.corpus_path, format=req.corpus_format, text_field=req.text_field,
                          text_mode=req.text_mode, split=req.split)
    windows = token_windows(docs, session.tokenizer, req.window, req.max_tokens,
                            start=state.cursor, start_index=state.windows_done)
    total = req.max_tokens // req.window * req.window if req.max_tokens else max(1, corpus["size"] // 4)
    t0 = time.monotonic()
    start_tokens = state.windows_done * req.window
    since_ckpt, last_ckpt = 0, t0
    cancelled = False
    for batch in batched(windows, req.batch_windows):
        if ctx is not None and ctx.cancelled:
            cancelled = True
            break
        ids = torch.from_numpy(np.stack([w.ids for w in batch])).to(session.device)
        _reduce_batch(session, state, ids, [w.index for w in batch], source)
        work.append(batch)
        state.cursor = batch[-1].end
        since_ckpt += 1
        now = time.monotonic()
        if (req.checkpoint_every is not None and since_ckpt >= req.checkpoint_every) \
                or now - last_ckpt >= req.checkpoint_seconds:
            _checkpoint(work, state, key)
            since_ckpt, last_ckpt = 0, now
        if ctx is not None:
            done = state.windows_done * req.window
            total = max(total, done)
            rate = (done - start_tokens) / max(time.monotonic() - t0, 1e-9)
            eta = (total - done) / rate if rate > 0 else None
            ctx.report(done, total, message=f"{rate:,.0f} tokens/s, ETA {_fmt_seconds(eta)}")
    if state.windows_done == 0:
        shutil.rmtree(work.dir, ignore_errors=True)
        if cancelled:
            raise IndexError_("the build was cancelled before its first batch finished: nothing was indexed")
        raise CorpusError(f"corpus {req.corpus_path} has fewer than {req.window} tokens: nothing to index")
    if ctx is not None and ctx.cancelled:
        cancelled = True
    elapsed = time.monotonic() - t0
    if cancelled:
        _checkpoint(work, state, key)
        _finalize(session, out, work, state, req, corpus, key, False, elapsed, source)
    else:
        _finalize(session, out, work, state, req, corpus, key, True, elapsed, source)
        shutil.rmtree(work.dir, ignore_errors=True)
    if ctx is not None:
        done = state.windows_done * req.window
        ctx.report(done, done if not cancelled else max(total, done), message="cancelled" if cancelled else "done")
    return NeuronIndex.open(out)


# ------------------------------------------------------------------------------ reading
@dataclass(frozen=True, eq=False)
class NeuronExample(Result):
    """One example of a neuron: a window of tokens and the activation at ``position``."""

    layer: int
    neuron: int
    kind: str                 # "top" or "random"
    rank: int                 # 0-based rank among the neuron's examples of this kind
    activation: float         # the neuron's activation at ``position`` when the model reads token_ids
    position: int
    token_ids: np.ndarray = array("W", "int64")
    tokens: np.ndarray = array("W", "str")   # each token decoded on its own
    window_index: int         # the window's number in the corpus stream
    doc: int                  # provenance: document and token offset of the window's first token
    offset: int

    def relations(self) -> str | None:
        if not 0 <= self.position < len(self.tokens):
            return f"position {self.position} is outside the {len(self.tokens)}-token window"
        return None

    @property
    def token(self) -> str:
        """The token at ``position`` (where the activation is)."""
        return str(self.tokens[self.position])


@dataclass(frozen=True, eq=False)
class NeuronStats(Result):
    """Activation statistics of one neuron over the indexed tokens."""

    layer: int
    neuron: int
    tokens: int               # tokens seen
    max: float
    min: float
    mean: float
    std: float
    frequency: float          # share of tokens with activation > 0
    quantile_levels: np.ndarray = array("Q", "float64")
    quantiles: np.ndarray = array("Q", "float64")   # approximate (histogram of a subsample)

    def quantile(self, q: float) -> float:
        return float(np.interp(q, self.quantile_levels, self.quantiles))


@dataclass(frozen=True, eq=False)
class NeuronHistogram(Result):
    """A neuron's activation histogram over the index's token subsample (``hist_edges`` bins).

    ``counts[b]`` holds the tokens in (edges[b-1], edges[b]]: ``counts[0]`` is the underflow
    (≤ edges[0]) and ``counts[-1]`` the overflow (> edges[-1]).
    """

    layer: int
    neuron: int
    counts: np.ndarray = array("B", "int64")    # B = E + 1 bins
    edges: np.ndarray = array("E", "float64")   # ascending
    sampled_tokens: int       # tokens in the subsample (the counts' sum)
    stride: int               # the subsample: positions 0, stride, 2·stride, … of every window

    def relations(self) -> str | None:
        if len(self.counts) != len(self.edges) + 1:
            return f"counts has {len(self.counts)} bins for {len(self.edges)} edges (expected edges + 1)"
        return None


@dataclass(frozen=True, eq=False)
class SelectiveNeurons(Result):
    """The most selective neurons of every layer, best first within each layer.

    Selectivity = (max − mean) / std over every indexed token: how many standard deviations
    the neuron's strongest activation stands above its average. Neurons that are near-silent
    except on a few tokens score high; a constant neuron (std 0) scores 0.
    """

    n_per_layer: int
    tokens: int               # tokens indexed
    layers: np.ndarray = array("M", "int64")
    neurons: np.ndarray = array("M", "int64")
    selectivity: np.ndarray = array("M", "float64")
    max: np.ndarray = array("M", "float64")
    mean: np.ndarray = array("M", "float64")
    std: np.ndarray = array("M", "float64")
    frequency: np.ndarray = array("M", "float64")   # share of tokens with activation > 0
    top_token: np.ndarray = array("M", "str")       # the token at the top example's position
    definition: str = "(max - mean) / std over every indexed token"


def hist_quantiles(counts: np.ndarray, edges: np.ndarray, lo: float, hi: float,
                   levels=QUANTILE_LEVELS) -> np.ndarray:
    """Quantiles from a histogram (len(edges) + 1 bins), interpolated in the bin, within [lo, hi]."""
    total = counts.sum()
    if total == 0:
        return np.full(len(levels), np.nan)
    bounds = np.concatenate([[min(lo, edges[0])], edges, [max(hi, edges[-1])]])
    cum = np.cumsum(counts)
    out = []
    for q in levels:
        target = q * total
        b = int(np.searchsorted(cum, target, side="left"))
        b = min(b, len(counts) - 1)
        before = cum[b - 1] if b > 0 else 0
        frac = (target - before) / counts[b] if counts[b] else 0.0
        left, right = max(bounds[b], lo), min(bounds[b + 1], hi)
        if right < left:
            left, right = right, left
        out.append(left + frac * (right - left))
    return np.clip(np.array(out), lo, hi)


class NeuronIndex:
    """A built (or partial) neuron index, readable without the model."""

    def __init__(self, path: Path, manifest: dict, arrays: dict[str, np.ndarray], vocab: dict[int, str]) -> None:
        self.path = path
        self.manifest = manifest
        self.arrays = arrays
        self._vocab = vocab
        self._patterns: dict | None = None

    # ----------------------------------------------------------------- opening
    @classmethod
    def open(cls, path: str | Path) -> NeuronIndex:
        p = Path(path).expanduser()
        mpath = p / "manifest.json"
        if not mpath.exists():
            raise IndexError_(f"no neuron index at {p} (no manifest.json); build one with `neurons index`")
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except ValueError as e:
            raise IndexError_(f"{mpath} is not valid JSON ({e})") from None
        if manifest.get("format") != FORMAT:
            raise IndexError_(f"{p} is not a neuron index (manifest format {manifest.get('format')!r})")
        if manifest.get("version") != VERSION:
            raise IndexError_(f"{p} is a version {manifest.get('version')} neuron index; this is version {VERSION}")
        if not (p / "index.safetensors").exists():
            raise IndexError_(f"{p} has a manifest but no index.safetensors")
        arrays, _ = _load_arrays(p / "index.safetensors")
        try:
            vj = json.loads((p / "vocab.json").read_text(encoding="utf-8"))
            vocab = dict(zip((int(i) for i in vj["ids"]), vj["strings"]))
        except (OSError, ValueError, KeyError) as e:
            raise IndexError_(f"{p}/vocab.json is missing or malformed ({e})") from None
        index = cls(p, manifest, arrays, vocab)
        problem = index.validate()
        if problem:
            raise IndexError_(f"{p}: {problem}")
        return index

    def validate(self) -> str | None:
        """Name the first inconsistency between the manifest and the arrays, or None."""
        a, m = self.arrays, self.manifest
        need = ("top_act", "top_row", "top_pos", "rand_row", "rand_pos", "rand_act", "windows", "window_index",
                "window_doc", "window_offset", "n_pos", "act_sum", "act_sumsq", "act_min", "hist", "hist_edges",
                "hist_tokens")
        for name in need:
            if name not in a:
                return f"index.safetensors lacks the array '{name}'"
        L, N = len(self.layers), self.n_units
        k, R, W = m["settings"]["top_k"], m["settings"]["n_random"], m["settings"]["window"]
        shapes = {"top_act": (L, N, k), "top_row": (L, N, k), "top_pos": (L, N, k), "rand_row": (R,),
                  "rand_pos": (L, N, R), "rand_act": (L, N, R), "n_pos": (L, N), "act_min": (L, N),
                  "hist": (L, N, len(a["hist_edges"]) + 1)}
        for name, shape in shapes.items():
            if tuple(a[name].shape) != shape:
                return f"{name} has shape {tuple(a[name].shape)}, expected {shape}"
        n_win = len(a["window_index"])
        if a["windows"].shape != (n_win, W):
            return f"windows has shape {a['windows'].shape}, expected ({n_win}, {W})"
        if a["top_row"].max(initial=-1) >= n_win or a["rand_row"].max(initial=-1) >= n_win:
            return "an example refers to a window the index does not hold"
        return None

    # ----------------------------------------------------------------- basics
    @property
    def n_layers(self) -> int:
        return int(self.manifest["model"]["n_layers"])

    @property
    def d_mlp(self) -> int:
        return int(self.manifest["model"]["d_mlp"])

    # An index's units are the model's MLP neurons, or (``manifest["units"]``) another source's,
    # e.g. an SAE's features at one layer: its arrays have one row per entry of ``layers``.
    @property
    def units(self) -> dict | None:
        """The manifest's ``units`` entry (kind, layers, n_units, …), None for a neuron index."""
        return self.manifest.get("units")

    @property
    def unit_kind(self) -> str:
        return str(self.units["kind"]) if self.units else "neurons"

    @property
    def unit_name(self) -> str:
        """What one unit is called: "neuron", or "feature" for an SAE's."""
        return str(self.units.get("unit_name", "unit")) if self.units else "neuron"

    @property
    def layers(self) -> list[int]:
        """The model layers indexed, one array row each (every layer for neurons)."""
        if self.units:
            return [int(x) for x in self.units["layers"]]
        return list(range(self.n_layers))

    @property
    def n_units(self) -> int:
        """Units per layer (d_mlp for neurons, d_sae for an SAE's features)."""
        return int(self.units["n_units"]) if self.units else self.d_mlp

    def row(self, layer: int) -> int:
        """The array row of a model layer (checked)."""
        if self.units is None:
            return layer
        layers = self.layers
        if layer not in layers:
            raise IndexError_(f"layer {layer} is not indexed: this {self.unit_kind} index holds layer "
                              f"{', '.join(map(str, layers))}")
        return layers.index(layer)

    def source(self, session) -> UnitSource:
        """The unit source the index was built from, for ``session`` (re-reading examples)."""
        if self.units is None:
            return NeuronUnits(session)
        if self.unit_kind == "sae":
            from explorer.features.units import SAEUnits  # the SAE package builds on this one

            return SAEUnits.from_manifest(session, self.units)
        raise IndexError_(f"{self.path}: unknown unit source {self.unit_kind!r}")

    def unit_activations(self, session, layer: int, ids: torch.Tensor) -> torch.Tensor:
        """[B, T, n_units] float32: every unit of ``layer`` at every token of ids [B, T]."""
        (acts,) = self.source(session).activations(session, [layer], ids)
        return acts

    @property
    def window(self) -> int:
        return int(self.manifest["settings"]["window"])

    @property
    def top_k(self) -> int:
        return int(self.manifest["settings"]["top_k"])

    @property
    def tokens_done(self) -> int:
        return int(self.manifest["tokens_done"])

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    @property
    def model_name(self) -> str:
        return str(self.manifest["model"]["name"])

    def check_neuron(self, layer: int, neuron: int) -> None:
        """Raise unless (``layer``, ``neuron``) is a unit of the index (a feature, for an SAE's)."""
        if self.units is not None:
            self.row(layer)
            if not 0 <= neuron < self.n_units:
                raise IndexError_(f"{self.unit_name} {neuron} is out of range: the index has "
                                  f"{self.unit_name}s 0..{self.n_units - 1}")
            return
        if not 0 <= layer < self.n_layers:
            raise IndexError_(f"layer {layer} is out of range: the index has layers 0..{self.n_layers - 1}")
        if not 0 <= neuron < self.d_mlp:
            raise IndexError_(f"neuron {neuron} is out of range: layers have neurons 0..{self.d_mlp - 1}")

    def token_strings(self, ids) -> np.ndarray:
        """Token ids as their stored strings (ids outside the stored vocabulary show as <id N>)."""
        ids = np.asarray(ids)
        return np.array([self._vocab.get(int(i), f"<id {int(i)}>") for i in ids.reshape(-1)],
                        dtype=str).reshape(ids.shape)

    def vocab(self) -> dict[int, str]:
        return dict(self._vocab)

    # ----------------------------------------------------------------- examples
    def _example(self, layer: int, neuron: int, kind: str, rank: int, row: int, pos: int, act: float) -> NeuronExample:
        a = self.arrays
        ids = a["windows"][row].astype(np.int64)
        return NeuronExample(
            layer=layer, neuron=neuron, kind=kind, rank=rank, activation=float(act), position=int(pos),
            token_ids=ids, tokens=self.token_strings(ids), window_index=int(a["window_index"][row]),
            doc=int(a["window_doc"][row]), offset=int(a["window_offset"][row]))

    def top_examples(self, layer: int, neuron: int, n: int | None = None) -> list[NeuronExample]:
        """The neuron's top examples, highest activation first."""
        self.check_neuron(layer, neuron)
        a = self.arrays
        r = self.row(layer)
        rows, pos, act = a["top_row"][r, neuron], a["top_pos"][r, neuron], a["top_act"][r, neuron]
        out = [self._example(layer, neuron, "top", r, rows[r], pos[r], act[r])
               for r in range(len(rows)) if rows[r] >= 0]
        return out[:n] if n is not None else out

    def random_examples(self, layer: int, neuron: int, n: int | None = None) -> list[NeuronExample]:
        """The random sample's windows with this neuron's activation at its random position."""
        self.check_neuron(layer, neuron)
        a = self.arrays
        rows, lr = a["rand_row"], self.row(layer)
        out = [self._example(layer, neuron, "random", r, rows[r], a["rand_pos"][lr, neuron, r],
                             a["rand_act"][lr, neuron, r]) for r in range(len(rows)) if rows[r] >= 0]
        return out[:n] if n is not None else out

    def stats(self, layer: int, neuron: int) -> NeuronStats:
        self.check_neuron(layer, neuron)
        a = self.arrays
        r = self.row(layer)
        n = max(self.tokens_done, 1)
        mean = float(a["act_sum"][r, neuron]) / n
        var = max(float(a["act_sumsq"][r, neuron]) / n - mean * mean, 0.0)
        top = a["top_act"][r, neuron]
        hi = float(top[0]) if a["top_row"][r, neuron, 0] >= 0 else float("nan")
        lo = float(a["act_min"][r, neuron])
        levels = np.array(QUANTILE_LEVELS, dtype=np.float64)
        qs = hist_quantiles(a["hist"][r, neuron].astype(np.int64), a["hist_edges"], lo, hi, levels)
        return NeuronStats(layer=layer, neuron=neuron, tokens=self.tokens_done, max=hi, min=lo, mean=mean,
                           std=math.sqrt(var), frequency=float(a["n_pos"][r, neuron]) / n,
                           quantile_levels=levels, quantiles=qs)

    def histogram(self, layer: int, neuron: int) -> NeuronHistogram:
        self.check_neuron(layer, neuron)
        counts = self.arrays["hist"][self.row(layer), neuron].astype(np.int64)
        return NeuronHistogram(layer=layer, neuron=neuron, counts=counts,
                               edges=np.asarray(self.arrays["hist_edges"], dtype=np.float64),
                               sampled_tokens=int(counts.sum()), stride=int(self.manifest["settings"]["hist_stride"]))

    def selectivity(self) -> np.ndarray:
        """[rows, N] float64: (max − mean) / std of every unit over the indexed tokens (0 if std is 0);
        one row per entry of ``layers``."""
        a = self.arrays
        n = max(self.tokens_done, 1)
        mean = a["act_sum"] / n
        std = np.sqrt(np.maximum(a["act_sumsq"] / n - mean * mean, 0.0))
        top = np.where(a["top_row"][..., 0] >= 0, a["top_act"][..., 0].astype(np.float64), mean)
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.where(std > 0, (top - mean) / std, 0.0)
        return np.nan_to_num(z, nan=0.0, posinf=0.0, neginf=0.0)

    def selective_neurons(self, n_per_layer: int = 5) -> SelectiveNeurons:
        """The ``n_per_layer`` most selective neurons of each layer (see ``SelectiveNeurons``)."""
        if n_per_layer < 1:
            raise IndexError_(f"n_per_layer must be ≥ 1, got {n_per_layer}")
        a = self.arrays
        z = self.selectivity()
        k = min(n_per_layer, self.n_units)
        order = np.argsort(-z, axis=1, kind="stable")[:, :k]            # [L, k]
        rows = np.repeat(np.arange(len(self.layers)), k)
        layers = np.asarray(self.layers, dtype=np.int64)[rows]
        neurons = order.reshape(-1)
        n = max(self.tokens_done, 1)
        mean = a["act_sum"][rows, neurons] / n
        std = np.sqrt(np.maximum(a["act_sumsq"][rows, neurons] / n - mean * mean, 0.0))
        fire = self.firing_token_ids()[rows, neurons, 0]
        return SelectiveNeurons(
            n_per_layer=k, tokens=self.tokens_done, layers=layers.astype(np.int64), neurons=neurons.astype(np.int64),
            selectivity=z[rows, neurons], max=a["top_act"][rows, neurons, 0].astype(np.float64),
            mean=mean, std=std, frequency=a["n_pos"][rows, neurons] / n,
            top_token=np.array([self._vocab.get(int(i), "") if i >= 0 else "" for i in fire], dtype=str))

    # ----------------------------------------------------------------- firing tokens
    def firing_token_ids(self) -> np.ndarray:
        """[rows, N, k] the token id at each top example's position (-1 where there is none)."""
        a = self.arrays
        rows, pos = a["top_row"], a["top_pos"]
        safe = np.where(rows >= 0, rows, 0)
        ids = a["windows"][safe, pos].astype(np.int64) if len(a["windows"]) else np.zeros(rows.shape, np.int64)
        return np.where(rows >= 0, ids, -1)
