"""Generation with the KV cache, with and without an intervention (A/B), token by token.

``generate`` runs the prompt once (the prefill) and then one token per forward, reusing the
model's key/value cache, as transformers' ``generate`` does; greedy decoding picks the arg-max
of the model's own float32 logits, so its tokens equal ``model.generate(do_sample=False)``'s
(tested). Sampling divides the logits by the temperature, keeps the smallest set of tokens whose
probabilities add up to ``top_p`` and draws from a ``torch.Generator`` seeded with ``seed``, one
per arm, on the CPU (so the same seed gives the same draws on any device).

An **intervention** (``Intervention``) is what the B arm changes in every forward, built from
the shared edits (``explorer.interventions.edits``): ablated components (heads, neurons,
attn/mlp/blocks; zero or mean, as the Ablation tab), a steering vector added at block L's output
(at every position, the prompt's last, or the generated positions only), and a direction
projected out of every write to the residual stream (directional ablation, Arditi et al. 2024:
the embeddings and every attention and MLP output), and SAE features ablated or clamped at the
SAE's site with its error term kept (``explorer.features.edits``: ``sae`` a folder in the SAELens
layout, ``features`` e.g. "123, 456=5"). Both arms run as two rows of one batch, so
they stream side by side; with the same seed their sampling draws are the same, and an
intervention that changes nothing gives two identical arms (tested).

The edits are applied by plain PyTorch hooks (``EditHooks``) whose per-row edits are set before
each forward: an edit limited to some positions (steering the prompt's last token, or the
generated ones) is re-indexed for the positions that forward covers. The same hooks capture, at
each forward's last position, the residual stream after the embeddings and after every block:
the logit-lens column of the token chosen there (``lens=True``; ``analyses.lens.reduce_rows``).

Stopping: ``max_new_tokens``, the end-of-sequence token, a stop string appearing in the
generated text, or a ``threading.Event`` checked after every token (so a Stop takes effect
within one token). ``on_token(step, pieces)`` is called after every token with each arm's new
text (None for an arm that has finished), for streaming.
"""
from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from explorer.analyses.lens import layer_labels, reduce_rows
from explorer.core.components import Component, components_for, geometry
from explorer.core.errors import ExplorerError
from explorer.core.jobs import JobContext
from explorer.core.requests import build_request
from explorer.core.results import Result, array, sized
from explorer.core.session import ModelSession
from explorer.interventions.edits import (
    SITE_ORDER,
    Edit,
    EditError,
    apply_edit,
    component_edit,
    first,
    hooked,
    mlp_input,
    site_path,
)

POSITIONS = ("all", "last", "generated")
ABLATION_MODES = ("zero", "mean")
MAX_NEW_TOKENS = 1024
LENS_TOP_K = 5


class GenerateError(ExplorerError):
    """Bad generation settings: a temperature, top-p, token count, a chat template that is missing."""


# ============================================================================ requests
@dataclass(frozen=True)
class Intervention:
    """What the B arm changes in every forward (any part may be left out).

    ``components``: ablation specs ('3.1', '5:1024', 'mlp:2', 'block:4'), ``mode`` zero or mean;
    ``steer``: a vector [d_model] added as ``alpha * steer`` to block ``layer``'s output at
    ``positions`` (all, the prompt's ``last`` token, or the ``generated`` tokens only);
    ``direction``: a vector whose direction is projected out of every write to the residual stream;
    ``features``: SAE features of the SAE in folder ``sae`` to ablate ("123") or clamp ("456=5"),
    at every position, the SAE's error term kept.
    """

    components: tuple[str, ...] = ()
    mode: str = "zero"
    steer: tuple[float, ...] | None = None
    layer: int | None = None
    alpha: float = 0.0
    positions: str = "all"
    direction: tuple[float, ...] | None = None
    label: str = ""          # e.g. the steering vector's file or method, shown beside the arm
    sae: str = ""            # an SAE folder (SAELens layout), for ``features``
    features: str = ""       # e.g. "123, 456=5.0": ablate 123, clamp 456 to 5

    def __post_init__(self) -> None:
        for name in ("steer", "direction"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(float(x) for x in np.asarray(value, np.float64).reshape(-1)))
        if isinstance(self.components, str):
            object.__setattr__(self, "components", tuple(self.components.replace(",", " ").split()))
        if not isinstance(self.features, str):
            object.__setattr__(self, "features", ", ".join(str(f) for f in self.features))

    @property
    def empty(self) -> bool:
        return not self.components and self.steer is None and self.direction is None and not self.features.strip()

    def describe(self) -> str:
        parts = []
        if self.components:
            parts.append(f"ablate {','.join(self.components)} ({self.mode})")
        if self.steer is not None:
            parts.append(f"steer L{self.layer} α={self.alpha:g} ({self.positions})")
        if self.direction is not None:
            parts.append("direction ablated")
        if self.features.strip():
            parts.append(f"SAE features {self.features.strip()}")
        text = "; ".join(parts) or "no change"
        return f"{text} [{self.label}]" if self.label else text


