"""Edit and replay: change activations at named sites of a forward pass and read the effect.

Ablation (``explorer.interventions.ablation``), activation patching (``...patching``) and the
coming steering are all *edits* of a forward pass: at a **site** of a block, some slice of one
prompt's activation gets a new value. An ``Edit`` names the site, the block, the slice and what
happens there (its **op**); every tool builds edits and hands them to one of two runners:

- ``nnsight_runs``: the plain path, one nnsight trace with an invoke per edit set (the reference,
  and the logit lens of edited runs);
- ``replay``: the fast path for many edit sets of one prompt. ``run_clean`` runs the prompt once
  and keeps each block's call; ``replay`` then re-runs only the blocks from the first edited one,
  one batch row per edit set (an edit at block L cannot change blocks below L), and unembeds
  only the last position. ``chunks`` groups many edit sets into forwards of bounded size.

Sites (where the edited activation lives, ``row`` = one prompt's [T, width] activation):

- ``head`` / ``neuron``: the input of the attention / MLP output projection (the per-head
  concatenation; the neurons), before the projection;
- ``attn`` / ``mlp``: the output of the block's attention / MLP module;
- ``resid``: the block's output (the residual stream after the block);
- ``block``: the block's *contribution* (output − input); an edit there acts on the
  contribution and the output becomes input + the edited contribution.

Ops (``OPS``; ``value`` is the edit's tensor, broadcast over the slice):

- ``set``: ``x := value`` (0 when value is None): zero, mean and resample ablation, patching;
- ``add``: ``x := x + value``: steering by adding α·v to a block's output;
- ``project_out``: ``x := x − (x·v) v`` for a unit vector v: removing a direction (at every
  layer: one edit per block).

Further ops (e.g. clamping SAE features, whose op needs the SAE's encoder and decoder) are a
function ``(x, value) -> new x`` registered with ``register_op``; ``nnsight_runs`` and ``replay``
apply any registered op, so a new kind of edit needs no change here, in ablation or patching.
An op registered with ``reads_input=True`` at the ``mlp`` site is ``(x, value, mlp_input) -> new
x``: it also sees the MLP's input at the same positions (a transcoder's features are a function
of the MLP's input and write into its output).

The metric all of them read is the target's logit at the last position, minus a compare
token's when given (``metric``; tokens resolved by ``resolve_tokens``).
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import nnsight
import torch

from explorer.core.components import Component, Geometry, geometry
from explorer.core.errors import ExplorerError
from explorer.core.jobs import Unfinished
from explorer.core.modules import submodule
from explorer.core.placement import memory_budget
from explorer.core.session import ModelSession

SITES = ("head", "attn", "neuron", "mlp", "block", "resid")
# The order a block runs its sites in (edits are applied in this order).
SITE_ORDER = {"head": 0, "attn": 1, "neuron": 2, "mlp": 3, "block": 4, "resid": 4}
CHUNK_TOKENS = 4096    # batch rows × prompt tokens per replayed forward, at most (see ``replay_tokens``)
MERGE_TOKENS = 128     # below this many tokens a chunk also takes the next layer's edit sets
REMOTE_BATCH = 64      # edited runs (invokes) per request to a remote model
TRIM_LAST_BLOCK = True  # replay: run the last block's output projection and MLP on the last position only

EditOp = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]


class EditError(ExplorerError):
    """Bad input to an edit (ablation, patching, steering): a site, a token, prompts of unequal length."""


# =================================================================================== ops
def _set(x: torch.Tensor, value: torch.Tensor | None) -> torch.Tensor:
    return torch.zeros_like(x) if value is None else value.to(x.dtype).expand_as(x)


def _add(x: torch.Tensor, value: torch.Tensor | None) -> torch.Tensor:
    return x if value is None else x + value.to(x.dtype)


def _project_out(x: torch.Tensor, value: torch.Tensor | None) -> torch.Tensor:
    if value is None:
        raise EditError("project_out needs a direction (the edit's value)")
    v = value.to(x.dtype)
    return x - (x @ v)[..., None] * v


OPS: dict[str, EditOp] = {"set": _set, "add": _add, "project_out": _project_out}
INPUT_OPS: set[str] = set()  # ops that also read the MLP's input (``register_op(reads_input=True)``)


def register_op(name: str, fn: Callable[..., torch.Tensor], reads_input: bool = False) -> None:
    """Add an edit op: ``fn(x, value)`` returns the new activation slice (same shape as ``x``);
    with ``reads_input`` it is ``fn(x, value, mlp_input)`` and may only edit the ``mlp`` site."""
    if name in OPS and OPS[name] is not fn:
        raise EditError(f"an edit op named {name!r} exists already")
    OPS[name] = fn
    if reads_input:
        INPUT_OPS.add(name)


# ================================================================================= edits
@dataclass(frozen=True, eq=False)
class Edit:
    """One edit of one prompt's activation at a site of block ``layer``: the slice
    ``row[index]`` becomes ``OPS[op](row[index], value)`` (see the module docstring)."""

    site: str
    layer: int
    index: tuple
    value: torch.Tensor | None = None
    op: str = "set"

    def __post_init__(self) -> None:
        if self.site not in SITES:
            raise EditError(f"unknown site {self.site!r}: use one of {', '.join(SITES)}")
        if self.op not in OPS:
            raise EditError(f"unknown edit op {self.op!r}: use one of {', '.join(OPS)} (or register_op)")
        if self.op in INPUT_OPS and self.site != "mlp":
            raise EditError(f"the edit op {self.op!r} reads the MLP's input: it edits the mlp site, not {self.site!r}")


def apply_edit(row: torch.Tensor, e: Edit, inp_row: torch.Tensor | None = None) -> None:
    """Apply ``e`` in place to ``row`` (one prompt's activation at its site); ``inp_row`` is the
    block's input, needed for ``block`` edits (which act on the contribution, output − input), or
    the MLP's input for ``mlp`` edits whose op reads it (``INPUT_OPS``).
    Values and inputs from another device (a sharded model's other layers) are moved to the row's."""
    value = e.value
    if value is not None and value.device != row.device:
        value = value.to(row.device)
    if e.op == "set" and e.site != "block":  # the common case, written directly
        row[e.index] = 0 if value is None else value
        return
    fn = OPS[e.op]
    if e.op in INPUT_OPS:
        if inp_row is None:
            raise EditError(f"the edit op {e.op!r} needs the MLP's input, which this runner did not pass")
        row[e.index] = fn(row[e.index], value, inp_row[e.index].to(row.device))
    elif e.site == "block":
        base = inp_row[e.index].to(row.device)
        row[e.index] = base + fn(row[e.index] - base, value)
    else:
        row[e.index] = fn(row[e.index], value)


def component_index(c: Component, geom: Geometry) -> tuple:
    """The slice of its site's [T, width] activation that a component occupies."""
    if c.kind == "head":
        return (slice(None), slice(c.index * geom.d_head, (c.index + 1) * geom.d_head))
    if c.kind == "neuron":
        return (slice(None), c.index)
    return (Ellipsis,)


def component_edit(c: Component, geom: Geometry, mode: str,
                   source: dict[str, torch.Tensor] | None = None) -> Edit:
    """The edit that ablates ``c``: ``zero``, or set to ``source[site]``, which holds [L, W]
    means for ``mean`` and [L, T, W] activations of a second prompt for ``resample``."""
    idx = component_index(c, geom)
    if mode == "zero":
        return Edit(c.kind, c.layer, idx)
    values = source[c.kind][c.layer]
    value = values[idx[1:]] if mode == "mean" else values[idx]
    return Edit(c.kind, c.layer, idx, value)


def site_path(session: ModelSession, site: str) -> str | None:
    """Module path (relative to a block) of a site; None for the block itself (block, resid)."""
    a = session.adapter
    return {"head": a.attn_out, "neuron": a.mlp_out, "attn": a.attn, "mlp": a.mlp}.get(site)


def first(x):
    """A module's main output (the first item when it returns a tuple)."""
    return x[0] if isinstance(x, tuple) else x


def mlp_input(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """An MLP call's hidden-states input (its first tensor argument, positional or keyword)."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    return None


@contextmanager
def hooked() -> Iterator[list]:
    """A list to put hook handles in; every one is removed when the block ends."""
    handles: list = []
    try:
        yield handles
    finally:
        for h in handles:
            h.remove()


# ================================================================================ metric
def resolve_tokens(session: ModelSession, target: str, compare: str | None) -> tuple[int, int | None]:
    """Token ids of the target and the (optional) compare token; they must differ."""
    tid = session.token_id(target)
    cid = None if compare in (None, "") else session.token_id(compare)
    if cid is not None and cid == tid:
        raise EditError("the compare token is the target itself: pick a different token to compare with")
    return tid, cid


def metric(logits: torch.Tensor, tid: int, cid: int | None) -> torch.Tensor:
    """Metric per row of [..., V] logits: target logit, minus the compare token's when given."""
    m = logits[..., tid]
    return m - logits[..., cid] if cid is not None else m


# ============================================================================ clean runs
@dataclass
class CleanRun:
    """What one plain forward of a prompt left behind: each block's call (args, kwargs), the
    last-position logits, and the activations at the requested sites ([T, W] per layer)."""

    ids: torch.Tensor
    calls: list[tuple[tuple, dict]]
    logits: torch.Tensor
    acts: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return int(self.ids.numel())

    def stacked(self, site: str) -> torch.Tensor:
        """[L, T, W] on the first layer's device (a sharded model's layers sit on several)."""
        rows = self.acts[site]
        return torch.stack([r.to(rows[0].device) for r in rows])


def run_clean(session: ModelSession, ids: torch.Tensor, sites: Iterable[str] = ()) -> CleanRun:
    """One plain forward (no nnsight) with hooks that capture each block's call and site activations."""
    sites = set(sites)
    unknown = sites - set(SITES)
    if unknown:
        raise EditError(f"unknown site {sorted(unknown)[0]!r}: use one of {', '.join(SITES)}")
    if session.remote:
        return traced_clean(session, ids, sites)
    L = session.n_layers
    calls: list = [None] * L
    acts: dict[str, list] = {s: [None] * L for s in sites}
    blocks = session.hf_blocks()
    with torch.no_grad(), session.lock, hooked() as handles:
        for l in range(L):
            block = blocks[l]

            def pre(mod, args, kwargs, l=l):
                calls[l] = (tuple(args), dict(kwargs))

            handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
            for site in sites:
                if site in ("head", "neuron"):
                    def cap_in(mod, args, l=l, site=site):
                        acts[site][l] = args[0][0].detach().clone()
                    handles.append(block.get_submodule(site_path(session, site)).register_forward_pre_hook(cap_in))
                elif site in ("attn", "mlp"):
                    def cap_out(mod, args, out, l=l, site=site):
                        acts[site][l] = first(out)[0].detach().clone()
                    handles.append(block.get_submodule(site_path(session, site)).register_forward_hook(cap_out))
                else:
                    def cap_blk(mod, args, kwargs, out, l=l, site=site):
                        out = first(out)[0]
                        if site == "block":
                            inp = args[0] if args else kwargs["hidden_states"]
                            out = out - inp[0].to(out.device)
                        acts[site][l] = out.detach().clone()
                    handles.append(block.register_forward_hook(cap_blk, with_kwargs=True))
        logits = last_logits(session, ids)
    return CleanRun(ids=ids, calls=calls, logits=logits, acts=acts)


def traced_clean(session: ModelSession, ids: torch.Tensor, sites: Iterable[str] = ()) -> CleanRun:
    """``run_clean`` as one nnsight trace (how a remote model runs it): the site activations and
    the last position's logits, but no block calls (a remote model's edited runs are traces too:
    ``replay`` sends them through ``nnsight_runs``)."""
    order = sorted(set(sites), key=lambda s: SITE_ORDER[s])  # visit in execution order
    blocks = session.blocks()
    unembed = session.module(session.adapter.unembed)
    paths = {site: site_path(session, site) for site in order}
    acts: dict[str, list] = {s: [] for s in order}
    x = ids[None].to(session.device)
    with torch.no_grad(), session.lock:
        with session.trace(x, logits_to_keep=1):  # no ``session`` in here: see session.trace
            nnsight.save(acts)
            for blk in blocks:
                inp = blk.input if "block" in order else None
                for site in order:
                    if site in ("head", "neuron"):
                        value = submodule(blk, paths[site]).input
                    elif site in ("attn", "mlp"):
                        value = first(submodule(blk, paths[site]).output)
                    elif site == "block":
                        value = first(blk.output) - inp
                    else:
                        value = first(blk.output)
                    acts[site].append(value[0].save())
            normed = unembed.input.save()
    logits = session.logits(normed[0, -1], normed=True)
    return CleanRun(ids=ids, calls=[], logits=logits,
                    acts={s: [a.detach().clone() for a in acts[s]] for s in order})


def last_logits(session: ModelSession, ids: torch.Tensor) -> torch.Tensor:
    """One plain forward of a prompt [T] (with whatever hooks are set; call under the lock): the
    last position's float32 logits, read through ``session.logits`` from the unembedding's input."""
    seen: dict[str, torch.Tensor] = {}

    def grab(mod, args):
        seen["normed"] = args[0]

    handle = session.unembedding.unembed.register_forward_pre_hook(grab)
    try:
        x = ids[None].to(session.device)
        session.hf(input_ids=x, attention_mask=torch.ones_like(x), logits_to_keep=1)
    finally:
        handle.remove()
    return session.logits(seen["normed"][0, -1], normed=True)


# ========================================================================= nnsight path
def _nn_block(blk, paths: dict[str, str | None], edits: list[Edit], want_output: bool):
    """Apply edits to one block inside an nnsight invoke, visiting sites in execution order
    (``paths``: each site's module path in the block, from ``site_path``).

    Returns the block's output tensor (edited) when asked for or edited, else None.
    """
    by_site: dict[str, list[Edit]] = defaultdict(list)
    for e in edits:
        by_site[e.site].append(e)
    inp = blk.input if by_site.get("block") else None
    for site in ("head", "attn", "neuron", "mlp"):
        if not by_site.get(site):
            continue
        mod = submodule(blk, paths[site])
        # An op reading the MLP's input (a transcoder's features) gets it; read before the output
        # (nnsight visits a module's input, then its output).
        mlp_in = mod.input[0] if site == "mlp" and any(e.op in INPUT_OPS for e in by_site[site]) else None
        x = mod.input if site in ("head", "neuron") else first(mod.output)
        for e in by_site[site]:
            apply_edit(x[0], e, mlp_in)
    if not (want_output or by_site.get("block") or by_site.get("resid")):
        return None
    out = first(blk.output)
    for e in by_site.get("block", []) + by_site.get("resid", []):
        apply_edit(out[0], e, None if inp is None else inp[0])
    return out


def nnsight_runs(session: ModelSession, ids: torch.Tensor, edit_sets: Sequence[Sequence[Edit]],
                 streams: bool = False) -> list[dict[str, torch.Tensor]]:
    """One nnsight trace, one invoke per edit set (an empty set is the clean run).

    Returns per invoke ``logits`` [V] (float32, last position) and, with ``streams``, the
    residual ``stream`` [1 + L, T, d] (embeddings, then each block's output) for the logit lens.
    A remote session's edit sets go ``REMOTE_BATCH`` per request (a sweep is a few requests).
    """
    if session.remote and len(edit_sets) > REMOTE_BATCH:
        return [r for start in range(0, len(edit_sets), REMOTE_BATCH)
                for r in nnsight_runs(session, ids, edit_sets[start:start + REMOTE_BATCH], streams)]
    L = session.n_layers
    blocks = session.blocks()
    resid_in = session.module(session.adapter.resid_in)
    unembed = session.module(session.adapter.unembed)
    paths = {site: site_path(session, site) for site in SITES}
    saved: list[dict[str, Any]] = [{"rows": []} for _ in edit_sets]
    plans: list[dict[int, list[Edit]]] = []
    for edits in edit_sets:
        by_layer: dict[int, list[Edit]] = defaultdict(list)
        for e in edits:
            by_layer[e.layer].append(e)
        plans.append(dict(by_layer))
    x = ids[None].to(session.device)
    # No ``session`` inside the block: a remote trace ships the block's variables to the server.
    with torch.no_grad(), session.lock:
        with session.trace(logits_to_keep=1) as tracer:
            for i, by_layer in enumerate(plans):
                with tracer.invoke(x):
                    nnsight.save(saved)  # a remote run returns only what was marked saved
                    if streams:
                        saved[i]["rows"].append(resid_in.output.save())
                    for l in range(L):
                        if not streams and not by_layer.get(l):
                            continue
                        out = _nn_block(blocks[l], paths, by_layer.get(l, []), streams)
                        if streams:
                            saved[i]["rows"].append(out.save())
                    # The unembedding's input (normed, last position): logits come from session.logits.
                    saved[i]["normed"] = unembed.input.save()
    results = []
    device = session.unembedding.device
    for s in saved:
        r = {"logits": session.logits(s["normed"][0, -1], normed=True)}
        if streams:
            r["stream"] = torch.stack([row[0].to(device) for row in s["rows"]])
        results.append(r)
    return results


# ======================================================================= batched replay
def _fit(value: Any, n: int) -> Any:
    """Give batch-1 tensors (dim ≥ 2) of a block's arguments a batch of n (a view)."""
    if isinstance(value, torch.Tensor):
        if n > 1 and value.dim() >= 2 and value.shape[0] == 1:
            return value.expand(n, *value.shape[1:])
        return value
    if isinstance(value, tuple):
        return tuple(_fit(v, n) for v in value)
    if isinstance(value, list):
        return [_fit(v, n) for v in value]
    return value


def _rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """A writable [n, ...] copy of x (x has batch 1 or n)."""
    if x.shape[0] == n:
        return x.clone()
    return x.expand(n, *x.shape[1:]).clone()


def _apply_rows(x: torch.Tensor, n: int, items: list[tuple[int, Edit]], inp: torch.Tensor | None) -> torch.Tensor:
    x = _rows(x, n)
    for b, e in items:
        apply_edit(x[b], e, None if inp is None else inp[b if inp.shape[0] == n else 0])
    return x


def replay(session: ModelSession, run: CleanRun, rows: Sequence[Sequence[Edit]]) -> torch.Tensor:
    """Last-position logits [B, V] (float32) of B edited runs, replaying blocks from the first edit.

    Blocks below the earliest edited layer are not run: their output is the clean run's. The
    replay starts from the cached input at batch 1; the first edit expands it to B rows. When
    the last block has no edits, its output projection and MLP run on the last position only.
    Call under ``session.lock``, with gradients off.
    """
    if session.remote:  # no weights here to replay blocks with: one invoke per row, remotely
        return torch.stack([r["logits"] for r in nnsight_runs(session, run.ids, rows)])
    n = len(rows)
    L = session.n_layers
    blocks = session.hf_blocks()
    start = min(e.layer for row in rows for e in row)
    groups: dict[tuple[str, int], list[tuple[int, Edit]]] = defaultdict(list)
    for b, row in enumerate(rows):
        for e in row:
            groups[e.site, e.layer].append((b, e))
    with hooked() as handles:
        for (site, layer), items in sorted(groups.items(), key=lambda kv: (kv[0][1], SITE_ORDER[kv[0][0]])):
            block = blocks[layer]
            if site in ("head", "neuron"):
                def pre(mod, args, items=items):
                    return (_apply_rows(args[0], n, items, None),) + tuple(args[1:])
                handles.append(block.get_submodule(site_path(session, site)).register_forward_pre_hook(pre))
            elif site in ("attn", "mlp"):
                def post(mod, args, kwargs, out, items=items, site=site):
                    inp = mlp_input(args, kwargs) if site == "mlp" else None
                    if isinstance(out, tuple):
                        return (_apply_rows(out[0], n, items, inp),) + tuple(out[1:])
                    return _apply_rows(out, n, items, inp)
                handles.append(block.get_submodule(site_path(session, site)).register_forward_hook(
                    post, with_kwargs=True))
            else:
                def post_blk(mod, args, kwargs, out, items=items):
                    inp = args[0] if args else kwargs["hidden_states"]
                    if isinstance(out, tuple):
                        return (_apply_rows(out[0], n, items, inp),) + tuple(out[1:])
                    return _apply_rows(out, n, items, inp)
                handles.append(block.register_forward_hook(post_blk, with_kwargs=True))
        if TRIM_LAST_BLOCK and run.n_tokens > 1 and all(layer < L - 1 for _, layer in groups):
            # Only the last position of the last block is read: its output projection and MLP are
            # position-wise, so run them on that position alone. The block's residual adds then
            # broadcast, leaving the other positions meaningless but the last one exact.
            last = blocks[L - 1]

            def last_only(mod, args):
                return (args[0][:, -1:],) + tuple(args[1:])

            for path in (session.adapter.attn_out, session.adapter.mlp):
                handles.append(last.get_submodule(path).register_forward_pre_hook(last_only))
        h = None
        for l in range(start, L):
            args, kwargs = run.calls[l]
            if args:
                h = args[0] if h is None else h
                b = h.shape[0]
                out = blocks[l](h, *_fit(args[1:], b), **_fit(kwargs, b))
            else:  # hidden states passed by keyword
                h = kwargs["hidden_states"] if h is None else h
                b = h.shape[0]
                kw = _fit(kwargs, b)
                kw["hidden_states"] = h
                out = blocks[l](**kw)
            h = first(out)
    last = h[:, -1]
    if last.shape[0] != n:
        last = last.expand(n, -1)
    return session.logits(last)


def replay_tokens(session: ModelSession, n_tokens: int) -> int:
    """Batch rows × tokens for one replayed forward of an ``n_tokens`` prompt: ``CHUNK_TOKENS``,
    fewer when a quarter of the free memory cannot hold their activations, never less than one row.

    Per token alive in one block: the residual, norms, q/k/v and attention output (~8·d), the
    MLP's gate/up/activation (~4·d_mlp) in the model's dtype, float32 norm upcasts (2·d) and an
    attention score row (heads × tokens); per row the last position's float32 logits (2 × vocab:
    the matmul's output and its float32 copy).
    """
    g = geometry(session)
    elem = session.dtype.itemsize
    per_token = (8 * g.d_model + 4 * g.d_mlp) * elem + 8 * g.d_model + 4 * g.n_heads * n_tokens
    per_row = n_tokens * per_token + 8 * session.unembedding.vocab_size
    rows = memory_budget(session.device) // per_row
    return max(n_tokens, min(CHUNK_TOKENS, rows * n_tokens))


def chunks(items: Sequence[tuple[int, Any]], n_tokens: int, max_tokens: int | None = None,
           merge_tokens: int | None = None) -> list[list[tuple[int, Any]]]:
    """Group (layer, item) pairs, sorted by layer, into forwards of ≤ max_tokens rows × tokens.

    A chunk holds one layer's items; the next layer's join it while the chunk is under
    ``merge_tokens`` (short prompts: fewer, fuller forwards). Defaults: ``CHUNK_TOKENS``,
    ``MERGE_TOKENS``.
    """
    max_tokens = CHUNK_TOKENS if max_tokens is None else max_tokens
    merge_tokens = MERGE_TOKENS if merge_tokens is None else merge_tokens
    max_rows = max(1, max_tokens // max(1, n_tokens))
    out: list[list] = []
    cur: list = []
    for item in sorted(items, key=lambda it: it[0]):
        if cur and (len(cur) >= max_rows or (item[0] != cur[-1][0] and len(cur) * n_tokens >= merge_tokens)):
            out.append(cur)
            cur = []
        cur.append(item)
    if cur:
        out.append(cur)
    return out


# ======================================================================= sweep loops
def target_fields(session: ModelSession, tid: int, cid: int | None) -> dict[str, Any]:
    """The ``target``, ``target_id``, ``compare`` and ``compare_id`` fields of a result."""
    return {"target": str(session.decode_each([tid])[0]), "target_id": tid,
            "compare": None if cid is None else str(session.decode_each([cid])[0]), "compare_id": cid}


def edit_batches(session: ModelSession, items: Sequence[tuple[int, Any]], n_tokens: int,
                 one_each: bool = False) -> list[list[tuple[int, Any]]]:
    """Group (layer, item) pairs into the forwards that run them: ``REMOTE_BATCH`` per request for
    a remote model (in order), one per forward with ``one_each`` (a sequential sweep), else
    ``chunks`` of what fits in memory (``replay_tokens``)."""
    if session.remote:
        return [list(items[s:s + REMOTE_BATCH]) for s in range(0, len(items), REMOTE_BATCH)]
    if one_each:
        return [[item] for item in items]
    return chunks(items, n_tokens, replay_tokens(session, n_tokens))


R = TypeVar("R")
K = TypeVar("K")


def measure_batches(session: ModelSession, run: CleanRun, batches: Sequence[Sequence[tuple[int, K]]],
                    edits_for: Callable[[K], list[Edit]], store: Callable[[list[K], torch.Tensor], None],
                    tid: int, cid: int | None, *, make: Callable[[int], R], message: Callable[[K], str],
                    ctx: Any = None, plain: bool = False) -> R:
    """The loop of a sweep or of patching: run each batch's edited runs, hand their metrics to
    ``store(keys, metric [B])``, and report ``make(done)`` to ``ctx`` after each batch.

    A batch's runs replay ``run`` (``plain``: one ``nnsight_runs`` trace instead, the reference
    path). ``ctx.cancelled`` stops the loop between batches: then ``Unfinished(make(done))`` is
    raised; otherwise ``make(total)`` is returned.
    """
    total, done = sum(len(b) for b in batches), 0
    for batch in batches:
        if ctx is not None and ctx.cancelled:
            break
        keys = [k for _, k in batch]
        rows = [edits_for(k) for k in keys]
        if plain:
            logits = torch.stack([r["logits"] for r in nnsight_runs(session, run.ids, rows)])
        else:
            with torch.no_grad(), session.lock:
                logits = replay(session, run, rows)
        store(keys, metric(logits, tid, cid))
        done += len(keys)
        if ctx is not None:
            ctx.report(done, total, partial=make(done), message=message(keys[-1]))
    result = make(done)
    if done < total:
        raise Unfinished(result)
    return result
