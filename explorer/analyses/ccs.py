"""Contrast-consistent search (CCS; Burns, Ye, Klein & Steinhardt 2022): a truth direction found
without labels, per layer, compared with a supervised probe and with the logit lens's answer.

Data: contrast pairs, each a statement answered both ways (``pos``: "… Yes", ``neg``: "… No")
and a label (1 when ``pos`` is the true one). Both sides' hidden states at every row come from
one batched pass (``explorer.analyses.hidden``), at the last token by default.

Per row (the embeddings, then each block's output):

1. **Split**: the pairs (or whole groups of pairs, when given: a statement and its false twin
   stay together) are shuffled (seeded) into a training part (``train_fraction``, default 0.6
   as in the paper) and a held-out test part.
2. **Normalise each side** separately by the training part's mean and per-feature std
   (x̃⁺ = (x⁺ − μ⁺)/σ⁺, likewise x̃⁻), so the direction cannot just read which answer was appended.
3. **Probe** p(x) = σ(θ·x̃ + b), trained on the training part without labels to minimise
   L = mean[(p(x⁺) − (1 − p(x⁻)))²] (consistency) + mean[min(p(x⁺), p(x⁻))²] (confidence),
   by full-batch AdamW (lr 1e-3, weight decay 0.01, 1000 epochs: the reference code's defaults)
   from ``restarts`` (10) random starts, all rows and starts trained together as one batched
   problem; per row the start with the lowest final loss is kept.
4. **Sign**: CCS cannot tell true from false; the sign is fixed on a labelled dev split — the
   training part's labels (used for nothing else): if p̃ = ½(p(x⁺) + 1 − p(x⁻)) > ½ agrees with
   them less than half the time, the probe is flipped.
5. **Accuracy** on the test part (p̃ > ½ means ``pos`` is true), with the binomial SE.

Beside it, on the same split: the **supervised** probe (L2 logistic regression on x̃⁺ − x̃⁻ with
the training labels, ``explorer.analyses.probes.fit_logistic``), the **control** (the same
random starts *untrained*, sign fixed the same way, accuracy averaged over starts: what the
sign choice alone gets), and the **logit-lens answer**: at each row, the lens (final norm and
unembedding) at the token before each text's last one gives log p(last token); ``pos`` is
judged true when its last token is more likely than ``neg``'s (at the final row this is the
model's own zero-shot choice between its two answers when the pair differs only there).
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from explorer.analyses.hidden import HiddenError, HiddenRequest, check_texts, collect_hidden
from explorer.analyses.lens import chunk_rows
from explorer.analyses.probes import OffsetContext, binomial_se, fit_logistic, standardise
from explorer.core.errors import ExplorerError
from explorer.core.requests import build_request
from explorer.core.results import Result, array, sized
from explorer.core.session import ModelSession

# How a labelled statement becomes a contrast pair (the built-in true/false facts use it).
PAIR_TEMPLATE = "{statement}\nQuestion: Is this statement true?\nAnswer:"
ANSWERS = (" Yes", " No")
LENS_CHUNK = 512  # rows unembedded per matmul


class CCSError(ExplorerError):
    """Contrast pairs or options CCS cannot use."""


@dataclass(frozen=True)
class ContrastPairs:
    name: str
    pos: tuple[str, ...]
    neg: tuple[str, ...]
    labels: tuple[int, ...]   # 1 when ``pos`` is the true side
    groups: tuple[str, ...] | None = None   # pairs of one group stay on one side of the split

    @property
    def size(self) -> int:
        return len(self.pos)


def pairs_from_statements(texts: Sequence[str], truth: Sequence[bool], name: str = "",
                          template: str = PAIR_TEMPLATE, answers: tuple[str, str] = ANSWERS,
                          groups: Sequence[str] | None = None) -> ContrastPairs:
    """Statements made into pairs: the template with " Yes" (pos) and " No" (neg); label = truth."""
    pos = tuple(template.format(statement=t) + answers[0] for t in texts)
    neg = tuple(template.format(statement=t) + answers[1] for t in texts)
    return ContrastPairs(name, pos, neg, tuple(int(bool(v)) for v in truth),
                         None if groups is None else tuple(groups))


def load_pairs(path: str | Path) -> ContrastPairs:
    """A JSONL of ``{"pos", "neg", "label"}`` lines (label 1 or true when ``pos`` is the true side)."""
    path = Path(path).expanduser()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise CCSError(f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise CCSError(f"{path} is not UTF-8 text") from None
    pos, neg, labels, groups = [], [], [], []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            p, q, lab = row["pos"], row["neg"], row["label"]
        except (ValueError, KeyError, TypeError):
            raise CCSError(f"{path.name} line {i}: expected a JSON object with pos, neg and label") from None
        if isinstance(lab, str):
            lab = lab.strip().lower() in ("1", "true", "yes", "pos")
        pos.append(str(p))
        neg.append(str(q))
        labels.append(int(bool(lab)))
        groups.append(row.get("group"))
    if not pos:
        raise CCSError(f"{path.name} has no pairs")
    grouped = all(g is not None for g in groups)
    return ContrastPairs(path.stem, tuple(pos), tuple(neg), tuple(labels),
                         tuple(str(g) for g in groups) if grouped else None)


def builtin_pairs(name: str = "facts") -> ContrastPairs:
    """A built-in labelled set of true/false statements made into contrast pairs."""
    from explorer.analyses.probes import load_builtin

    data = load_builtin(name)
    if set(data.labels) != {"true", "false"}:
        raise CCSError(f"the built-in set {name!r} is not true/false statements")
    return pairs_from_statements(data.texts, [lab == "true" for lab in data.labels], name, groups=data.groups)


@dataclass(frozen=True)
class CCSRequest:
    pos: tuple[str, ...]
    neg: tuple[str, ...]
    labels: tuple[int, ...]
    site: str = "last"
    train_fraction: float = 0.6
    restarts: int = 10
    epochs: int = 1000        # the reference implementation's defaults: AdamW, lr 1e-3, wd 0.01,
    lr: float = 1e-3          # 1000 full-batch epochs, 10 starts
    weight_decay: float = 0.01
    C: float = 1.0           # the supervised comparison's inverse L2 strength
    seed: int = 0
    batch_size: int = 32
    data_name: str = ""
    groups: tuple[str, ...] | None = None


@dataclass(frozen=True, eq=False)
class CCSResult(Result):
    """Per-row CCS accuracy on the held-out pairs, its losses, and the comparisons on the same split."""

    request: CCSRequest
    model: str
    layer_labels: tuple[str, ...] = sized("R")
    n_train: int
    n_test: int
    accuracy: np.ndarray = array("R", "float64")             # test pairs, sign fixed on the training labels
    accuracy_se: np.ndarray = array("R", "float64")
    loss_consistency: np.ndarray = array("R", "float64")     # training part, the kept start
    loss_confidence: np.ndarray = array("R", "float64")
    sign_flipped: np.ndarray = array("R", "bool")
    control_accuracy: np.ndarray = array("R", "float64")     # untrained random starts, sign fixed the same way
    supervised_accuracy: np.ndarray = array("R", "float64")  # logistic regression on x̃⁺ − x̃⁻
    supervised_se: np.ndarray = array("R", "float64")
    lens_accuracy: np.ndarray = array("R", "float64")        # the logit lens's answer (NaN where texts are one token)
    lens_se: np.ndarray = array("R", "float64")
    chance: float                     # the test part's majority share
    best_row: int

    @property
    def best_label(self) -> str:
        return self.layer_labels[self.best_row]

    def summary(self) -> dict:
        """The ``ccs --json`` object (the probe's shape, and the comparisons)."""
        nan = lambda a: [None if math.isnan(v) else float(v) for v in a]  # noqa: E731
        return {"layers": list(self.layer_labels), "accuracy": nan(self.accuracy),
                "accuracy_se": nan(self.accuracy_se), "control_accuracy": nan(self.control_accuracy),
                "best_layer": self.best_label, "loss_consistency": nan(self.loss_consistency),
                "loss_confidence": nan(self.loss_confidence),
                "supervised_accuracy": nan(self.supervised_accuracy), "lens_accuracy": nan(self.lens_accuracy),
                "chance": self.chance, "n_train": self.n_train, "n_test": self.n_test,
                "site": self.request.site, "model": self.model}


def ccs_losses(p_pos: torch.Tensor, p_neg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(consistency, confidence) averaged over the last dimension (the pairs)."""
    consistency = ((p_pos - (1 - p_neg)) ** 2).mean(-1)
    confidence = (torch.minimum(p_pos, p_neg) ** 2).mean(-1)
    return consistency, confidence


def train_ccs(x_pos: torch.Tensor, x_neg: torch.Tensor, restarts: int, epochs: int, lr: float,
              weight_decay: float, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """CCS probes for P feature sets at once: ``x_pos``, ``x_neg`` [P, n, d] (normalised).

    Returns the initial (θ0 [P, K, d], b0 [P, K]) and the trained (θ [P, K, d], b [P, K]) of
    every start, in float32.
    """
    P, _, d = x_pos.shape
    gen = torch.Generator().manual_seed(seed)
    theta0 = torch.randn(P, restarts, d, generator=gen) / math.sqrt(d)
    b0 = torch.zeros(P, restarts)
    theta = theta0.clone().requires_grad_(True)
    bias = b0.clone().requires_grad_(True)
    opt = torch.optim.AdamW([theta, bias], lr=lr, weight_decay=weight_decay)
    xp, xn = x_pos.float(), x_neg.float()
    with torch.enable_grad():
        for _ in range(epochs):
            opt.zero_grad()
            p_pos = torch.sigmoid(torch.einsum("pnd,pkd->pkn", xp, theta) + bias[..., None])
            p_neg = torch.sigmoid(torch.einsum("pnd,pkd->pkn", xn, theta) + bias[..., None])
            cons, conf = ccs_losses(p_pos, p_neg)
            (cons + conf).sum().backward()  # a sum of independent problems: each gets its own gradient
            opt.step()
    return theta0, b0, theta.detach(), bias.detach()


def _credence(x_pos, x_neg, theta, bias) -> torch.Tensor:
    """p̃ = ½(p(x⁺) + 1 − p(x⁻)) of every start: [P, K, n]."""
    p_pos = torch.sigmoid(torch.einsum("pnd,pkd->pkn", x_pos.float(), theta) + bias[..., None])
    p_neg = torch.sigmoid(torch.einsum("pnd,pkd->pkn", x_neg.float(), theta) + bias[..., None])
    return 0.5 * (p_pos + 1 - p_neg)


def sign_fixed_accuracy(cred_dev: torch.Tensor, y_dev: torch.Tensor, cred_test: torch.Tensor,
                        y_test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Test accuracy [..] with the sign chosen on the dev part, and whether it was flipped."""
    dev_acc = ((cred_dev > 0.5).long() == y_dev).double().mean(-1)
    flip = dev_acc < 0.5
    test_acc = ((cred_test > 0.5).long() == y_test).double().mean(-1)
    return torch.where(flip, 1 - test_acc, test_acc), flip


def split_pairs(n: int, fraction: float, seed: int,
                groups: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(training, test) indices: a seeded shuffle of the pairs, or of whole groups when given."""
    rng = np.random.default_rng(seed)
    if groups is None:
        order = rng.permutation(n)
        n_train = int(round(n * fraction))
        return np.sort(order[:n_train]), np.sort(order[n_train:])
    names, index = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    chosen = rng.permutation(len(names))[:int(round(len(names) * fraction))]
    train = np.isin(index, chosen)
    return np.flatnonzero(train), np.flatnonzero(~train)


def check_request(request: CCSRequest) -> None:
    try:
        check_texts(request.pos)
        check_texts(request.neg)
    except HiddenError as e:
        raise CCSError(str(e)) from None
    if not len(request.pos) == len(request.neg) == len(request.labels):
        raise CCSError(f"{len(request.pos)} pos, {len(request.neg)} neg and {len(request.labels)} labels: "
                       "every pair needs all three")
    if request.site not in ("last", "mean"):
        raise CCSError(f"site must be last or mean, got {request.site!r}")
    if not 0 < request.train_fraction < 1:
        raise CCSError(f"train_fraction must be between 0 and 1, got {request.train_fraction}")
    if request.groups is not None and len(request.groups) != len(request.pos):
        raise CCSError(f"{len(request.pos)} pairs but {len(request.groups)} groups")
    train, test = split_pairs(len(request.pos), request.train_fraction, request.seed, request.groups)
    if len(train) < 2 or len(test) < 2:
        raise CCSError(f"{len(request.pos)} pairs are too few: the training and test parts need 2 each")
    if request.restarts < 1 or request.epochs < 1:
        raise CCSError("restarts and epochs must be at least 1")


def lens_logprob(session: ModelSession, states: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """log p(token) of the logit lens at each state: ``states`` [R, N, d], ``token_ids`` [N] → [R, N]."""
    R, N, d = states.shape
    flat = states.reshape(-1, d)
    ids = token_ids.repeat(R)
    out = torch.empty(R * N, dtype=torch.float64)
    # Fewer rows a chunk for a large vocabulary or little free memory (see the lens's chunk_rows).
    step = min(LENS_CHUNK, chunk_rows(session.unembedding.vocab_size, session.unembedding.device))
    with torch.no_grad():
        for start in range(0, R * N, step):
            x = session.final_norm(flat[start:start + step].to(session.device, session.dtype))
            logits = session.logits(x, normed=True)  # W_U loaded per chunk when offloaded
            logp = logits.log_softmax(-1).gather(-1, ids[start:start + step, None].to(logits.device))[:, 0]
            out[start:start + step] = logp.double().cpu()
    return out.view(R, N)


def run_ccs(session: ModelSession, request: CCSRequest | None = None, /, *, ctx=None, **fields) -> CCSResult | None:
    """CCS on contrast pairs at every row, with the supervised, control and lens comparisons.

    >>> from explorer.analyses.ccs import pairs_from_statements, run_ccs
    >>> pairs = pairs_from_statements(["Two plus two is four.", "Two plus two is five.",
    ...                                "Snow is white.", "Snow is green.", "Fire is hot.", "Fire is cold."],
    ...                               [True, False, True, False, True, False])
    >>> r = run_ccs(session, pos=pairs.pos, neg=pairs.neg, labels=pairs.labels, train_fraction=0.5,
    ...             restarts=2, epochs=20)
    >>> len(r.accuracy) == session.n_layers + 1
    True
    """
    request = build_request(CCSRequest, request, fields)
    check_request(request)
    n = len(request.pos)
    texts = request.pos + request.neg
    sites = (request.site, "prev") if request.site != "prev" else ("prev",)
    n_batches = math.ceil(2 * n / request.batch_size)
    total = n_batches + 3
    try:
        hidden = collect_hidden(session, HiddenRequest(texts, sites, request.batch_size),
                                ctx=OffsetContext(ctx, 0, total))
    except HiddenError:
        if ctx is not None and ctx.cancelled:
            return None
        raise
    feats = torch.from_numpy(hidden.site(request.site))                 # [R, 2n, d]
    x_pos, x_neg = feats[:, :n], feats[:, n:]
    y = torch.tensor(request.labels, dtype=torch.long)
    train, test = split_pairs(n, request.train_fraction, request.seed, request.groups)
    tr, te = torch.from_numpy(train), torch.from_numpy(test)
    (xp_tr, xp_te), _ = standardise(x_pos[:, tr], x_pos[:, te])
    (xn_tr, xn_te), _ = standardise(x_neg[:, tr], x_neg[:, te])
    _report(ctx, n_batches + 1, total, "training CCS")
    theta0, b0, theta, bias = train_ccs(xp_tr, xn_tr, request.restarts, request.epochs, request.lr,
                                        request.weight_decay, request.seed)
    R = feats.shape[0]
    rows = torch.arange(R)
    with torch.no_grad():
        cons, conf = ccs_losses(*(torch.sigmoid(torch.einsum("pnd,pkd->pkn", x.float(), theta) + bias[..., None])
                                  for x in (xp_tr, xn_tr)))
        keep = (cons + conf).argmin(-1)                                   # [R]
        acc, flip = sign_fixed_accuracy(_credence(xp_tr, xn_tr, theta, bias), y[tr],
                                        _credence(xp_te, xn_te, theta, bias), y[te])
        ctl, _ = sign_fixed_accuracy(_credence(xp_tr, xn_tr, theta0, b0), y[tr],
                                     _credence(xp_te, xn_te, theta0, b0), y[te])
    acc_best, flip_best = acc[rows, keep], flip[rows, keep]
    _report(ctx, n_batches + 2, total, "supervised comparison")
    diff_tr, diff_te = xp_tr - xn_tr, xp_te - xn_te
    (ds_tr, ds_te), _ = standardise(diff_tr, diff_te)
    w, b = fit_logistic(ds_tr, y[tr][None, None].expand(1, R, -1), request.C, tol=1e-6)
    sup = (((torch.einsum("pnd,pd->pn", ds_te, w[0]) + b[0][:, None]) > 0).long() == y[te]).double().mean(-1)
    lens_acc = np.full(R, np.nan)
    multi = (hidden.n_tokens[:n] > 1) & (hidden.n_tokens[n:] > 1)
    if multi[test].all():
        lp = lens_logprob(session, torch.from_numpy(hidden.site("prev")), torch.from_numpy(hidden.last_ids))
        lens_acc = ((lp[:, :n][:, te] > lp[:, n:][:, te]).long() == y[te]).double().mean(-1).numpy()
    _report(ctx, total, total, "done")
    n_test = len(test)
    y_te = y[te].numpy()
    acc_np = acc_best.numpy()
    return CCSResult(
        request=request, model=session.name, layer_labels=hidden.layer_labels, n_train=len(train),
        n_test=n_test, accuracy=acc_np, accuracy_se=np.array([binomial_se(a, n_test) for a in acc_np]),
        loss_consistency=cons[rows, keep].double().numpy(), loss_confidence=conf[rows, keep].double().numpy(),
        sign_flipped=flip_best.numpy().astype(bool), control_accuracy=ctl.mean(-1).numpy(),
        supervised_accuracy=sup.numpy(), supervised_se=np.array([binomial_se(a, n_test) for a in sup.numpy()]),
        lens_accuracy=lens_acc, lens_se=np.array([binomial_se(a, n_test) if not math.isnan(a) else math.nan
                                                  for a in lens_acc]),
        chance=float(max(y_te.mean(), 1 - y_te.mean())), best_row=int(np.argmax(acc_np)),
    )


def _report(ctx, done: int, total: int, message: str) -> None:
    if ctx is not None:
        ctx.report(done, total, message=message)


