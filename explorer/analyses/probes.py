"""Linear probes per layer: what each row of the residual stream knows about a binary label.

For labelled texts (``text``, ``label``; two classes) the hidden state at each row (the
embeddings, then every block's output, as in the logit lens) is read at a site (``last`` token
or the ``mean`` over tokens) in one batched pass (``explorer.analyses.hidden``). Per row:

- **Logistic regression**, L2-regularised, on standardised features (each feature's mean and
  std from the training part), fitted by Newton's method in float64 on the objective
  ``C·Σ log(1 + exp(−y·(w·x + b))) + ½‖w‖²`` (the intercept is not penalised): the objective
  scikit-learn's ``LogisticRegression(C=C)`` minimises, so its solution is the same (tested).
  scikit-learn is a test dependency only.
- **Held-out accuracy by stratified k-fold** (default 5 folds; each class dealt round-robin into
  the folds after a seeded shuffle; with ``groups``, whole groups are dealt, so a statement and
  its twin never sit on both sides): every text is predicted once by the probe fitted on the
  other folds; accuracy is the share predicted right and its SE the binomial sqrt(p(1−p)/n).
- **Shuffled-label control**: the same folds and fits with the labels permuted once (seeded);
  it should sit at chance. **Chance** is the majority class's share.
- The **best row** is the one with the highest held-out accuracy (the first on ties); its probe
  is fitted once more on all texts and kept in raw (unstandardised) coordinates: p(class 1 | x) =
  σ(weight·x + bias). Its unit direction saves as a steering vector (safetensors, tensor
  ``vector`` [d_model], metadata model / layer / method / prompts) and the probe itself as
  safetensors too (``weight``, ``bias``).

Rows fill in one by one (a job reports each as a partial result), so a view draws the curve live.
"""
from __future__ import annotations

import csv
import json
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from explorer.analyses.hidden import HiddenError, HiddenRequest, check_texts, collect_hidden
from explorer.core.defaults import ASSETS_DIR
from explorer.core.errors import ExplorerError
from explorer.core.requests import build_request
from explorer.core.results import Result, array, sized
from explorer.core.session import ModelSession

PROBE_SITES = ("last", "mean")
BUILTIN_DIR = ASSETS_DIR / "probes"
STEERING_METHOD = "probe-logistic"
# Gradient bound of the k-fold fits (objective per row): their predictions, not their last
# digits, matter; the final probe and the tests use the tight default of ``fit_logistic``.
FIT_TOL = 1e-6


class ProbeError(ExplorerError):
    """Data or options the probes cannot use; the message says what to fix."""


# ------------------------------------------------------------------------------ data
@dataclass(frozen=True)
class LabelledData:
    name: str
    texts: tuple[str, ...]
    labels: tuple[str, ...]
    groups: tuple[str, ...] | None = None   # items sharing a group stay in one fold

    @property
    def size(self) -> int:
        return len(self.texts)


