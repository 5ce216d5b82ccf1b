"""Hidden states of many short texts, every layer at once: the rows probes, CCS and their tests read.

One batched forward per batch of texts collects every row (the embeddings, then each block's
output, as in the logit lens) through plain PyTorch forward hooks on the attached model: each
hook reduces its [B, T, d] output to the wanted sites right away ([B, d] each), so memory stays
at rows × texts × d whatever the text lengths. Batches are padded with an attention mask and
explicit position ids; texts are sorted by length first so padding stays small.

Sites: ``last`` = the last real token (right padding: position length − 1; left padding: the
batch's last column), ``mean`` = the mean over the text's real tokens, ``prev`` = the token
before the last one (the position whose next-token prediction is the last token; the logit-lens
answer of contrast pairs reads it). Pads never enter a site: they are masked out of attention
and out of the mean, and with left padding the position ids count real tokens only, so a text's
states equal those of its own unpadded forward (tested).

The pass runs the whole base model (the final norm included, as any forward does) but not the
unembedding: nothing here needs logits.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from explorer.analyses.lens import layer_labels
from explorer.core.errors import ExplorerError
from explorer.core.requests import build_request
from explorer.core.results import Result, array, sized
from explorer.core.session import ModelSession

SITES = ("last", "mean", "prev")
PADDING = ("right", "left")
BATCH_SIZE = 32


class HiddenError(ExplorerError):
    """Texts or options the hidden-state collection cannot use."""


@dataclass(frozen=True)
class HiddenRequest:
    """Texts whose hidden states are collected at ``sites`` (a tuple of ``SITES``)."""

    texts: tuple[str, ...]
    sites: tuple[str, ...] = ("last",)
    batch_size: int = BATCH_SIZE
    padding: str = "right"


@dataclass(frozen=True, eq=False)
class HiddenStates(Result):
    """``states[site]`` is [R, N, d] float32: row r (``layer_labels``), text n."""

    model: str
    layer_labels: tuple[str, ...] = sized("R")
    sites: tuple[str, ...] = sized("S")
    states: np.ndarray = array("S R N d", "float32")   # site-major
    n_tokens: np.ndarray = array("N", "int64")
    last_ids: np.ndarray = array("N", "int64")         # each text's last token id

    def site(self, name: str) -> np.ndarray:
        """The [R, N, d] states of one site."""
        return self.states[self.sites.index(name)]


def check_texts(texts: Sequence[str]) -> tuple[str, ...]:
    texts = tuple(texts)
    if not texts:
        raise HiddenError("no texts given: the data set is empty")
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise HiddenError(f"text {i} is empty: every row needs some text")
    return texts


def _check(request: HiddenRequest) -> None:
    check_texts(request.texts)
    bad = [s for s in request.sites if s not in SITES]
    if bad or not request.sites:
        raise HiddenError(f"unknown site {bad[0] if bad else '(none)'!r}: use {', '.join(SITES)}")
    if request.padding not in PADDING:
        raise HiddenError(f"padding must be right or left, got {request.padding!r}")
    if request.batch_size < 1:
        raise HiddenError(f"batch size must be at least 1, got {request.batch_size}")


def encode_all(session: ModelSession, texts: Sequence[str]) -> list[torch.Tensor]:
    """Token ids of every text (as the lens encodes a prompt: the tokenizer's own special tokens)."""
    out = []
    for i, t in enumerate(texts):
        try:
            out.append(session.encode(t))
        except ExplorerError as e:
            raise HiddenError(f"text {i}: {e}") from None
    return out


def pad_batch(seqs: Sequence[torch.Tensor], padding: str, pad_id: int = 0):
    """(ids, attention mask, position ids, index of each row's last real token) for one batch."""
    lengths = torch.tensor([len(s) for s in seqs])
    width = int(lengths.max())
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for row, s in enumerate(seqs):
        if padding == "right":
            ids[row, :len(s)], mask[row, :len(s)] = s, 1
        else:
            ids[row, width - len(s):], mask[row, width - len(s):] = s, 1
    # Position ids count real tokens only: with left padding the first real token is at 0.
    positions = (mask.cumsum(1) - 1).clamp_min(0)
    last = lengths - 1 if padding == "right" else torch.full_like(lengths, width - 1)
    return ids, mask, positions, last


def _reduce(h: torch.Tensor, sites: Sequence[str], mask: torch.Tensor, last: torch.Tensor) -> list[torch.Tensor]:
    rows = torch.arange(h.shape[0], device=h.device)
    out = []
    for site in sites:
        if site == "last":
            out.append(h[rows, last])
        elif site == "prev":
            first = last - mask.sum(1) + 1     # the first real token (either padding)
            out.append(h[rows, torch.maximum(last - 1, first)])  # a one-token text: its only token
        else:
            # where, not a product: a pad row's output may be NaN (a query with no key to attend to).
            keep = mask.bool()[..., None]
            total = torch.where(keep, h, torch.zeros((), dtype=h.dtype, device=h.device)).float().sum(1)
            out.append(total / mask.sum(1, keepdim=True).float())
    return out


def collect_hidden(session: ModelSession, request: HiddenRequest | None = None, /, *, ctx=None,
                   **fields) -> HiddenStates:
    """Every row's hidden state at each site for every text, from one batched pass.

    >>> from explorer import collect_hidden
    >>> hs = collect_hidden(session, texts=("A cat.", "Paris is in France."), sites=("last", "mean"))
    >>> hs.site("last").shape == (session.n_layers + 1, 2, session.hf.config.hidden_size)
    True
    """
    session.require_local("collecting hidden states (probes, CCS)")
    request = build_request(HiddenRequest, request, fields)
    _check(request)
    seqs = encode_all(session, request.texts)
    n, n_rows, sites = len(seqs), session.n_layers + 1, request.sites
    d = session.hf.config.hidden_size
    device = session.device
    out = torch.empty((len(sites), n_rows, n, d), dtype=torch.float32)
    order = sorted(range(n), key=lambda i: -len(seqs[i]))
    batches = [order[s:s + request.batch_size] for s in range(0, n, request.batch_size)]
    pad_id = session.tokenizer.pad_token_id
    pad_id = 0 if pad_id is None else int(pad_id)
    resid_in = session.hf.get_submodule(session.adapter.resid_in)
    modules = [resid_in, *session.hf_blocks()]
    state: dict = {}

    def hook(row: int):
        def on_output(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            h = h.to(state["mask"].device)  # a sharded model's layer may sit on another device
            for s, value in enumerate(_reduce(h, sites, state["mask"], state["last"])):
                state["rows"][s, row] = value.float()
        return on_output

    with torch.no_grad(), session.lock:
        handles = [m.register_forward_hook(hook(r)) for r, m in enumerate(modules)]
        try:
            for b, idx in enumerate(batches):
                if ctx is not None and ctx.cancelled:
                    raise HiddenError("cancelled")
                ids, mask, positions, last = pad_batch([seqs[i] for i in idx], request.padding, pad_id)
                ids, mask, positions = ids.to(device), mask.to(device), positions.to(device)
                state.update(mask=mask, last=last.to(device),
                             rows=torch.empty((len(sites), n_rows, len(idx), d), dtype=torch.float32, device=device))
                session.hf.base_model(input_ids=ids, attention_mask=mask, position_ids=positions)
                out[:, :, idx] = state["rows"].cpu()
                if ctx is not None:
                    ctx.report(b + 1, len(batches), message="collecting hidden states")
        finally:
            for h in handles:
                h.remove()
    return HiddenStates(
        model=session.name, layer_labels=layer_labels(session.n_layers), sites=tuple(sites),
        states=out.numpy(), n_tokens=np.array([len(s) for s in seqs], dtype=np.int64),
        last_ids=np.array([int(s[-1]) for s in seqs], dtype=np.int64),
    )
