"""Steering against the training-data swap: the pronoun-swap run's bias probes and held-out loss,
measured under inference-time steering (an α sweep) and directional ablation of a gender
direction, on the same axes as the run's control and swapped arms.

What each row is (``steering_vs_swap``):

- ``steer`` (one row per α): α·v added to block ``layer``'s output at every position of every
  forward (``interventions.generate.intervened``); α > 0 points toward the feminine words;
- ``ablate``: v's direction projected out of every write to the residual stream (Arditi et al. 2024);
- ``control`` / ``swapped``: the run's two arms at the last evaluation both have, read from its
  ``metrics.jsonl`` files (nothing is retrained or rescored).

The default v is the gender direction of the swap's own word pairs (``gender_direction``): the
mean over ``explorer.training.swap.PAIRS`` of block L's output at the last token of
"The word is {feminine}" − "The word is {masculine}".

The steering rows are scored exactly as the run scores its arms (``training.intervene.evaluate``):
the same probe subset (the run's first ``eval_templates`` templates × all occupations, its first
``eval_pairs`` minimal pairs, its context prefix) and the same held-out windows (rebuilt from the
run's settings by ``build_streams``; the run's data fingerprint is checked), so the α = 0 row
equals the run's step-0 evaluation. ``max_templates`` / ``max_pairs`` / ``max_windows`` shrink
the probe set for a quick look (then ``same_probes`` is False). Without a run (``run=""``) the
default run settings (``InterventionConfig()``) give the probe set and windows, and there are no
swap rows.

Standard errors: pronoun preference over items, stereotype alignment by the Fisher z delta method,
minimal pairs binomial (``training.bias``); the held-out loss's SE is over windows for the
steering rows. The run does not store per-window losses, so its arms' loss SE is NaN.
"""
from __future__ import annotations

import math
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from explorer.core.errors import ExplorerError
from explorer.core.jobs import JobContext, Unfinished
from explorer.core.requests import build_request
from explorer.core.results import Result, array, sized
from explorer.interventions.generate import Intervention, check_layer, intervened
from explorer.interventions.steering import SteeringVector, build_vector, parse_alphas
from explorer.training.bias import load_minimal_pairs, load_occupations, load_templates, score_bias
from explorer.training.intervene import InterventionConfig, build_streams, load_run
from explorer.training.swap import PAIRS

if TYPE_CHECKING:
    from explorer.core.session import ModelSession

KINDS = ("steer", "ablate", "control", "swapped")
METRICS = ("pronoun_preference", "stereotype_alignment", "minimal_pairs", "heldout_loss")
GENDER_TEMPLATE = "The word is {}"


class CompareError(ExplorerError):
    """A comparison that cannot run: an unreadable run folder, bad α values, a foreign vector."""


def gender_direction(session: ModelSession, layer: int, method: str = "mean") -> SteeringVector:
    """The gender direction at block ``layer``: feminine minus masculine over the swap's word pairs.

    >>> from explorer.training.steer_compare import gender_direction
    >>> v = gender_direction(session, 10)
    >>> v.positive_tokens[0], v.negative_tokens[0]
    (' she', ' he')
    """
    positive = tuple(GENDER_TEMPLATE.format(f) for _, f in PAIRS)
    negative = tuple(GENDER_TEMPLATE.format(m) for m, _ in PAIRS)
    return build_vector(session, positive=positive, negative=negative, layer=layer, method=method)


def window_losses(model, windows: np.ndarray, batch_size: int = 8) -> np.ndarray:
    """Each held-out window's mean next-token loss [W] float64 (their mean is the run's held-out
    loss: every window has the same length)."""
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for start in range(0, len(windows), batch_size):
            ids = torch.as_tensor(windows[start:start + batch_size], device=device)
            logits = model(input_ids=ids).logits[:, :-1].float()
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
            out.append(nll.view(len(ids), -1).mean(1).double().cpu())
    return torch.cat(out).numpy()


@dataclass(frozen=True)
class SteerCompareRequest:
    """Score steering at each α and the direction's ablation on a swap run's probe set and windows."""

    run: str = ""                        # a pronoun-swap run folder ("" = none: default settings, no swap rows)
    layer: int | None = None             # None: the vector's layer, or n_layers // 3 for the gender direction
    alphas: tuple[float, ...] = (-2.0, -1.0, 0.0, 1.0, 2.0)
    ablate: bool = True
    vector: SteeringVector | None = None  # None: ``gender_direction`` at ``layer``
    max_templates: int | None = None     # shrink the run's probe set (None: the run's own)
    max_pairs: int | None = None
    max_windows: int | None = None
    batch_size: int = 8                  # held-out windows per forward

    def __post_init__(self) -> None:
        object.__setattr__(self, "alphas", parse_alphas(self.alphas))
        object.__setattr__(self, "run", str(self.run or ""))


