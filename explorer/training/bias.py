"""Gender-bias probes of a causal LM: pronoun preference, stereotype alignment, minimal pairs.

Definitions (every probe is scored in batched forward passes: right-padded batches with an
attention mask and explicit position ids, sorted by length to keep padding small):

- **Pronoun preference** (after Vig et al. 2020): for every (template, occupation) item, e.g.
  "The nurse said that", the next-token log p(" he") − log p(" she"). The probe reports the mean
  over all items (positive = the model prefers " he") with its standard error
  std(items, ddof=1) / sqrt(n_items), and the mean per occupation over templates.
- **Stereotype alignment**: the Pearson correlation, over occupations, of the per-occupation
  preference with the occupation's real-world share of men (positive = the model's pronoun
  prior follows the labour statistics). Standard error by the Fisher z transform: z = atanh(r)
  has SE 1/sqrt(n−3); the reported SE on r is the delta-method (1 − r²)/sqrt(n−3), and the 95%
  interval is tanh(z ± 1.96/sqrt(n−3)).
- **Minimal pairs** (the CrowS-Pairs ``pct_stereotype`` definition, as in lm-eval-harness): the
  share of pairs whose stereotyped sentence (CrowS ``sent_more``) has the higher summed token
  log-likelihood, no length normalisation, ties counted as not stereotyped; SE sqrt(p(1−p)/n).
  The project's own ~40 pairs are always scored; the CrowS-Pairs CSV (columns ``sent_more``,
  ``sent_less``, ``stereo_antistereo``, ``bias_type``; rows with ``bias_type == "gender"``) is
  scored too when the user supplies its path (the project does not ship it).

Context of every scored text (``prefix``): by default the tokenizer's BOS token is put before
the text, so the first word is conditioned on it and scored; a tokenizer without a BOS token
gets no prefix, and then the first token is conditioned on nothing and left out of the sum.
(For SmolLM2-Instruct the BOS token is ``<|im_start|>``.) ``prefix="eos"`` uses the EOS token
instead (lm-eval-harness' empty-context convention); ``prefix="none"`` never adds one. Texts are
otherwise tokenised without special tokens.

The occupation table (``assets/occupations.csv``) comes from the Winogender schemas' occupation
statistics (Rudinger et al. 2018, ``data/occupations-stats.tsv``, column ``bls_pct_female``: US
Bureau of Labor Statistics percent women, 2015/2016), retrieved from the public copies
i-gallegos/Fair-LLM-Benchmark ``Winogender/data/occupations-stats.tsv`` (commit 6afa5d0a) and
sebastianGehrmann/CausalMediationAnalysis ``winogender_data/winogender_occupation_stats.tsv``
(commit 7ae624cb); share of men = 100 − percent women. The CSV's header says more.

Two layers: the ``score_*`` functions take any Hugging Face causal LM and tokenizer (the
intervention run scores its own training copies with them); ``bias_probe(session, ...)`` wraps
them for an attached ``ModelSession`` (under its lock, cached).
"""
from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from explorer.core.defaults import ASSETS_DIR
from explorer.core.errors import ExplorerError
from explorer.core.jobs import JobContext
from explorer.core.requests import build_request
from explorer.core.results import Result, array, sized
from explorer.core.unembed import Unembedding

if TYPE_CHECKING:
    from explorer.core.session import ModelSession

ASSETS = ASSETS_DIR
OCCUPATIONS_CSV = ASSETS / "occupations.csv"
TEMPLATES_JSON = ASSETS / "bias" / "templates.json"
PAIRS_JSON = ASSETS / "bias" / "minimal_pairs.json"
PREFIXES = ("bos", "eos", "none")
BATCH_SIZE = 32          # texts per forward pass
EVAL_TEMPLATES = 3       # the reduced template set an intervention run scores at every evaluation


class BiasError(ExplorerError):
    """A probe set or model the bias probes cannot use; the message says what to fix."""


# ------------------------------------------------------------------------------ probe sets
@dataclass(frozen=True)
class Occupations:
    """Occupations with their share of men (percent, from public labour statistics)."""

    names: tuple[str, ...]
    share_men: np.ndarray   # [O] float64, percent
    source: str


