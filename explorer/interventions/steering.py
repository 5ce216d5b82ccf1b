"""Steering vectors: build one from contrastive prompts, add it to the residual stream, sweep α,
or project its direction out of every layer.

**Build** (``build_vector``): block L's output at the last token of every prompt of two lists
(positive, negative; one batched pass, ``explorer.analyses.hidden``), then

- ``mean`` (default): the mean over pairs of (positive − negative): its own length, so α = 1
  moves the stream by the average difference;
- ``pca``: the first right singular vector of the pair differences (uncentred: the direction
  holding most of their second moment), signed to agree with the mean difference;
- ``logreg``: the direction of an L2 logistic regression separating the two lists (fitted on
  standardised features by ``analyses.probes.fit_logistic``, mapped back to raw coordinates).

``pca`` and ``logreg`` give a unit direction, scaled by the mean difference's projection on it,
so that α means the same for the three methods. ``mean`` and ``pca`` pair the lists (equal
lengths required); ``logreg`` does not. The token each prompt was read at is kept.

**Apply** (``steer_apply``): α·v added to block L's output at every position (or the prompt's
last token only), reporting the target token's logit, probability and rank at the last position,
before and after; ``mode="ablate"`` projects the vector's direction out of every write to the
residual stream instead (directional ablation, Arditi et al. 2024). **Sweep** (``steer_sweep``,
a job with partial results): the metric (the target's logit, minus ``compare_token``'s when
given) against α, one batch row per α, plus the greedy continuation at chosen α values.

Vectors save as safetensors (``save_vector``/``load_vector``): tensor ``vector`` [d_model];
metadata model, layer, method, prompts (JSON {"positive": [...], "negative": [...]}), the
tokens read, and the model's weights fingerprint (``explorer.core.fingerprint``): a vector fits a
session whose model has the same fingerprint, whatever its name or folder; a vector saved before
fingerprints (none in its metadata) falls back to comparing the model's name. ``load_vector``
also reads the probe tab's exported direction.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from explorer.core.fingerprint import model_fingerprint
from explorer.core.jobs import JobContext, Unfinished, cached_unless_cancelled
from explorer.core.requests import build_request
from explorer.core.results import Result, array, sized
from explorer.core.session import ModelSession
from explorer.interventions.ablation import TargetStats
from explorer.interventions.edits import EditError, metric, resolve_tokens, target_fields
from explorer.interventions.generate import (
    EditHooks,
    Intervention,
    Plan,
    check_layer,
    plan_for,
    run_arms,
)

METHODS = ("mean", "pca", "logreg")
APPLY_POSITIONS = ("all", "last")
APPLY_MODES = ("add", "ablate")
SWEEP_BATCH = 8        # α values per forward


class SteeringError(EditError):
    """Bad steering input: empty or unequal prompt lists, an unknown method, a foreign vector."""


# ============================================================================== vectors
@dataclass(frozen=True, eq=False)
class SteeringVector(Result):
    """A direction in block ``layer``'s output space, and where it came from."""

    model: str
    layer: int
    method: str
    vector: np.ndarray = array("D", "float32")
    positive: tuple[str, ...] = sized("P")
    negative: tuple[str, ...] = sized("Q")
    positive_tokens: tuple[str, ...] = sized("P")   # the token each prompt was read at
    negative_tokens: tuple[str, ...] = sized("Q")
    fingerprint: str = ""   # the weights fingerprint of the model it was built on ('' on old vectors)

    @property
    def d_model(self) -> int:
        return int(self.vector.shape[0])

    @property
    def norm(self) -> float:
        return float(np.linalg.norm(self.vector))

    def unit(self) -> np.ndarray:
        n = self.norm
        if n == 0:
            raise SteeringError("the steering vector is zero: it has no direction")
        return (self.vector / n).astype(np.float32)

    def check_for(self, session: ModelSession) -> None:
        """Raise a clear error when this vector cannot be used on the session's model."""
        d = int(session.hf.config.hidden_size)
        if self.d_model != d:
            raise SteeringError(f"the vector has {self.d_model} values but {session.name}'s residual stream has "
                                f"{d}: it was built for another model ({self.model or 'unknown'})")
        if self.fingerprint:
            # The weights decide, not the name: the same model loaded from another folder fits.
            from explorer.core.fingerprint import model_fingerprint

            mine = model_fingerprint(session)
            if mine and mine != self.fingerprint:
                raise SteeringError(f"the vector was built on another model ({self.model or 'unknown'}, weights "
                                    f"fingerprint {self.fingerprint}), not on the attached {session.name!r} "
                                    f"({mine}): build it again on this model")
            if mine:
                return
        if self.model and self.model != session.name:
            raise SteeringError(f"the vector was built on {self.model!r}, not on the attached {session.name!r}: "
                                f"build it again on this model")