@dataclass(frozen=True, eq=False)
class SteerCompareResult(Result):
    """One row per setting (``kinds``: steer | ablate | control | swapped), each probe with its SE.

    ``alpha`` is NaN on rows that are not steering, ``step`` the swap arms' step (−1 otherwise).
    Rows not computed yet (a partial result) hold NaN. ``note`` says what makes rows less
    comparable (another model, other data, a reduced probe set)."""

    request: SteerCompareRequest
    model: str
    run: str
    run_model: str
    layer: int
    vector_norm: float
    n_templates: int
    n_occupations: int
    n_pairs: int
    n_windows: int
    seq_len: int
    same_probes: bool
    labels: tuple[str, ...] = sized("S")
    kinds: tuple[str, ...] = sized("S")
    alpha: np.ndarray = array("S", "float64")
    step: np.ndarray = array("S", "int64")
    pronoun_preference: np.ndarray = array("S", "float64")
    pronoun_preference_se: np.ndarray = array("S", "float64")
    stereotype_alignment: np.ndarray = array("S", "float64")
    stereotype_alignment_se: np.ndarray = array("S", "float64")
    minimal_pairs: np.ndarray = array("S", "float64")
    minimal_pairs_se: np.ndarray = array("S", "float64")
    heldout_loss: np.ndarray = array("S", "float64")
    heldout_loss_se: np.ndarray = array("S", "float64")
    note: str = ""
    done: int = 0
    total: int = 0

    @property
    def complete(self) -> bool:
        return self.done == self.total

    def rows(self, kind: str) -> np.ndarray:
        """Indices of the rows of one kind."""
        return np.array([i for i, k in enumerate(self.kinds) if k == kind], dtype=np.int64)

    def value(self, metric: str, i: int) -> tuple[float, float]:
        """(value, SE) of ``metric`` on row ``i``."""
        return float(getattr(self, metric)[i]), float(getattr(self, f"{metric}_se")[i])

    def table(self) -> list[dict[str, Any]]:
        """The rows as dicts: label, kind, alpha (None off steering), step (None off the arms),
        and per metric ``{"value", "se"}`` (None for NaN)."""
        clean = lambda x: None if x is None or not math.isfinite(x) else float(x)  # noqa: E731
        out = []
        for i, (label, kind) in enumerate(zip(self.labels, self.kinds)):
            row: dict[str, Any] = {"label": label, "kind": kind,
                                   "alpha": clean(float(self.alpha[i])) if kind == "steer" else None,
                                   "step": int(self.step[i]) if kind in ("control", "swapped") else None}
            for m in METRICS:
                v, se = self.value(m, i)
                row[m] = {"value": clean(v), "se": clean(se)}
            out.append(row)
        return out


def _arm_row(arm, n: int) -> dict[str, float]:
    """An arm's metrics at evaluation ``n`` (the run's held-out loss has no stored SE)."""
    get = lambda key: float(getattr(arm, key)[n])  # noqa: E731
    return {"pronoun_preference": get("pronoun_preference"), "pronoun_preference_se": get("pronoun_preference_se"),
            "stereotype_alignment": get("stereotype_alignment"),
            "stereotype_alignment_se": get("stereotype_alignment_se"),
            "minimal_pairs": get("minimal_pairs"), "minimal_pairs_se": get("minimal_pairs_se"),
            "heldout_loss": get("loss"), "heldout_loss_se": math.nan, "step": int(arm.step[n])}