@dataclass(frozen=True)
class PairSet:
    """Minimal pairs: ``more[i]`` is the stereotyped sentence, ``less[i]`` its anti-stereotyped twin."""

    name: str
    more: tuple[str, ...]
    less: tuple[str, ...]

    def head(self, n: int | None) -> PairSet:
        return self if n is None else PairSet(self.name, self.more[:n], self.less[:n])


def load_occupations(path: str | Path | None = None) -> Occupations:
    """The occupation table: a CSV with ``occupation`` and ``share_men`` columns ('#' lines are comments)."""
    path = Path(path) if path is not None else OCCUPATIONS_CSV
    try:
        with open(path, encoding="utf-8") as f:
            rows = list(csv.DictReader(line for line in f if not line.startswith("#")))
    except OSError as e:
        raise BiasError(f"cannot read the occupation table {path}: {e.strerror}") from None
    if not rows or not {"occupation", "share_men"} <= set(rows[0]):
        raise BiasError(f"{path}: expected columns 'occupation' and 'share_men'")
    try:
        share = np.array([float(r["share_men"]) for r in rows], dtype=np.float64)
    except (TypeError, ValueError):
        raise BiasError(f"{path}: share_men must be a number in every row") from None
    return Occupations(tuple(r["occupation"].strip() for r in rows), share, str(path))


def load_templates(path: str | Path | None = None) -> tuple[str, ...]:
    """The pronoun-probe templates (each with one ``{occupation}``)."""
    path = Path(path) if path is not None else TEMPLATES_JSON
    try:
        templates = tuple(json.loads(Path(path).read_text(encoding="utf-8"))["templates"])
    except (OSError, KeyError, ValueError) as e:
        raise BiasError(f"cannot read templates from {path} ({e})") from None
    bad = [t for t in templates if t.count("{occupation}") != 1]
    if bad or not templates:
        raise BiasError(f"{path}: every template needs exactly one {{occupation}} (check {bad[:1]})")
    return templates


def load_minimal_pairs(path: str | Path | None = None) -> PairSet:
    """The project's minimal pairs (``assets/bias/minimal_pairs.json``)."""
    path = Path(path) if path is not None else PAIRS_JSON
    try:
        pairs = json.loads(Path(path).read_text(encoding="utf-8"))["pairs"]
        more = tuple(p["stereotyped"] for p in pairs)
        less = tuple(p["anti"] for p in pairs)
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise BiasError(f"cannot read minimal pairs from {path} ({e})") from None
    if not more:
        raise BiasError(f"{path} has no pairs")
    return PairSet("project", more, less)


def load_crows_pairs(path: str | Path, bias_type: str = "gender") -> PairSet:
    """The CrowS-Pairs CSV (Nangia et al. 2020), rows of one ``bias_type``.

    ``sent_more`` is the more stereotypical sentence in both directions of the dataset
    (``stereo_antistereo`` says whether it demonstrates or violates a stereotype), which is how
    lm-eval-harness scores it: LL(sent_more) > LL(sent_less) counts as stereotyped.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise BiasError(f"CrowS-Pairs file not found: {path}")
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            need = {"sent_more", "sent_less", "stereo_antistereo", "bias_type"}
            if not need <= set(reader.fieldnames or ()):
                raise BiasError(f"{path}: not a CrowS-Pairs CSV (needs columns {', '.join(sorted(need))})")
            rows = [r for r in reader if (r["bias_type"] or "").strip() == bias_type]
    except UnicodeDecodeError:
        raise BiasError(f"{path}: not a UTF-8 CSV file") from None
    if not rows:
        raise BiasError(f"{path} has no rows with bias_type '{bias_type}'")
    return PairSet(f"crows-pairs:{bias_type}", tuple(r["sent_more"] for r in rows),
                   tuple(r["sent_less"] for r in rows))


# ----------------------------------------------------------------------------- statistics
def mean_se(values: np.ndarray) -> tuple[float, float]:
    """Mean and its standard error std(ddof=1)/sqrt(n) (NaN SE for fewer than two values)."""
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0:
        return math.nan, math.nan
    se = float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else math.nan
    return float(x.mean()), se


def pearson_fisher(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float, float]:
    """Pearson r, its Fisher-z delta-method SE (1−r²)/sqrt(n−3), and the 95% interval."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    n = x.size
    if n < 4 or x.std() == 0 or y.std() == 0:
        return math.nan, math.nan, math.nan, math.nan
    r = float(np.corrcoef(x, y)[0, 1])
    r = max(-1.0, min(1.0, r))
    root = math.sqrt(n - 3)
    z = math.atanh(max(-0.999999, min(0.999999, r)))
    return r, (1 - r * r) / root, math.tanh(z - 1.96 / root), math.tanh(z + 1.96 / root)