@dataclass(frozen=True)
class GenerateRequest:
    """Generate up to ``max_new_tokens`` after ``prompt``; ``temperature`` 0 = greedy.

    With ``intervention`` a second arm runs with it (same seed; ``compare=False``: only that arm);
    ``lens`` adds each generated
    token's logit-lens column (top ``top_k`` per layer, and the chosen token's rank per layer).
    """

    prompt: str
    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    chat: bool = False
    intervention: Intervention | None = None
    compare: bool = True          # with an intervention: also run the plain arm (A/B)
    lens: bool = False
    top_k: int = LENS_TOP_K

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,) if self.stop else ())


# ============================================================================= results
@dataclass(frozen=True, eq=False)
class Generation(Result):
    """One arm's generated tokens (and, with the lens, per token and layer: top tokens, and the
    chosen token's probability and rank; column n is read where token n was predicted)."""

    label: str
    text: str
    tokens: np.ndarray = array("N", "str")
    token_ids: np.ndarray = array("N", "int64")
    stop_reason: str = "length"   # length, eos, stop string, stopped
    top_ids: np.ndarray | None = array("R N k", "int64", default=None)
    top_tokens: np.ndarray | None = array("R N k", "str", default=None)
    top_probs: np.ndarray | None = array("R N k", "float32", default=None)
    chosen_probs: np.ndarray | None = array("R N", "float32", default=None)
    chosen_ranks: np.ndarray | None = array("R N", "int64", default=None)

    @property
    def has_lens(self) -> bool:
        return self.chosen_ranks is not None

    def commit_layer(self, n: int, rank: int = 1) -> int | None:
        """The first row from which token n stays at rank ≤ ``rank`` up to the last layer (None: never)."""
        if not self.has_lens:
            return None
        ok = self.chosen_ranks[:, n] <= rank
        if not ok[-1]:
            return None
        bad = np.flatnonzero(~ok)
        return 0 if len(bad) == 0 else int(bad[-1]) + 1


@dataclass(frozen=True, eq=False)
class GenerateResult(Result):
    """The generated text of the plain arm and (with an intervention) the intervened arm; one of
    them is None when it did not run (no intervention; ``compare=False``)."""

    request: GenerateRequest
    model: str
    prompt_text: str                                # the text run (after the chat template)
    prompt_tokens: np.ndarray = array("T", "str")
    prompt_ids: np.ndarray = array("T", "int64")
    layer_labels: tuple[str, ...] = sized("R")
    baseline: Generation | None = None
    intervened: Generation | None = None
    seconds: float = 0.0
    first_token_seconds: float = 0.0

    @property
    def arms(self) -> tuple[Generation, ...]:
        return tuple(a for a in (self.baseline, self.intervened) if a is not None)

    @property
    def main(self) -> Generation:
        """The intervened arm when there is one, else the plain arm."""
        return self.intervened if self.intervened is not None else self.baseline

    @property
    def text(self) -> str:
        return self.main.text

    def relations(self) -> str | None:
        for arm in self.arms:
            if arm.has_lens and arm.chosen_ranks.shape[0] != len(self.layer_labels):
                rows = arm.chosen_ranks.shape[0]
                return f"arm {arm.label!r} has {rows} lens rows for {len(self.layer_labels)} layers"
        return None