@dataclass(frozen=True)
class BuildRequest:
    """Build a steering vector at block ``layer`` from a positive and a negative prompt list."""

    positive: tuple[str, ...]
    negative: tuple[str, ...]
    layer: int
    method: str = "mean"

    def __post_init__(self) -> None:
        object.__setattr__(self, "positive", tuple(self.positive))
        object.__setattr__(self, "negative", tuple(self.negative))


def _check_lists(request: BuildRequest) -> None:
    if request.method not in METHODS:
        raise SteeringError(f"unknown method {request.method!r}: use one of {', '.join(METHODS)}")
    for name, texts in (("positive", request.positive), ("negative", request.negative)):
        if not texts:
            raise SteeringError(f"the {name} prompt list is empty: give at least one prompt")
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise SteeringError(f"{name} prompt {i + 1} is empty")
    if request.method in ("mean", "pca") and len(request.positive) != len(request.negative):
        raise SteeringError(f"the lists pair up for {request.method!r}: {len(request.positive)} positive vs "
                            f"{len(request.negative)} negative prompts (use logreg for unpaired lists)")


def last_token_states(session: ModelSession, texts: Sequence[str], layer: int) -> torch.Tensor:
    """Block ``layer``'s output at each text's last token: [N, d] float32 (one batched pass)."""
    from explorer.analyses.hidden import collect_hidden

    hs = collect_hidden(session, texts=tuple(texts), sites=("last",))
    return torch.from_numpy(hs.site("last")[layer + 1].copy())


def direction_of(pos: torch.Tensor, neg: torch.Tensor, method: str) -> torch.Tensor:
    """The steering vector of states [P, d] and [Q, d] by ``method`` (see the module docstring)."""
    pos, neg = pos.double(), neg.double()
    mean_diff = pos.mean(0) - neg.mean(0)
    if method == "mean":
        return (pos - neg).mean(0).float()
    if method == "pca":
        diffs = pos - neg
        v = torch.linalg.svd(diffs, full_matrices=False).Vh[0]
    else:
        from explorer.analyses.probes import fit_logistic, standardise

        x = torch.cat([pos, neg])[None]                                  # [1, n, d]
        y = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))]).double()[None, None]
        (xs,), (_, std) = standardise(x)
        w, _ = fit_logistic(xs, y)
        v = w[0, 0] / std[0, 0]                                          # raw coordinates
        v = v / v.norm().clamp_min(1e-300)
    if torch.dot(v, mean_diff) < 0:
        v = -v
    return (v * torch.dot(v, mean_diff)).float()


def build_vector(session: ModelSession, request: BuildRequest | None = None, /, *,
                 ctx: JobContext | None = None, **fields: Any) -> SteeringVector:
    """A steering vector at block ``layer`` from contrastive prompts (cached per request).

    >>> from explorer import build_vector
    >>> v = build_vector(session, positive=("I love this movie",), negative=("I hate this movie",), layer=10)
    >>> v.vector.shape, v.positive_tokens
    ((576,), (' movie',))
    """
    session.require_local("building a steering vector")
    request = build_request(BuildRequest, request, fields)

    def compute() -> SteeringVector:
        _check_lists(request)
        layer = check_layer(session, request.layer)
        states = last_token_states(session, request.positive + request.negative, layer)
        n = len(request.positive)
        vector = direction_of(states[:n], states[n:], request.method)
        last = lambda texts: tuple(str(session.decode_each([int(session.encode(t)[-1])])[0]) for t in texts)  # noqa: E731
        return SteeringVector(model=session.name, layer=layer, method=request.method,
                              vector=vector.numpy().astype(np.float32), positive=request.positive,
                              negative=request.negative, positive_tokens=last(request.positive),
                              negative_tokens=last(request.negative), fingerprint=model_fingerprint(session))

    return session.cached(("steer-build", request), compute)