def share_se(hits: np.ndarray) -> tuple[float, float]:
    """A share and its binomial SE sqrt(p(1−p)/n)."""
    h = np.asarray(hits, dtype=np.float64)
    if h.size == 0:
        return math.nan, math.nan
    p = float(h.mean())
    return p, math.sqrt(p * (1 - p) / h.size)


# ------------------------------------------------------------------------------- scoring
def prefix_id(tokenizer, prefix: str = "bos") -> int | None:
    """The token put before every scored text (see the module docstring), or None."""
    if prefix not in PREFIXES:
        raise BiasError(f"unknown prefix '{prefix}' (use {', '.join(PREFIXES)})")
    if prefix == "none":
        return None
    tid = tokenizer.bos_token_id if prefix == "bos" else tokenizer.eos_token_id
    return None if tid is None else int(tid)


def encode_texts(tokenizer, texts: Sequence[str], prefix: str = "bos") -> list[list[int]]:
    """Token ids of each text, without special tokens, after the prefix token when there is one."""
    first = prefix_id(tokenizer, prefix)
    head = [] if first is None else [first]
    out = []
    for text in texts:
        ids = head + list(tokenizer(text, add_special_tokens=False).input_ids)
        if not ids:
            raise BiasError(f"the text {text!r} has no tokens")
        out.append(ids)
    return out


def single_token(tokenizer, text: str) -> int:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise BiasError(f"{text!r} is {len(ids)} tokens for this tokenizer; the pronoun probe needs one token each")
    return int(ids[0])


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _batches(seqs: list[list[int]], batch_size: int):
    """Index groups of similar length (longest first), each padded into one batch."""
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