# ================================================================================ plans
@dataclass
class Plan:
    """One arm's edits: ``fixed`` apply at every position of every forward; ``steer`` at the
    positions ``positions`` names; ``embed`` is a unit direction projected out of the embeddings."""

    fixed: list[Edit] = field(default_factory=list)
    steer: list[Edit] = field(default_factory=list)
    positions: str = "all"
    embed: torch.Tensor | None = None

    def sites(self) -> set[tuple[str, int]]:
        return {(e.site, e.layer) for e in self.fixed + self.steer}

    def at(self, start: int, n: int, prompt_len: int) -> list[Edit]:
        """The edits of a forward covering positions start .. start + n − 1."""
        out = list(self.fixed)
        if not self.steer or self.positions == "all":
            return out + self.steer      # built with index (Ellipsis,): every position
        if self.positions == "last":
            lo, hi = prompt_len - 1 - start, prompt_len - start
        else:  # generated: positions ≥ prompt_len
            lo, hi = max(0, prompt_len - start), n
        lo, hi = max(lo, 0), min(hi, n)
        if lo >= hi:
            return out
        index = (Ellipsis,) if (lo, hi) == (0, n) else (slice(lo, hi),)
        out += [Edit(e.site, e.layer, index, e.value, e.op) for e in self.steer]
        return out


def _vector(session: ModelSession, values, what: str) -> torch.Tensor:
    v = torch.as_tensor(np.asarray(values, np.float32)).reshape(-1)
    d = int(session.hf.config.hidden_size)
    if v.numel() != d:
        raise EditError(f"the {what} has {v.numel()} values but the model's residual stream has {d}: "
                        f"it was made for another model")
    if not torch.isfinite(v).all():
        raise EditError(f"the {what} contains NaN or infinite values")
    return v.to(session.device, session.dtype)


def check_layer(session: ModelSession, layer: int | None, what: str = "steering") -> int:
    """A block index that exists in the model, or a clear error."""
    L = session.n_layers
    if layer is None or not 0 <= int(layer) < L:
        raise EditError(f"{what} layer {layer} does not exist: the model has {L} layers (0-{L - 1})")
    return int(layer)


def plan_for(session: ModelSession, iv: Intervention | None, ids: torch.Tensor | None = None,
             mean_text: str | None = None) -> Plan:
    """The edits of an intervention on this model (checked: components, layer, vector widths)."""
    plan = Plan()
    if iv is None or iv.empty:
        return plan
    if iv.positions not in POSITIONS:
        raise EditError(f"unknown steering positions {iv.positions!r}: use one of {', '.join(POSITIONS)}")
    if iv.components:
        if iv.mode not in ABLATION_MODES:
            raise EditError(f"generation ablates with zero or mean, not {iv.mode!r} (resample needs a "
                            f"second prompt of the same length, which a growing text does not have)")
        from explorer.interventions.ablation import mean_activations_many

        comps: tuple[Component, ...] = components_for(session, iv.components)
        geom = geometry(session)
        source = mean_activations_many(session, {c.kind for c in comps}, mean_text) if iv.mode == "mean" else None
        plan.fixed += [component_edit(c, geom, iv.mode, source) for c in comps]
    if iv.steer is not None:
        layer = check_layer(session, iv.layer)
        v = _vector(session, iv.steer, "steering vector")
        plan.steer.append(Edit("resid", layer, (Ellipsis,), float(iv.alpha) * v, op="add"))
        plan.positions = iv.positions
    if iv.direction is not None:
        u = _vector(session, iv.direction, "ablated direction").float()
        norm = u.norm()
        if norm == 0:
            raise EditError("the ablated direction is zero: it has no direction to remove")
        u = (u / norm).to(session.dtype)
        for layer in range(session.n_layers):
            for site in ("attn", "mlp"):
                plan.fixed.append(Edit(site, layer, (Ellipsis,), u, op="project_out"))
        plan.embed = u
    if iv.features.strip():
        from explorer.features.edits import feature_edits, sae_for

        if not iv.sae:
            raise EditError("feature edits need an SAE folder (SAELens layout): give sae=")
        plan.fixed += feature_edits(sae_for(session, iv.sae), iv.features)
    return plan