def _label_text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def _rows(path: Path) -> list[dict]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ProbeError(f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ProbeError(f"{path} is not UTF-8 text") from None
    if path.suffix.lower() == ".csv":
        return list(csv.DictReader(text.splitlines()))
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except ValueError:
                raise ProbeError(f"{path.name} line {i} is not JSON (one object per line)") from None
            if not isinstance(row, dict):
                raise ProbeError(f"{path.name} line {i} is not a JSON object")
            rows.append(row)
    return rows


def load_labelled(path: str | Path, name: str | None = None) -> LabelledData:
    """A labelled JSONL (objects with ``text`` and ``label``) or CSV (columns ``text``, ``label``).

    An optional ``group`` field keeps related items (e.g. a statement and its negated twin) in
    the same cross-validation fold.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise ProbeError(f"data file not found: {path}")
    rows = _rows(path)
    if not rows:
        raise ProbeError(f"{path.name} has no rows")
    texts, labels, groups = [], [], []
    for i, row in enumerate(rows, 1):
        if "text" not in row or "label" not in row:
            raise ProbeError(f"{path.name} row {i} lacks 'text' or 'label' (each row needs both)")
        texts.append(str(row["text"]))
        labels.append(_label_text(row["label"]))
        groups.append(None if row.get("group") in (None, "") else str(row["group"]))
    has_groups = any(g is not None for g in groups)
    if has_groups and not all(g is not None for g in groups):
        raise ProbeError(f"{path.name}: some rows have a 'group' and some do not (give every row one, or none)")
    return LabelledData(name or path.stem, tuple(texts), tuple(labels), tuple(groups) if has_groups else None)


def builtin_sets() -> dict[str, dict]:
    """The project's labelled sets under ``assets/probes``: name → {path, size, classes, description}."""
    out = {}
    for path in sorted(BUILTIN_DIR.glob("*.jsonl")):
        rows = _rows(path)
        meta_path = path.with_suffix(".json")
        meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.exists() else {}
        classes = sorted({_label_text(r["label"]) for r in rows})
        out[path.stem] = {"path": str(path), "size": len(rows), "classes": classes,
                          "description": meta.get("description", "")}
    return out


def load_builtin(name: str) -> LabelledData:
    sets = builtin_sets()
    if name not in sets:
        raise ProbeError(f"no built-in data set {name!r} (choose from {', '.join(sets)})")
    return load_labelled(sets[name]["path"], name)


def load_data(spec: str | Path) -> LabelledData:
    """A built-in set by name, or a file path."""
    if isinstance(spec, str) and spec in builtin_sets():
        return load_builtin(spec)
    return load_labelled(spec)


# ------------------------------------------------------------------- the regression
def fit_logistic(x: torch.Tensor, y: torch.Tensor, C: float = 1.0, max_iter: int = 100,
                 weight: torch.Tensor | None = None, tol: float = 1e-10) -> tuple[torch.Tensor, torch.Tensor]:
    """L2 logistic regressions fitted jointly: features ``x`` [P, n, d], labels ``y`` [Q, P, n] in {0, 1}.

    Each of the Q·P problems minimises C·Σ_i softplus(−s_i·(w·x_i + b)) + ½‖w‖² (s = ±1; the
    intercept is not penalised), the objective of scikit-learn's ``LogisticRegression(C=C)``.
    ``weight`` [P, n] (0/1) drops rows (the held-out fold); Q label sets share each feature set
    (the real and the shuffled labels).

    Solver: Newton's method with step halving, all problems batched, in float64. With fewer
    training rows than features the optimum w lies in the span of the training rows (the
    gradient of the loss is a combination of them and so is the penalty's), so each problem is
    solved in an orthonormal basis of that span: a Newton system of (rows + 1)² instead of
    (features + 1)². It stops when every step moves no coordinate by more than ``tol``.
    Returns (w [Q, P, d], b [Q, P]).
    """
    x = x.double()
    Q, P, n, d = y.shape[0], x.shape[0], x.shape[1], x.shape[2]
    mask = torch.ones(P, n, dtype=torch.float64) if weight is None else weight.double()
    target = y.double()
    n_train = int(mask.sum(1).max())
    if n_train < d:
        a = x * mask[..., None]                                   # the training rows only
        lam, u = _small_eigh(a @ a.transpose(1, 2))                # [P, n], [P, n, n]
        keep = lam > lam[:, -1:] * 1e-12
        scale = torch.where(keep, lam.clamp_min(1e-300).rsqrt(), torch.zeros_like(lam))
        basis = a.transpose(1, 2) @ (u * scale[:, None, :])        # [P, d, n], orthonormal columns (or 0)
        z = x @ basis                                              # [P, n, n]
    else:
        basis, z = None, x
    m = z.shape[-1]
    z1 = torch.cat([z, torch.ones(P, n, 1, dtype=torch.float64)], -1)       # [P, n, m+1]
    ridge = torch.ones(m + 1, dtype=torch.float64)
    ridge[-1] = 0.0
    theta = torch.zeros(Q, P, m + 1, dtype=torch.float64)

    def logits_of(t: torch.Tensor) -> torch.Tensor:   # [Q, P, n]; batched matmuls, not einsum (slower here)
        return torch.matmul(z1, t[..., None])[..., 0]

    def objective(t: torch.Tensor) -> torch.Tensor:
        logits = logits_of(t)
        loss = torch.nn.functional.softplus(logits) - target * logits      # −log-likelihood
        return C * (loss * mask).sum(-1) + 0.5 * (t * t * ridge).sum(-1)

    current = objective(theta)
    for _ in range(max_iter):
        prob = torch.sigmoid(logits_of(theta))
        grad = C * torch.matmul(z1.transpose(1, 2), ((prob - target) * mask)[..., None])[..., 0] + theta * ridge
        curv = C * prob * (1 - prob) * mask                                  # [Q, P, n]
        hess = torch.matmul(z1.transpose(1, 2), curv[..., None] * z1) + torch.diag_embed(ridge + 1e-12)
        step = spd_solve(hess, grad[..., None])[..., 0]
        size = torch.ones(Q, P, dtype=torch.float64)
        for _ in range(30):  # halve the step of every problem whose objective did not fall
            trial = theta - size[..., None] * step
            value = objective(trial)
            worse = value > current + 1e-12 * current.abs()
            if not worse.any():
                break
            size = torch.where(worse, size / 2, size)
        theta, current = trial, value
        if (size[..., None] * step).abs().max() <= tol:
            break
    beta, b = theta[..., :m], theta[..., m]
    w = beta if basis is None else torch.einsum("pdm,qpm->qpd", basis, beta)
    return w, b


def spd_solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Solve the batched symmetric positive definite systems ``a x = b`` by Cholesky.

    Not ``torch.linalg.solve``: with more than one thread, MKL's batched LU in torch 2.13 (CPU)
    prints "Parameter 6 was incorrect on entry to DLASWP" and never returns for batches of
    ~200-row systems (seen on the default model's probes). Cholesky also halves the work. A
    system that is not numerically positive definite falls back to LU on one thread.

    >>> import torch
    >>> from explorer.analyses.probes import spd_solve
    >>> spd_solve(torch.eye(3, dtype=torch.float64) * 2, torch.ones(3, 1, dtype=torch.float64)).flatten().tolist()
    [0.5, 0.5, 0.5]
    """
    factor, info = torch.linalg.cholesky_ex(a)
    x = torch.cholesky_solve(b, factor)
    bad = info != 0
    if bad.any():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            x[bad] = torch.linalg.solve(a[bad], b[bad])
        finally:
            torch.set_num_threads(threads)
    return x


def _small_eigh(matrices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh`` on one thread: for these few-hundred-row matrices MKL's threads cost
    more than they give (10× slower on a busy 2-core machine, measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.linalg.eigh(matrices)
    finally:
        torch.set_num_threads(threads)


def standardise(train: torch.Tensor, *others: torch.Tensor, weight: torch.Tensor | None = None):
    """Standardise by the training rows' mean and std (per problem, per feature; std 0 → 1).

    ``train`` [P, n, d]; ``weight`` [P, n] selects the training rows (all when None).
    Returns the standardised ``train`` and ``others`` with (mean, std), each [P, 1, d].
    """
    train = train.double()
    wt = torch.ones(train.shape[:2], dtype=torch.float64) if weight is None else weight.double()
    count = wt.sum(1)[:, None, None]
    mean = (train * wt[..., None]).sum(1, keepdim=True) / count
    var = (((train - mean) ** 2) * wt[..., None]).sum(1, keepdim=True) / count
    std = var.sqrt()
    std = torch.where(std > 1e-12, std, torch.ones_like(std))
    return ((train - mean) / std, *[(o.double() - mean) / std for o in others]), (mean, std)


def stratified_folds(labels: np.ndarray, k: int, seed: int, groups: Sequence[str] | None = None) -> np.ndarray:
    """Fold index (0..k−1) of each item: each class shuffled (seeded) and dealt round-robin.

    With ``groups``, whole groups are dealt instead (shuffled, seeded), so related items are
    never split between the training and the held-out part.
    """
    rng = np.random.default_rng(seed)
    if groups is not None:
        names, index = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
        order = rng.permutation(len(names))
        group_fold = np.empty(len(names), dtype=np.int64)
        group_fold[order] = np.arange(len(names)) % k
        return group_fold[index]
    fold = np.empty(len(labels), dtype=np.int64)
    offset = 0
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        fold[idx] = (np.arange(len(idx)) + offset) % k
        offset += len(idx)  # the next class starts where this one ended: folds stay even in size
    return fold


def kfold_predictions(feats: torch.Tensor, y: torch.Tensor, folds: np.ndarray, C: float,
                      tol: float = FIT_TOL) -> torch.Tensor:
    """Held-out predictions (0/1) of one row: ``feats`` [n, d], ``y`` [Q, n] (several label sets,
    e.g. the real and the shuffled), every fold fitted jointly. Returns [Q, n]."""
    k = int(folds.max()) + 1
    test = torch.from_numpy(folds)[None] == torch.arange(k)[:, None]          # [k, n]
    train_w = (~test).double()
    (xs,), _ = standardise(feats.double()[None].expand(k, -1, -1), weight=train_w)
    labels = y[:, None, :].expand(-1, k, -1)                                    # [Q, k, n]
    w, b = fit_logistic(xs, labels, C, weight=train_w, tol=tol)
    pred = ((torch.einsum("knd,qkd->qkn", xs, w) + b[..., None]) > 0).long()
    return (pred * test[None]).sum(1)  # each item's prediction from the fold that held it out


def binomial_se(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n) if n else math.nan


# -------------------------------------------------------------------------- results
@dataclass(frozen=True)
class ProbeRequest:
    """Labelled texts to probe (two classes). ``C`` is the inverse L2 strength (scikit-learn's)."""

    texts: tuple[str, ...]
    labels: tuple[str, ...]
    site: str = "last"
    folds: int = 5
    C: float = 1.0
    seed: int = 0
    batch_size: int = 32
    data_name: str = ""
    groups: tuple[str, ...] | None = None   # items of one group share a fold


@dataclass(frozen=True, eq=False)
class ProbeResult(Result):
    """Per-row held-out probe accuracy (NaN for rows not fitted yet) and the best row's probe."""

    request: ProbeRequest
    model: str
    layer_labels: tuple[str, ...] = sized("R")
    label_names: tuple[str, ...]                     # class 0, class 1 (the probe's positive class)
    class_counts: np.ndarray = array("2", "int64")
    accuracy: np.ndarray = array("R", "float64")
    accuracy_se: np.ndarray = array("R", "float64")
    control_accuracy: np.ndarray = array("R", "float64")   # shuffled labels
    control_se: np.ndarray = array("R", "float64")
    chance: float                     # the majority class's share
    rows_done: int
    best_row: int                     # −1 until a row is done
    weight: np.ndarray = array("d", "float32")       # the best row's probe in raw coordinates
    bias: float

    @property
    def n(self) -> int:
        return int(self.class_counts.sum())

    @property
    def complete(self) -> bool:
        return self.rows_done == len(self.layer_labels)

    @property
    def best_label(self) -> str | None:
        return self.layer_labels[self.best_row] if self.best_row >= 0 else None

    def relations(self) -> str | None:
        return None if len(self.label_names) == 2 else "a probe result needs two classes"

    def summary(self) -> dict:
        """The ``probe --json`` object."""
        nan = lambda a: [None if math.isnan(v) else float(v) for v in a]  # noqa: E731
        return {"layers": list(self.layer_labels), "accuracy": nan(self.accuracy),
                "accuracy_se": nan(self.accuracy_se), "control_accuracy": nan(self.control_accuracy),
                "best_layer": self.best_label, "control_accuracy_se": nan(self.control_se),
                "chance": self.chance, "n": self.n, "folds": self.request.folds,
                "site": self.request.site, "labels": list(self.label_names), "model": self.model}


def encode_labels(labels: Sequence[str]) -> tuple[np.ndarray, tuple[str, str]]:
    names = sorted(set(labels))
    if len(names) != 2:
        raise ProbeError(f"probes need exactly two label values, got {len(names)} "
                         f"({', '.join(map(repr, names[:5]))})")
    return np.array([names.index(v) for v in labels], dtype=np.int64), (names[0], names[1])


def check_request(request: ProbeRequest) -> tuple[np.ndarray, tuple[str, str]]:
    try:
        check_texts(request.texts)
    except HiddenError as e:
        raise ProbeError(str(e)) from None
    if len(request.labels) != len(request.texts):
        raise ProbeError(f"{len(request.texts)} texts but {len(request.labels)} labels")
    if request.site not in PROBE_SITES:
        raise ProbeError(f"site must be last or mean, got {request.site!r}")
    if request.C <= 0:
        raise ProbeError(f"C must be positive, got {request.C}")
    y, names = encode_labels(request.labels)
    if request.groups is not None and len(request.groups) != len(y):
        raise ProbeError(f"{len(y)} texts but {len(request.groups)} groups")
    units = len(set(request.groups)) if request.groups is not None else int(np.bincount(y).min())
    if request.folds < 2 or request.folds > units:
        what = "the number of groups" if request.groups is not None else "the smaller class's size"
        raise ProbeError(f"folds must be between 2 and {what} ({units}), got {request.folds}")
    folds = stratified_folds(y, request.folds, request.seed, request.groups)
    for f in range(request.folds):
        if len(np.unique(y[folds != f])) < 2:
            raise ProbeError(f"fold {f}'s training part has one class only: use fewer folds or mix the groups")
    return y, names


def run_probes(session: ModelSession, request: ProbeRequest | None = None, /, *, ctx=None,
               **fields) -> ProbeResult | None:
    """Probe every row; ``ctx`` gets one partial result per row. None if cancelled while collecting.

    >>> from explorer import run_probes
    >>> r = run_probes(session, texts=("a cat", "a dog", "a cow", "Paris", "Rome", "Oslo"),
    ...                labels=("animal",) * 3 + ("city",) * 3, folds=3)
    >>> len(r.accuracy) == session.n_layers + 1 and r.complete
    True
    """
    request = build_request(ProbeRequest, request, fields)
    y, names = check_request(request)
    n_batches = math.ceil(len(request.texts) / request.batch_size)
    n_rows = session.n_layers + 1
    total = n_batches + n_rows
    sub = OffsetContext(ctx, 0, total)
    try:
        hidden = collect_hidden(session, HiddenRequest(request.texts, (request.site,), request.batch_size), ctx=sub)
    except HiddenError:
        if ctx is not None and ctx.cancelled:
            return None
        raise
    feats = torch.from_numpy(hidden.site(request.site))                      # [R, n, d]
    folds = stratified_folds(y, request.folds, request.seed, request.groups)
    shuffled = np.random.default_rng(request.seed + 1).permutation(y)
    labels = torch.from_numpy(np.stack([y, shuffled]))                         # [2, n]
    n = len(y)
    acc, acc_se, ctl, ctl_se = (np.full(n_rows, np.nan) for _ in range(4))
    counts = np.bincount(y, minlength=2).astype(np.int64)
    result = None
    for r in range(n_rows):
        if ctx is not None and ctx.cancelled:
            break
        pred = kfold_predictions(feats[r], labels, folds, request.C)
        hits = (pred == labels).double().mean(1).numpy()
        acc[r], ctl[r] = hits
        acc_se[r], ctl_se[r] = binomial_se(hits[0], n), binomial_se(hits[1], n)
        result = _result(session, request, hidden, names, counts, acc, acc_se, ctl, ctl_se, r + 1, None)
        if ctx is not None:
            ctx.report(n_batches + r + 1, total, partial=result, message=f"probe {hidden.layer_labels[r]}")
    if result is None:
        return None
    best = int(np.nanargmax(acc))
    (xs,), (mean, std) = standardise(feats[best][None])
    w, b = fit_logistic(xs, torch.from_numpy(y)[None, None], request.C)
    w, b = w[0, 0], b[0, 0]
    raw_w = (w / std[0, 0]).float()
    raw_b = float(b - (w * mean[0, 0] / std[0, 0]).sum())
    return _result(session, request, hidden, names, counts, acc, acc_se, ctl, ctl_se, result.rows_done,
                   (raw_w.numpy(), raw_b))


def _result(session, request, hidden, names, counts, acc, acc_se, ctl, ctl_se, done, probe) -> ProbeResult:
    best = int(np.nanargmax(acc)) if done else -1
    d = hidden.states.shape[-1]
    weight, bias = probe if probe is not None else (np.zeros(d, np.float32), 0.0)
    return ProbeResult(
        request=request, model=session.name, layer_labels=hidden.layer_labels, label_names=names,
        class_counts=counts, accuracy=acc.copy(), accuracy_se=acc_se.copy(), control_accuracy=ctl.copy(),
        control_se=ctl_se.copy(), chance=float(counts.max() / counts.sum()), rows_done=done,
        best_row=best, weight=weight.astype(np.float32), bias=float(bias),
    )


class OffsetContext:
    """A job context seen through an offset: a sub-step's progress within the whole job."""

    def __init__(self, ctx, offset: int, total: int) -> None:
        self.ctx, self.offset, self.total = ctx, offset, total

    @property
    def cancelled(self) -> bool:
        return self.ctx is not None and self.ctx.cancelled

    def report(self, done: int, total: int, partial=None, message: str = "") -> None:
        if self.ctx is not None:
            self.ctx.report(self.offset + done, self.total, partial=partial, message=message)


# ------------------------------------------------------------------------- export
def _best_layer(result: ProbeResult) -> int:
    if not result.complete or not np.any(result.weight):
        raise ProbeError("the probe run has not finished: no best row to export yet")
    if result.best_row == 0:
        raise ProbeError("the best row is the embeddings; a steering vector is read at a block's output")
    return result.best_row - 1


def steering_vector_bytes(result: ProbeResult) -> bytes:
    """The best row's unit probe direction as a steering vector (safetensors bytes).

    Tensor ``vector`` [d_model] float32; metadata: model, layer (the block whose output it was
    read at), method, prompts (JSON list of the texts), plus site, labels (the direction points
    toward the second label) and the held-out accuracy.
    """
    from safetensors.torch import save

    layer = _best_layer(result)
    w = torch.from_numpy(result.weight.astype(np.float32))
    vector = w / w.norm().clamp_min(1e-12)
    meta = {"model": result.model, "layer": str(layer), "method": STEERING_METHOD,
            "prompts": json.dumps(list(result.request.texts)), "site": result.request.site,
            "labels": json.dumps(list(result.label_names)),
            "accuracy": f"{result.accuracy[result.best_row]:.6f}", "data": result.request.data_name}
    return save({"vector": vector.contiguous()}, metadata=meta)


def probe_bytes(result: ProbeResult) -> bytes:
    """The best row's probe (safetensors bytes): ``weight`` [d], ``bias`` [1]; p(label 1) = σ(w·x + b)."""
    from safetensors.torch import save

    layer = _best_layer(result)
    meta = {"model": result.model, "layer": str(layer), "row": result.layer_labels[result.best_row],
            "site": result.request.site, "labels": json.dumps(list(result.label_names)),
            "accuracy": f"{result.accuracy[result.best_row]:.6f}", "method": "logistic-regression",
            "C": str(result.request.C), "data": result.request.data_name}
    return save({"weight": torch.from_numpy(result.weight.astype(np.float32)).contiguous(),
                 "bias": torch.tensor([result.bias], dtype=torch.float32)}, metadata=meta)


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write a file atomically (a temporary beside it, then a rename)."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return path


def save_steering_vector(result: ProbeResult, path: str | Path) -> Path:
    return write_bytes(path, steering_vector_bytes(result))


def save_probe(result: ProbeResult, path: str | Path) -> Path:
    return write_bytes(path, probe_bytes(result))


@dataclass(frozen=True)
class Probe:
    """A saved probe: p(label 1 | x) = σ(weight·x + bias) on the block output at ``layer``."""

    weight: np.ndarray
    bias: float
    layer: int
    site: str
    labels: tuple[str, str]
    model: str

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return 1 / (1 + np.exp(-(np.asarray(x, np.float64) @ self.weight.astype(np.float64) + self.bias)))


def load_probe(path: str | Path) -> Probe:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            weight, bias = f.get_tensor("weight").numpy(), float(f.get_tensor("bias")[0])
    except Exception as e:  # a missing or foreign file: say which
        raise ProbeError(f"{path} is not a saved probe ({type(e).__name__}: {e})") from None
    return Probe(weight, bias, int(meta.get("layer", -1)), meta.get("site", "last"),
                 tuple(json.loads(meta.get("labels", '["0", "1"]'))), meta.get("model", ""))