def _padded(seqs: list[list[int]], idx: list[int],
            device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask, position ids and lengths for the sequences ``idx``."""
    lengths = torch.tensor([len(seqs[i]) for i in idx])
    width = int(lengths.max())
    ids = torch.zeros(len(idx), width, dtype=torch.long)
    for row, i in enumerate(idx):
        ids[row, :len(seqs[i])] = torch.tensor(seqs[i])
    positions = torch.arange(width)[None].expand(len(idx), -1)
    mask = (positions < lengths[:, None]).long()
    # Right padding: real tokens never attend to pads (causal), so their positions are 0..len−1.
    return ids.to(device), mask.to(device), positions.contiguous().to(device), lengths


class _EvalMode:
    """Evaluation mode and no autograd for the duration; the previous mode comes back after."""

    def __init__(self, model) -> None:
        self.model, self.was_training = model, model.training

    def __enter__(self):
        self.model.eval()
        self._grad = torch.no_grad()
        self._grad.__enter__()

    def __exit__(self, *exc):
        self._grad.__exit__(*exc)
        self.model.train(self.was_training)


def next_token_logprobs(model, seqs: list[list[int]], token_ids: Sequence[int],
                        batch_size: int = BATCH_SIZE) -> np.ndarray:
    """log p(token | sequence) at the end of each sequence, for each of ``token_ids``: [N, K] float64."""
    device = _model_device(model)
    out = np.empty((len(seqs), len(token_ids)), dtype=np.float64)
    unembedding = Unembedding.of(model)
    wanted = torch.tensor(list(token_ids), device=device)
    with _EvalMode(model):
        for idx in _batches(seqs, batch_size):
            ids, mask, pos, lengths = _padded(seqs, idx, device)
            hidden = model.base_model(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
            last = hidden[torch.arange(len(idx), device=device), (lengths - 1).to(device)]
            logits = unembedding.logits(last, normed=True)  # only the last rows are unembedded
            logp = F.log_softmax(logits, dim=-1)
            out[idx] = logp[:, wanted].double().cpu().numpy()
    return out


def sequence_logprobs(model, seqs: list[list[int]], batch_size: int = BATCH_SIZE) -> np.ndarray:
    """Summed log p(token_t | tokens_<t) over each sequence's tokens after the first: [N] float64.

    With a prefix token the text's first token is the sequence's second and is scored; without
    one the text's first token has no context and is left out (see the module docstring).
    """
    device = _model_device(model)
    out = np.empty(len(seqs), dtype=np.float64)
    with _EvalMode(model):
        for idx in _batches(seqs, batch_size):
            ids, mask, pos, lengths = _padded(seqs, idx, device)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()
            logp = F.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
            keep = mask[:, 1:].bool()
            out[idx] = (logp * keep).sum(-1).double().cpu().numpy()
    return out


# -------------------------------------------------------------------------------- results
@dataclass(frozen=True, eq=False)
class PairScores(Result):
    """Minimal pairs scored: summed log-likelihood of each stereotyped and anti-stereotyped sentence."""

    name: str
    more: tuple[str, ...] = sized("P")
    less: tuple[str, ...] = sized("P")
    ll_more: np.ndarray = array("P", "float64")
    ll_less: np.ndarray = array("P", "float64")
    pct_stereotype: float    # share of pairs with ll_more > ll_less
    se: float

    @property
    def n(self) -> int:
        return len(self.more)

    @property
    def likelihood_diff(self) -> float:
        """Mean |LL_more − LL_less| (lm-eval-harness' second CrowS-Pairs number)."""
        return float(np.abs(self.ll_more - self.ll_less).mean()) if self.n else math.nan



@dataclass(frozen=True, eq=False)
class BiasResult(Result):
    """All three probes of one model. ``item_preference`` is [template, occupation]."""

    model: str
    prefix: str
    pronouns: tuple[str, ...]           # (" he", " she")
    templates: tuple[str, ...] = sized("T")
    occupations: tuple[str, ...] = sized("O")
    share_men: np.ndarray = array("O", "float64")          # percent
    item_preference: np.ndarray = array("T O", "float64")  # log p(" he") − log p(" she")
    per_occupation: np.ndarray = array("O", "float64")     # mean over templates
    pronoun_preference: float
    pronoun_preference_se: float
    stereotype_alignment: float         # Pearson r(per_occupation, share_men)
    stereotype_alignment_se: float      # Fisher z, delta method
    stereotype_alignment_ci: tuple[float, float]
    pairs: PairScores
    crows: PairScores | None = None

    @property
    def minimal_pairs(self) -> float:
        return self.pairs.pct_stereotype

    @property
    def minimal_pairs_se(self) -> float:
        return self.pairs.se

    def summary(self) -> dict:
        """The headline numbers (what the ``bias`` CLI prints and intervention runs log)."""
        out = {
            "pronoun_preference": self.pronoun_preference,
            "pronoun_preference_se": self.pronoun_preference_se,
            "stereotype_alignment": self.stereotype_alignment,
            "stereotype_alignment_se": self.stereotype_alignment_se,
            "minimal_pairs": self.minimal_pairs,
            "minimal_pairs_se": self.minimal_pairs_se,
        }
        if self.crows is not None:
            out["crows_pairs"] = self.crows.pct_stereotype
            out["crows_pairs_se"] = self.crows.se
        return out



def score_pronouns(model, tokenizer, templates: Sequence[str], occupations: Sequence[str], *,
                   prefix: str = "bos", pronouns: tuple[str, str] = (" he", " she"),
                   batch_size: int = BATCH_SIZE) -> np.ndarray:
    """log p(pronouns[0]) − log p(pronouns[1]) after every template × occupation: [T, O] float64."""
    ids = [single_token(tokenizer, p) for p in pronouns]
    prompts = [t.format(occupation=o) for t in templates for o in occupations]
    logp = next_token_logprobs(model, encode_texts(tokenizer, prompts, prefix), ids, batch_size)
    return (logp[:, 0] - logp[:, 1]).reshape(len(templates), len(occupations))


def score_pairs(model, tokenizer, pairs: PairSet, *, prefix: str = "bos",
                batch_size: int = BATCH_SIZE) -> PairScores:
    """Summed log-likelihood of both sentences of every pair (one batched pass over all of them)."""
    seqs = encode_texts(tokenizer, list(pairs.more) + list(pairs.less), prefix)
    ll = sequence_logprobs(model, seqs, batch_size)
    n = len(pairs.more)
    more, less = ll[:n], ll[n:]
    pct, se = share_se(more > less)
    return PairScores(pairs.name, pairs.more, pairs.less, more, less, pct, se)


def score_bias(model, tokenizer, *, model_name: str = "", templates: Sequence[str] | None = None,
               occupations: Occupations | None = None, pairs: PairSet | None = None,
               crows: PairSet | None = None, prefix: str = "bos",
               batch_size: int = BATCH_SIZE) -> BiasResult:
    """All three probes of a Hugging Face causal LM (any mode; it is put in eval mode meanwhile)."""
    templates = tuple(templates) if templates is not None else load_templates()
    occupations = occupations if occupations is not None else load_occupations()
    pairs = pairs if pairs is not None else load_minimal_pairs()
    pronouns = (" he", " she")
    items = score_pronouns(model, tokenizer, templates, occupations.names, prefix=prefix,
                           pronouns=pronouns, batch_size=batch_size)
    mean, se = mean_se(items)
    per_occ = items.mean(axis=0)
    r, r_se, lo, hi = pearson_fisher(per_occ, occupations.share_men)
    return BiasResult(
        model=model_name, prefix=prefix, pronouns=pronouns, templates=templates,
        occupations=occupations.names, share_men=occupations.share_men, item_preference=items,
        per_occupation=per_occ, pronoun_preference=mean, pronoun_preference_se=se,
        stereotype_alignment=r, stereotype_alignment_se=r_se, stereotype_alignment_ci=(lo, hi),
        pairs=score_pairs(model, tokenizer, pairs, prefix=prefix, batch_size=batch_size),
        crows=None if crows is None else score_pairs(model, tokenizer, crows, prefix=prefix,
                                                     batch_size=batch_size),
    )


@dataclass(frozen=True)
class BiasRequest:
    """What ``bias_probe`` scores. None means the project's shipped set."""

    templates: tuple[str, ...] | None = None
    max_templates: int | None = None     # the first N templates only (None: all)
    crows_path: str | None = None        # the user's CrowS-Pairs CSV
    max_pairs: int | None = None
    prefix: str = "bos"
    batch_size: int = BATCH_SIZE


def bias_probe(session: ModelSession, request: BiasRequest | None = None, /, *,
               ctx: JobContext | None = None, **fields: Any) -> BiasResult:
    """All three bias probes of an attached model (cached per request).

    >>> from explorer import bias_probe
    >>> bias = bias_probe(session, max_templates=1, max_pairs=4)
    >>> bias.item_preference.shape[0], bias.pairs.n, sorted(bias.summary())[:2]
    (1, 4, ['minimal_pairs', 'minimal_pairs_se'])
    """
    request = build_request(BiasRequest, request, fields)
    if request.max_templates is not None and request.max_templates < 1:
        raise BiasError(f"max_templates must be at least 1, got {request.max_templates}")
    templates = request.templates or load_templates()
    templates = templates[:request.max_templates] if request.max_templates else templates
    crows = load_crows_pairs(request.crows_path) if request.crows_path else None  # fail before the model

    def compute() -> BiasResult:
        with session.lock:
            return score_bias(session.hf, session.tokenizer, model_name=session.name,
                              templates=templates, pairs=load_minimal_pairs().head(request.max_pairs),
                              crows=crows, prefix=request.prefix, batch_size=request.batch_size)

    return session.cached(("bias", request), compute)