# ================================================================================ hooks
class EditHooks:
    """Plain forward hooks on a session's model that apply each batch row's edits.

    ``set(rows)`` gives the edits of the next forward (one list per batch row); with
    ``capture`` the residual stream at the forward's last position, after the embeddings and
    after each block, is kept in ``captured`` ([B, 1 + L, d]).
    """

    def __init__(self, session: ModelSession, plans: Sequence[Plan], capture: bool = False,
                 broadcast: bool = False) -> None:
        self.session = session
        self.plans = list(plans)
        self.capture = capture
        self.broadcast = broadcast  # one plan for every batch row (any batch size)
        if broadcast and len(self.plans) != 1:
            raise EditError("a broadcast edit set has exactly one plan")
        self.current: dict[tuple[str, int], list[tuple[int, Edit]]] = {}
        self.captured: torch.Tensor | None = None
        self._rows: list = []
        self._cm = None

    def set(self, start: int, n: int, prompt_len: int) -> None:
        """Edits of a forward covering positions start .. start + n − 1."""
        groups: dict[tuple[str, int], list[tuple[int | None, Edit]]] = defaultdict(list)
        for b, plan in enumerate(self.plans):
            for e in plan.at(start, n, prompt_len):
                groups[e.site, e.layer].append((None if self.broadcast else b, e))
        self.current = dict(groups)

    def __enter__(self) -> EditHooks:
        self._cm = hooked()
        handles = self._cm.__enter__()
        session = self.session
        blocks = session.hf_blocks()
        L = len(blocks)
        sites: set[tuple[str, int]] = set()
        for plan in self.plans:
            sites |= plan.sites()
        embeds = [(None if self.broadcast else b, p.embed) for b, p in enumerate(self.plans) if p.embed is not None]
        if embeds:
            def embed_pre(mod, args, kwargs):
                if args:
                    h = self._project(args[0], embeds)
                    return (h,) + tuple(args[1:]), kwargs
                kwargs = dict(kwargs)
                kwargs["hidden_states"] = self._project(kwargs["hidden_states"], embeds)
                return args, kwargs
            handles.append(blocks[0].register_forward_pre_hook(embed_pre, with_kwargs=True))
        for site, layer in sorted(sites, key=lambda s: (s[1], SITE_ORDER[s[0]])):
            block = blocks[layer]
            key = (site, layer)
            if site in ("head", "neuron"):
                def pre(mod, args, key=key):
                    items = self.current.get(key)
                    if not items:
                        return None
                    return (self._apply(args[0], items, None),) + tuple(args[1:])
                handles.append(block.get_submodule(site_path(session, site)).register_forward_pre_hook(pre))
            elif site in ("attn", "mlp"):
                def post(mod, args, kwargs, out, key=key):
                    items = self.current.get(key)
                    if not items:
                        return None
                    inp = mlp_input(args, kwargs) if key[0] == "mlp" else None
                    if isinstance(out, tuple):
                        return (self._apply(out[0], items, inp),) + tuple(out[1:])
                    return self._apply(out, items, inp)
                handles.append(block.get_submodule(site_path(session, site)).register_forward_hook(
                    post, with_kwargs=True))
        for layer in sorted({layer for site, layer in sites if site in ("block", "resid")}):
            def post_blk(mod, args, kwargs, out, layer=layer):
                items = self.current.get(("block", layer), []) + self.current.get(("resid", layer), [])
                if not items:
                    return None
                inp = args[0] if args else kwargs["hidden_states"]
                if isinstance(out, tuple):
                    return (self._apply(out[0], items, inp),) + tuple(out[1:])
                return self._apply(out, items, inp)
            handles.append(blocks[layer].register_forward_hook(post_blk, with_kwargs=True))
        if self.capture:
            # Registered after the edit hooks: they see the edited streams.
            def cap_in(mod, args, kwargs):
                h = args[0] if args else kwargs["hidden_states"]
                self._rows = [h[:, -1].detach().float()]
            handles.append(blocks[0].register_forward_pre_hook(cap_in, with_kwargs=True))
            for layer in range(L):
                def cap_out(mod, args, out, layer=layer):
                    self._rows.append(first(out)[:, -1].detach().float())
                    if layer == L - 1:
                        self.captured = torch.stack(self._rows, 1)
                handles.append(blocks[layer].register_forward_hook(cap_out))
        return self

    def __exit__(self, *exc) -> None:
        self._cm.__exit__(*exc)

    @staticmethod
    def _project(h: torch.Tensor, embeds: list[tuple[int | None, torch.Tensor]]) -> torch.Tensor:
        h = h.clone()
        for b, u in embeds:
            for r in (range(h.shape[0]) if b is None else (b,)):
                h[r] = h[r] - (h[r] @ u)[..., None] * u
        return h

    @staticmethod
    def _apply(x: torch.Tensor, items: list[tuple[int | None, Edit]], inp: torch.Tensor | None) -> torch.Tensor:
        x = x.clone()
        for b, e in items:
            for r in (range(x.shape[0]) if b is None else (b,)):
                apply_edit(x[r], e, None if inp is None else inp[r if inp.shape[0] == x.shape[0] else 0])
        return x