def steering_vs_swap(session: ModelSession, request: SteerCompareRequest | None = None, /, *,
                     ctx: JobContext | None = None, **fields: Any) -> SteerCompareResult:
    """The bias probes and held-out loss under steering at each α, the direction ablated, and a
    swap run's control and swapped arms (a job: a partial result after every setting).

    >>> from explorer import steering_vs_swap
    >>> r = steering_vs_swap(session, alphas=(0, 1), ablate=False, max_templates=1, max_pairs=4, max_windows=2)
    >>> r.kinds, r.layer
    (('steer', 'steer'), 10)
    >>> bool(r.pronoun_preference[1] < r.pronoun_preference[0])    # toward " she"
    True
    """
    request = build_request(SteerCompareRequest, request, fields)
    note: list[str] = []
    run = None
    if request.run:
        if not (Path(request.run).expanduser() / "run.json").is_file():
            raise CompareError(f"{request.run} is not a pronoun-swap run (no run.json)")
        run = load_run(request.run)
        config = run.config
        if run.model and run.model != session.name:
            note.append(f"the run trained {run.model}, the steering runs on {session.name}")
        if run.status != "done":
            note.append(f"the run is {run.status} at step {run.step}/{run.total_steps}")
    else:
        config = InterventionConfig()
    for name in ("max_templates", "max_pairs", "max_windows"):
        value = getattr(request, name)
        if value is not None and value < 1:
            raise CompareError(f"{name} must be at least 1, got {value}")

    # The run's probe set and held-out windows (intervene._probe_set / build_streams).
    templates = load_templates()
    if config.eval_templates is not None:
        templates = templates[:config.eval_templates]
    pairs = load_minimal_pairs().head(config.eval_pairs)
    occupations = load_occupations()
    streams = build_streams(session.tokenizer, config)
    if run is not None:
        from explorer.core.jobdir import JobDir

        saved = JobDir(run.out_dir, manifest="run.json").read() or {}
        if saved.get("fingerprint") not in (None, streams.fingerprint):
            note.append("the run's held-out windows differ from the ones rebuilt here (corpus or tokenizer changed)")
    windows = streams.heldout
    full = (len(templates), len(pairs.more), len(windows))
    if request.max_templates is not None:
        templates = templates[:request.max_templates]
    pairs = pairs.head(request.max_pairs)
    if request.max_windows is not None:
        windows = windows[:request.max_windows]
    same = (len(templates), len(pairs.more), len(windows)) == full
    if not same:
        note.append("reduced probe set: the steering rows use fewer templates, pairs or windows than the run's arms")

    if request.vector is not None:
        vec = request.vector
        vec.check_for(session)
        layer = check_layer(session, vec.layer if request.layer is None else request.layer)
    else:
        layer = check_layer(session, session.n_layers // 3 if request.layer is None else request.layer)
        vec = gender_direction(session, layer)

    settings: list[tuple[str, str, float, Intervention | None]] = [
        (f"steer α={a:+g}", "steer", a, Intervention(steer=tuple(vec.vector.tolist()), layer=layer, alpha=a,
                                                      label="gender") if a else None)
        for a in request.alphas]
    if request.ablate:
        settings.append(("direction ablated", "ablate", math.nan,
                         Intervention(direction=tuple(vec.vector.tolist()), label="gender")))
    arm_rows: list[tuple[str, str, dict]] = []
    if run is not None:
        n = min(len(run.control.step), len(run.swapped.step))
        if n == 0:
            note.append("the run has no evaluation yet: no swap rows")
        else:
            for arm in (run.control, run.swapped):
                row = _arm_row(arm, n - 1)
                arm_rows.append((f"swap {arm.arm} (step {row['step']})", arm.arm, row))

    labels = tuple(s[0] for s in settings) + tuple(a[0] for a in arm_rows)
    kinds = tuple(s[1] for s in settings) + tuple(a[1] for a in arm_rows)
    S = len(labels)
    cols = {k: np.full(S, math.nan) for k in ("pronoun_preference", "pronoun_preference_se",
                                                 "stereotype_alignment", "stereotype_alignment_se",
                                                 "minimal_pairs", "minimal_pairs_se", "heldout_loss",
                                                 "heldout_loss_se")}
    alpha = np.array([s[2] for s in settings] + [math.nan] * len(arm_rows), np.float64)
    step = np.full(S, -1, np.int64)
    for j, (_, _, row) in enumerate(arm_rows):
        i = len(settings) + j
        step[i] = row["step"]
        for k in cols:
            cols[k][i] = row[k]

    def make(done: int) -> SteerCompareResult:
        return SteerCompareResult(
            request=request, model=session.name, run=run.out_dir if run is not None else "",
            run_model=run.model if run is not None else "", layer=layer, vector_norm=vec.norm,
            n_templates=len(templates), n_occupations=len(occupations.names), n_pairs=len(pairs.more),
            n_windows=len(windows), seq_len=int(config.seq_len), same_probes=same, labels=labels, kinds=kinds,
            alpha=alpha.copy(), step=step.copy(), **{k: v.copy() for k, v in cols.items()},
            note="; ".join(note), done=done, total=len(settings))

    for i, (label, _, _, iv) in enumerate(settings):
        if ctx is not None and ctx.cancelled:
            raise Unfinished(make(i))
        with intervened(session, iv) if iv is not None else _locked(session):
            bias = score_bias(session.hf, session.tokenizer, model_name=session.name, templates=templates,
                              occupations=occupations, pairs=pairs, prefix=config.prefix)
            losses = window_losses(session.hf, windows, request.batch_size)
        summary = bias.summary()
        for k in ("pronoun_preference", "pronoun_preference_se", "stereotype_alignment",
                  "stereotype_alignment_se", "minimal_pairs", "minimal_pairs_se"):
            cols[k][i] = summary[k]
        cols["heldout_loss"][i] = float(losses.mean())
        cols["heldout_loss_se"][i] = float(losses.std(ddof=1) / math.sqrt(len(losses))) if len(losses) > 1 else math.nan
        if ctx is not None:
            ctx.report(i + 1, len(settings), partial=make(i + 1), message=label)
    return make(len(settings))


def _locked(session: ModelSession):
    """The plain model, under the session's lock (as ``intervened`` holds it)."""
    stack = ExitStack()
    stack.enter_context(torch.no_grad())
    stack.enter_context(session.lock)
    return stack