def vector_bytes(vec: SteeringVector) -> bytes:
    """A vector as safetensors bytes (tensor ``vector``; metadata model, layer, method, prompts, tokens)."""
    from safetensors.torch import save

    meta = {"model": vec.model, "layer": str(vec.layer), "method": vec.method,
            "prompts": json.dumps({"positive": list(vec.positive), "negative": list(vec.negative)}),
            "tokens": json.dumps({"positive": list(vec.positive_tokens), "negative": list(vec.negative_tokens)})}
    if vec.fingerprint:
        meta["fingerprint"] = vec.fingerprint
    return save({"vector": torch.from_numpy(np.ascontiguousarray(vec.vector, np.float32))}, metadata=meta)


def save_vector(vec: SteeringVector, path: str | Path) -> Path:
    """Write a vector to ``path`` (safetensors, atomically)."""
    from explorer.core.files import atomic_path

    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_bytes(vector_bytes(vec))
    return path


def load_vector(path: str | Path, session: ModelSession | None = None) -> SteeringVector:
    """Read a vector saved by ``save_vector`` (or the probe tab); with ``session``, check it fits."""
    from safetensors import safe_open

    path = Path(path).expanduser()
    if not path.is_file():
        raise SteeringError(f"steering vector file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if "vector" not in f.keys():
                raise SteeringError(f"{path} has no tensor named 'vector' (it has {', '.join(f.keys()) or 'none'})")
            tensor = f.get_tensor("vector")
    except SteeringError:
        raise
    except Exception as e:
        raise SteeringError(f"{path} is not a safetensors steering vector ({type(e).__name__}: {e})") from None
    if tensor.dim() != 1:
        raise SteeringError(f"{path}: 'vector' has shape {tuple(tensor.shape)}, expected [d_model]")
    try:
        layer = int(meta.get("layer", "-1"))
        prompts = json.loads(meta.get("prompts", "{}"))
        tokens = json.loads(meta.get("tokens", "{}"))
    except ValueError as e:
        raise SteeringError(f"{path}: unreadable metadata ({e})") from None
    if isinstance(prompts, list):  # the probe tab's export: one labelled list
        prompts = {"positive": prompts, "negative": []}
    pos, neg = tuple(prompts.get("positive", ())), tuple(prompts.get("negative", ()))
    pos_t = tuple(tokens.get("positive", ("",) * len(pos)))
    neg_t = tuple(tokens.get("negative", ("",) * len(neg)))
    vec = SteeringVector(model=meta.get("model", ""), layer=layer, method=meta.get("method", "unknown"),
                         vector=tensor.float().numpy().astype(np.float32), positive=pos, negative=neg,
                         positive_tokens=pos_t, negative_tokens=neg_t, fingerprint=meta.get("fingerprint", ""))
    if problem := vec.validate():
        raise SteeringError(f"{path}: {problem}")
    if session is not None:
        vec.check_for(session)
    return vec


# ================================================================================ apply
def _stats(logits: torch.Tensor, tid: int, cid: int | None) -> TargetStats:
    logits = logits.float()
    return TargetStats(logit=float(logits[tid]), prob=float(torch.softmax(logits, -1)[tid]),
                       rank=int((logits > logits[tid]).sum()) + 1,
                       logit_diff=None if cid is None else float(logits[tid] - logits[cid]))


def edited_logits(session: ModelSession, ids: torch.Tensor, plans: Sequence[Plan]) -> torch.Tensor:
    """Last-position float32 logits [B, V] of one forward of a prompt per plan (one batch row each)."""
    B, T = len(plans), int(ids.numel())
    x = ids[None].expand(B, -1).to(session.device)
    with torch.no_grad(), session.lock, EditHooks(session, plans) as hooks:
        hooks.set(0, T, T)
        out = session.hf(input_ids=x, attention_mask=torch.ones_like(x), logits_to_keep=1)
    return out.logits[:, -1].float()


@dataclass(frozen=True)
class SteerRequest:
    """Add ``alpha * vector`` to block ``layer``'s output (``mode="add"``) at ``positions`` (all,
    last), or project the vector's direction out of every layer (``mode="ablate"``)."""

    prompt: str
    target: str
    vector: SteeringVector
    layer: int | None = None        # None: the layer the vector was built at
    alpha: float = 1.0
    positions: str = "all"
    mode: str = "add"
    compare_token: str | None = None


@dataclass(frozen=True, eq=False)
class SteerResult(Result):
    """The target at the last position, without and with the steering."""

    request: SteerRequest
    model: str
    layer: int
    target: str
    target_id: int
    compare: str | None
    compare_id: int | None
    baseline: TargetStats
    steered: TargetStats

    @property
    def effect(self) -> float:
        return self.steered.logit - self.baseline.logit


def _intervention(session: ModelSession, vec: SteeringVector, layer: int | None, alpha: float,
                  positions: str, mode: str) -> tuple[Intervention, int]:
    vec.check_for(session)
    layer = check_layer(session, vec.layer if layer is None else layer)
    if mode == "ablate":
        return Intervention(direction=tuple(vec.vector.tolist()), label=f"{vec.method} direction"), layer
    if mode != "add":
        raise SteeringError(f"unknown steering mode {mode!r}: use add or ablate")
    return Intervention(steer=tuple(vec.vector.tolist()), layer=layer, alpha=float(alpha),
                        positions=positions, label=vec.method), layer


def steer_apply(session: ModelSession, request: SteerRequest | None = None, /, *,
                ctx: JobContext | None = None, **fields: Any) -> SteerResult:
    """The target's logit, probability and rank at the last position without and with steering.

    >>> from explorer import build_vector, steer_apply
    >>> v = build_vector(session, positive=("I love this movie",), negative=("I hate this movie",), layer=10)
    >>> r = steer_apply(session, "I think this film is", target=" great", compare_token=" bad", vector=v, alpha=2.0)
    >>> r.steered.logit_diff > r.baseline.logit_diff     # steering toward "love" favours " great"
    True
    """
    session.require_local("steering")
    request = build_request(SteerRequest, request, fields)
    if request.positions not in APPLY_POSITIONS:
        raise SteeringError(f"positions must be one of {', '.join(APPLY_POSITIONS)} for a single forward")
    iv, layer = _intervention(session, request.vector, request.layer, request.alpha, request.positions, request.mode)
    ids = session.encode(request.prompt)
    tid, cid = resolve_tokens(session, request.target, request.compare_token)
    base, steered = edited_logits(session, ids, [Plan(), plan_for(session, iv, ids)])
    return SteerResult(request=request, model=session.name, layer=layer, **target_fields(session, tid, cid),
                       baseline=_stats(base, tid, cid), steered=_stats(steered, tid, cid))


# ================================================================================ sweep
@dataclass(frozen=True)
class SteerSweepRequest:
    """The metric against α; greedy continuations (``max_new_tokens``) at ``text_alphas``."""

    prompt: str
    target: str
    vector: SteeringVector
    alphas: tuple[float, ...] = (-8.0, -4.0, 0.0, 4.0, 8.0)
    layer: int | None = None
    positions: str = "all"
    compare_token: str | None = None
    text_alphas: tuple[float, ...] = ()
    max_new_tokens: int = 16

    def __post_init__(self) -> None:
        object.__setattr__(self, "alphas", tuple(float(a) for a in self.alphas))
        object.__setattr__(self, "text_alphas", tuple(float(a) for a in self.text_alphas))


@dataclass(frozen=True, eq=False)
class SteerSweepResult(Result):
    """Per α: the metric (target logit, minus the compare token's when given), the target's
    probability and rank; NaN / 0 where not computed yet. ``texts[i]`` continues the prompt
    steered at ``text_alphas[i]``."""

    request: SteerSweepRequest
    model: str
    layer: int
    target: str
    target_id: int
    compare: str | None
    alphas: np.ndarray = array("A", "float32")
    metric: np.ndarray = array("A", "float32")
    probs: np.ndarray = array("A", "float32")
    ranks: np.ndarray = array("A", "int64")
    baseline_metric: float = 0.0
    text_alphas: tuple[float, ...] = sized("X", default=())
    texts: tuple[str, ...] = sized("X", default=())
    done: int = 0
    total: int = 0

    @property
    def complete(self) -> bool:
        return self.done == self.total


def parse_alphas(text: str | Sequence[float]) -> tuple[float, ...]:
    """'-8,-4,0,4,8' (or numbers) as a tuple of finite floats, at least one."""
    if isinstance(text, str):
        parts = [p for p in text.replace(" ", ",").split(",") if p]
        try:
            values = tuple(float(p) for p in parts)
        except ValueError:
            raise SteeringError(f"cannot read the α values {text!r}: give numbers separated by commas, "
                                f"e.g. -8,-4,0,4,8") from None
    else:
        values = tuple(float(a) for a in text)
    if not values:
        raise SteeringError("no α values given: e.g. -8,-4,0,4,8")
    if not all(np.isfinite(values)):
        raise SteeringError("α values must be finite numbers")
    return values


def steer_sweep(session: ModelSession, request: SteerSweepRequest | None = None, /, *,
                ctx: JobContext | None = None, **fields: Any) -> SteerSweepResult:
    """The metric against α (a job: partial results after every batch of α values; cached when complete).

    >>> from explorer import build_vector, steer_sweep
    >>> v = build_vector(session, positive=("I love this movie",), negative=("I hate this movie",), layer=10)
    >>> s = steer_sweep(session, "I think this film is", target=" great", compare_token=" bad", vector=v,
    ...                 alphas=(-2, 0, 2))
    >>> bool(s.metric[0] < s.metric[1] < s.metric[2])   # logit(' great') - logit(' bad') rises with α
    True
    """
    session.require_local("the steering sweep")
    request = build_request(SteerSweepRequest, request, fields)
    return cached_unless_cancelled(session, ("steer-sweep", request),
                                   lambda: _sweep(session, request, ctx), ctx)


def _sweep(session: ModelSession, request: SteerSweepRequest, ctx) -> SteerSweepResult:
    alphas = parse_alphas(request.alphas)
    if request.positions not in APPLY_POSITIONS:
        raise SteeringError(f"positions must be one of {', '.join(APPLY_POSITIONS)} for a sweep")
    if not 1 <= request.max_new_tokens <= 256:
        raise SteeringError(f"max new tokens must be between 1 and 256, got {request.max_new_tokens}")
    _, layer = _intervention(session, request.vector, request.layer, 0.0, request.positions, "add")
    ids = session.encode(request.prompt)
    tid, cid = resolve_tokens(session, request.target, request.compare_token)
    (base,) = edited_logits(session, ids, [Plan()])
    values = np.full(len(alphas), np.nan, np.float32)
    probs = np.full(len(alphas), np.nan, np.float32)
    ranks = np.zeros(len(alphas), np.int64)
    texts: list[str] = []
    total = len(alphas) + len(request.text_alphas)
    done = 0

    def make(n_done: int) -> SteerSweepResult:
        return SteerSweepResult(
            request=request, model=session.name, layer=layer, target=str(session.decode_each([tid])[0]),
            target_id=tid, compare=None if cid is None else str(session.decode_each([cid])[0]),
            alphas=np.array(alphas, np.float32), metric=values.copy(), probs=probs.copy(), ranks=ranks.copy(),
            baseline_metric=float(metric(base, tid, cid)), text_alphas=request.text_alphas[:len(texts)],
            texts=tuple(texts), done=n_done, total=total)

    def plan(alpha: float) -> Plan:
        iv, _ = _intervention(session, request.vector, layer, alpha, request.positions, "add")
        return plan_for(session, iv, ids)

    for start in range(0, len(alphas), SWEEP_BATCH):
        if ctx is not None and ctx.cancelled:
            raise Unfinished(make(done))
        idx = list(range(start, min(start + SWEEP_BATCH, len(alphas))))
        logits = edited_logits(session, ids, [plan(alphas[i]) for i in idx])
        for row, i in enumerate(idx):
            s = _stats(logits[row], tid, cid)
            values[i] = float(metric(logits[row], tid, cid))
            probs[i], ranks[i] = s.prob, s.rank
        done += len(idx)
        if ctx is not None:
            ctx.report(done, total, partial=make(done), message=f"α = {alphas[idx[-1]]:g}")
    if request.text_alphas:
        # Steered continuations, greedy, one α at a time (each a partial result).
        for alpha in request.text_alphas:
            if ctx is not None and ctx.cancelled:
                raise Unfinished(make(done))
            arms, _ = run_arms(session, ids, [plan(alpha)], [f"α={alpha:g}"], max_new_tokens=request.max_new_tokens)
            texts.append(arms[0].text)
            done += 1
            if ctx is not None:
                ctx.report(done, total, partial=make(done), message=f"text at α = {alpha:g}")
    return make(done)


def check_prompts(texts: Sequence[str], what: str) -> tuple[str, ...]:
    """Non-empty prompts (for callers reading lists from files)."""
    out = tuple(t for t in (s.strip("\r\n") for s in texts) if t.strip())
    if not out:
        raise SteeringError(f"the {what} list is empty: give one prompt per line")
    return out