# =========================================================================== sampling
def check_settings(request: GenerateRequest) -> None:
    if not 1 <= request.max_new_tokens <= MAX_NEW_TOKENS:
        raise GenerateError(f"max new tokens must be between 1 and {MAX_NEW_TOKENS}, got {request.max_new_tokens}")
    if not request.temperature >= 0 or request.temperature != request.temperature:
        raise GenerateError(f"temperature must be 0 (greedy) or more, got {request.temperature}")
    if not 0 < request.top_p <= 1:
        raise GenerateError(f"top-p must be in (0, 1], got {request.top_p}")
    if request.lens and not 1 <= request.top_k <= 100:
        raise GenerateError(f"top-k must be between 1 and 100, got {request.top_k}")
    if any(not s for s in request.stop):
        raise GenerateError("a stop string is empty")


def pick(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """The next token from one row's float32 logits: arg-max when ``temperature`` is 0, else a draw
    from softmax(logits / temperature) restricted to the top-p nucleus."""
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float().cpu() / temperature, -1)
    if top_p < 1:
        sorted_p, order = torch.sort(probs, descending=True)
        before = sorted_p.cumsum(0) - sorted_p          # mass of the tokens ranked above
        keep = before < top_p                           # the smallest set reaching top_p (≥ 1 token)
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def prompt_ids(session: ModelSession, prompt: str, chat: bool) -> tuple[torch.Tensor, str]:
    """Token ids of the prompt as run, and its text (the chat template applied when ``chat``)."""
    if not chat:
        return session.encode(prompt), prompt
    tok = session.tokenizer
    if not getattr(tok, "chat_template", None):
        raise GenerateError(f"{session.name} has no chat template: turn the chat template off")
    if prompt is None or not prompt.strip():
        session.encode(prompt)  # the usual empty-prompt error
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    if ids.numel() > session.context_length:
        from explorer.core.errors import PromptTooLongError

        raise PromptTooLongError(ids.numel(), session.context_length)
    return ids, text


def eos_ids(session: ModelSession) -> set[int]:
    """The token ids that end a generation (the generation config's, else the tokenizer's)."""
    value = getattr(getattr(session.hf, "generation_config", None), "eos_token_id", None)
    if value is None:
        value = session.tokenizer.eos_token_id
    if value is None:
        return set()
    return {int(v) for v in (value if isinstance(value, (list, tuple)) else [value])}


# ============================================================================ the loop
@dataclass
class _Arm:
    label: str
    ids: list[int] = field(default_factory=list)
    text: str = ""
    reason: str | None = None
    columns: list[torch.Tensor] = field(default_factory=list)   # [1 + L, d] per token


def run_arms(session: ModelSession, ids: torch.Tensor, plans: Sequence[Plan], labels: Sequence[str], *,
             max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             stop: Sequence[str] = (), capture: bool = False, stop_event: threading.Event | None = None,
             on_token: Callable[[int, list[str | None]], None] | None = None) -> tuple[list[_Arm], float]:
    """Generate for every plan (one batch row each) with the KV cache; returns the arms and the
    seconds to the first token."""
    import time

    B = len(plans)
    T = int(ids.numel())
    if T + max_new_tokens > session.context_length:
        raise GenerateError(f"the prompt ({T} tokens) plus {max_new_tokens} new tokens exceed the model's "
                            f"context of {session.context_length}: ask for fewer tokens")
    arms = [_Arm(label) for label in labels]
    gens = [torch.Generator().manual_seed(int(seed)) for _ in range(B)]
    eos = eos_ids(session)
    device = session.device
    t0 = time.perf_counter()
    first_token = 0.0
    x = ids[None].expand(B, -1).to(device)
    cache = None
    pos = 0
    with torch.no_grad(), session.lock, EditHooks(session, plans, capture) as hooks:
        for step in range(max_new_tokens):
            n = x.shape[1]
            hooks.set(pos, n, T)
            mask = torch.ones((B, pos + n), dtype=torch.long, device=device)
            out = session.hf(input_ids=x, attention_mask=mask, past_key_values=cache, use_cache=True,
                             logits_to_keep=1)
            cache = out.past_key_values
            logits = out.logits[:, -1].float()
            pos += n
            pieces: list[str | None] = []
            nxt = []
            for b, arm in enumerate(arms):
                if arm.reason is not None:
                    pieces.append(None)
                    nxt.append(arm.ids[-1] if arm.ids else 0)
                    continue
                tid = pick(logits[b], temperature, top_p, gens[b])
                arm.ids.append(tid)
                if capture:
                    arm.columns.append(hooks.captured[b].cpu())
                text = session.tokenizer.decode(arm.ids, skip_special_tokens=True)
                pieces.append(text[len(arm.text):] if text.startswith(arm.text) else text)
                arm.text = text
                if tid in eos:
                    arm.reason = "eos"
                elif any(s in text for s in stop):
                    arm.reason = "stop string"
                elif step == max_new_tokens - 1:
                    arm.reason = "length"
                nxt.append(tid)
            if step == 0:
                first_token = time.perf_counter() - t0
            if on_token is not None:
                on_token(step, pieces)
            if all(a.reason is not None for a in arms):
                break
            if stop_event is not None and stop_event.is_set():
                for a in arms:
                    a.reason = a.reason or "stopped"
                break
            x = torch.tensor(nxt, dtype=torch.long, device=device)[:, None]
    return arms, first_token


def lens_columns(session: ModelSession, columns: Sequence[torch.Tensor], chosen: Sequence[int],
                 top_k: int) -> dict[str, np.ndarray]:
    """The logit-lens column of each generated token: ``columns`` [1 + L, d] per token (the
    stream where it was predicted), ``chosen`` its id; returns [R, N(, k)] arrays."""
    R = session.n_layers + 1
    if not columns:
        return {"top_ids": np.zeros((R, 0, top_k), np.int64), "top_probs": np.zeros((R, 0, top_k), np.float32),
                "chosen_probs": np.zeros((R, 0), np.float32), "chosen_ranks": np.zeros((R, 0), np.int64)}
    parts = defaultdict(list)
    for col, tid in zip(columns, chosen):
        stream = col.to(session.device, session.dtype)[:, None]     # [R, 1, d]
        r = reduce_rows(session, stream, top_k, int(tid), session.dtype)
        parts["top_ids"].append(r["top_ids"])
        parts["top_probs"].append(r["top_probs"])
        parts["chosen_probs"].append(r["target_probs"])
        parts["chosen_ranks"].append(r["target_ranks"])
    return {k: np.concatenate(v, axis=1) for k, v in parts.items()}


def generate(session: ModelSession, request: GenerateRequest | str | None = None, /, *,
             ctx: JobContext | None = None, stop_event: threading.Event | None = None,
             on_token: Callable[[int, list[str | None]], None] | None = None, **fields: Any) -> GenerateResult:
    """Generate text with the KV cache (greedy unless a temperature is given); with an
    ``intervention``, a second arm with it, same seed, side by side. Not cached: a stopped run is
    not the run asked for. ``ctx.cancelled`` stops it too (a job's Stop).

    >>> from explorer import generate
    >>> out = generate(session, "The capital of France is", max_new_tokens=3)
    >>> out.baseline.text.split()[0]
    'Paris.'
    """
    session.require_local("generation")
    import time

    request = build_request(GenerateRequest, request, fields)
    check_settings(request)
    ids, text = prompt_ids(session, request.prompt, request.chat)
    plans, labels = [], []
    if request.intervention is None or request.compare:
        plans.append(Plan())
        labels.append("baseline")
    if request.intervention is not None:
        plans.append(plan_for(session, request.intervention, ids))
        labels.append(request.intervention.describe())
    if ctx is not None and stop_event is None:
        stop_event = _CtxEvent(ctx)
    user_cb = on_token

    def report(step: int, pieces: list[str | None]) -> None:
        if ctx is not None:
            ctx.report(step + 1, request.max_new_tokens, message="".join(p or "" for p in pieces[:1]))
        if user_cb is not None:
            user_cb(step, pieces)

    t0 = time.perf_counter()
    arms, first_token = run_arms(
        session, ids, plans, labels, max_new_tokens=request.max_new_tokens, temperature=request.temperature,
        top_p=request.top_p, seed=request.seed, stop=request.stop, capture=request.lens,
        stop_event=stop_event, on_token=report)
    seconds = time.perf_counter() - t0
    gens = []
    for arm in arms:
        lens = lens_columns(session, arm.columns, arm.ids, request.top_k) if request.lens else {}
        gens.append(Generation(
            label=arm.label, text=arm.text, tokens=session.decode_each(np.array(arm.ids, dtype=np.int64)),
            token_ids=np.array(arm.ids, dtype=np.int64), stop_reason=arm.reason or "length",
            top_ids=lens.get("top_ids"),
            top_tokens=None if not lens else session.decode_each(lens["top_ids"]),
            top_probs=lens.get("top_probs"), chosen_probs=lens.get("chosen_probs"),
            chosen_ranks=lens.get("chosen_ranks")))
    return GenerateResult(
        request=request, model=session.name, prompt_text=text,
        prompt_tokens=session.decode_each(ids.numpy()), prompt_ids=ids.numpy().astype(np.int64),
        layer_labels=layer_labels(session.n_layers),
        baseline=gens[0] if labels[0] == "baseline" else None,
        intervened=gens[-1] if request.intervention is not None else None,
        seconds=seconds, first_token_seconds=first_token)


@contextmanager
def intervened(session: ModelSession, intervention: Intervention | None) -> Iterator[None]:
    """Every forward of the session's model inside the block runs with the intervention, on every
    batch row and at every position (steering ``positions`` other than "all" are refused: a
    forward here has no prompt/generated split). Holds the session's lock; caches are bypassed
    only by calling the model (or ``score_*`` functions) directly, not cached analyses.

    >>> from explorer.interventions.generate import Intervention, intervened
    >>> with intervened(session, Intervention(components="mlp:0")):
    ...     pass
    """
    if intervention is not None and intervention.steer is not None and intervention.positions != "all":
        raise EditError("a standing intervention steers at every position: use positions='all'")
    plan = plan_for(session, intervention)
    with torch.no_grad(), session.lock, EditHooks(session, [plan], broadcast=True) as hooks:
        hooks.set(0, 1, 0)
        yield


class _CtxEvent:
    """A job context seen as a stop event."""

    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx

    def is_set(self) -> bool:
        return bool(self.ctx.cancelled)
