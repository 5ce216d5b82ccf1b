"""The training-data pronoun-swap intervention: a control arm and a swapped arm, trained side by side.

After Biderman et al. 2023 (Pythia §3.1): from one starting checkpoint, train two copies of the
model on the same data in the same order, one on the original text ("control") and one on the
text with masculine words swapped for feminine ones ("swapped", ``explorer.training.swap``), and follow
the bias probes (``explorer.training.bias``) of both.

The data, built once per run (``build_streams``):
- the corpus's documents are put in a seeded random order; the first ``heldout_documents`` of
  that order are held out (unswapped) for the held-out loss, the rest are the training documents;
- the control stream is the training documents' tokens in that order, each followed by the
  tokens of "\\n\\n"; the swapped stream is built from the swapped text of the same documents in
  the same order (swap the document, then tokenise it: the original text is never re-tokenised
  for the swapped arm, the hole in one version of the Pythia code);
- each stream is cut into windows of ``seq_len`` tokens; step ``s`` (1-based) trains both arms on
  windows ``(s−1)·B … s·B−1`` (modulo the window count: the data repeats in the same order).
  A swap that changes a document's token count shifts the later windows of the swapped stream by
  that many tokens; the audit reports both totals (news corpus, SmolLM2 tokenizer: 68,767 →
  68,820 training tokens, so the swapped arm's windows drift by at most 53 tokens).

Training: AdamW (weight decay on matrices only, not on norms and biases), linear warm-up to
``lr`` over ``warmup`` steps, then constant; gradient clipping at ``grad_clip``. ``train``
chooses the trainable parameters: ``all``, or ``last:N`` (the last N blocks and the final norm;
the embeddings and unembedding stay frozen: in tied models such as SmolLM2 they are one 28M
matrix that is also the input vocabulary, and the pronoun prior is read out through the last
blocks anyway). Both arms start from the same weights and the same seeded RNG; each arm keeps
its own RNG state (restored before its step, saved after), so dropout masks are identical in the
two arms and across a resume. The arms alternate step by step in one process, so both curves
grow together. GPU when available; ``dtype="auto"`` trains float32 weights, with bfloat16
autocast on CUDA.

Every ``eval_every`` steps (and at step 0 and the last step) each arm is evaluated: the held-out
loss and the three bias probes on a reduced probe set (the first ``eval_templates`` templates ×
all occupations, ``eval_pairs`` minimal pairs), one JSON line per evaluation appended and flushed
to ``<out>/<arm>/metrics.jsonl``; every step's training loss goes to ``<out>/<arm>/steps.jsonl``.
Every ``checkpoint_every`` steps (and at the end, and on cancel) each arm is saved to
``<out>/<arm>/checkpoints/step-NNNNNN/``: a Hugging Face model directory (safetensors, with the
tokenizer, so it loads like any model) plus ``trainer_state.pt`` (optimizer moments and RNG
states, tensors only, read back with ``weights_only=True``) and ``state.json``; it is written in
a temporary directory and renamed into place (atomic). Calling ``run_intervention`` again with
the same ``out_dir`` resumes from the last checkpoint both arms have: metric lines after it are
dropped and recomputed, so the metrics continue exactly as an uninterrupted run's.
``<out>/run.json`` holds the configuration, the swap audit and the run's status.

API for views and notebooks:
- ``InterventionConfig()``: the demo's settings; ``config.check()`` names a bad one.
- ``corpus_audit(tokenizer, config)``: the swap's audit of the training documents (counts per
  word pair, token counts before/after, sample changes), to show before a run starts.
- ``run_intervention(model_or_session, config, out_dir, ctx)`` or ``intervention_job(...)``
  (a ``Job``): partial ``InterventionResult``s arrive through ``ctx.report`` after every step.
- ``InterventionResult``: ``control`` / ``swapped`` are ``ArmMetrics`` (one array per metric,
  a value per evaluation, plus every step's training loss); ``effect()`` is swapped − control
  with its SE. ``METRIC_KEYS`` lists the metrics in chart order.
- ``load_run(out_dir)``, ``list_runs(root)``, ``default_runs_dir()``: finished runs, reopened
  from their files; ``iter_checkpoints(out_dir)`` for the checkpoints analysis.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from explorer.core.corpus import iter_documents, separator_ids
from explorer.core.errors import ExplorerError
from explorer.core.files import atomic_write_lines
from explorer.core.jobdir import Checkpoints, JobDir, JobDirError
from explorer.core.jobs import Job, JobContext
from explorer.core.requests import build_request
from explorer.core.results import Result, array
from explorer.training.bias import EVAL_TEMPLATES, load_minimal_pairs, load_occupations, load_templates, score_bias
from explorer.training.swap import SwapAudit, audit_swap, swap_text

if TYPE_CHECKING:
    from explorer.core.session import ModelSession

ARMS = ("control", "swapped")
# The numbers in every metrics.jsonl line besides step/tokens/time, in chart order.
METRIC_KEYS = ("loss", "train_loss", "pronoun_preference", "pronoun_preference_se",
               "stereotype_alignment", "stereotype_alignment_se", "minimal_pairs", "minimal_pairs_se")
_ROW_KEYS = ("step",) + METRIC_KEYS + ("tokens_seen", "seconds", "eval_seconds")
_RESUMABLE = {"steps", "checkpoint_every", "device"}  # settings a resumed run may change
SEPARATOR = "\n\n"


class InterventionError(ExplorerError):
    """Bad settings, a corpus too small, or a run directory that does not match; says what to do."""


@dataclass(frozen=True)
class InterventionConfig:
    """Settings of an intervention run. The defaults are the demo: SmolLM2 on the news corpus,
    sized to finish on a 2-core CPU in under ten minutes."""

    corpus: str | None = None          # None: the default news corpus
    text_mode: str = "lines"           # for text corpora: one document per line or per paragraph
    text_field: str = "text"           # for JSONL / parquet / datasets corpora
    max_documents: int | None = None   # read at most this many documents
    direction: str = "m2f"             # the swapped arm's swap (m2f: masculine → feminine)
    steps: int = 40
    batch_size: int = 8
    seq_len: int = 64
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup: int = 5
    grad_clip: float = 1.0
    train: str = "last:4"              # "all" or "last:N"
    eval_every: int = 10
    checkpoint_every: int = 20
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"                # auto | float32 | bfloat16 (bfloat16 = autocast, float32 weights)
    eval_templates: int | None = EVAL_TEMPLATES  # templates per evaluation (None: all)
    eval_pairs: int | None = None      # minimal pairs per evaluation (None: all)
    heldout_documents: int = 20
    heldout_windows: int = 16
    prefix: str = "bos"                # context token of the probes (see explorer.training.bias)

    def check(self) -> None:
        """Raise InterventionError naming the first bad setting."""
        positive = ("steps", "batch_size", "eval_every", "checkpoint_every", "heldout_documents",
                    "heldout_windows")
        for name in positive:
            if getattr(self, name) < 1:
                raise InterventionError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise InterventionError(f"seq_len must be at least 2 tokens, got {self.seq_len}")
        if not self.lr > 0:
            raise InterventionError(f"the learning rate must be positive, got {self.lr}")
        if self.weight_decay < 0 or self.warmup < 0 or self.grad_clip < 0:
            raise InterventionError("weight_decay, warmup and grad_clip cannot be negative")
        if self.direction not in ("m2f", "f2m"):
            raise InterventionError(f"direction must be m2f or f2m, got {self.direction!r}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise InterventionError(f"dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
        for name in ("eval_templates", "eval_pairs", "max_documents"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InterventionError(f"{name} must be at least 1 (or None for all), got {value}")
        parse_train(self.train)

    def lr_at(self, step: int) -> float:
        """Learning rate of (1-based) step ``step``: linear warm-up, then constant."""
        if self.warmup and step <= self.warmup:
            return self.lr * step / self.warmup
        return self.lr


def parse_train(spec: str) -> int | None:
    """``"all"`` → None; ``"last:N"`` → N. Anything else is an InterventionError."""
    if spec == "all":
        return None
    if spec.startswith("last:") and spec[5:].isdigit() and int(spec[5:]) >= 1:
        return int(spec[5:])
    raise InterventionError(f"--train must be 'all' or 'last:N' with N ≥ 1, got {spec!r}")


# ---------------------------------------------------------------------------------- data
@dataclass(frozen=True, eq=False)
class Streams:
    """The two arms' token streams (same documents, same order) and the held-out windows."""

    seq_len: int
    control: np.ndarray          # [n_control] int64
    swapped: np.ndarray          # [n_swapped] int64
    doc_order: np.ndarray        # [D] the corpus index of each training document, in stream order
    control_offsets: np.ndarray  # [D+1] where each document starts in the control stream
    swapped_offsets: np.ndarray  # [D+1] ... and in the swapped stream
    heldout: np.ndarray          # [H, seq_len] int64, unswapped held-out documents
    audit: SwapAudit
    fingerprint: str

    @property
    def n_windows(self) -> int:
        return min(len(self.control), len(self.swapped)) // self.seq_len

    def stream(self, arm: str) -> np.ndarray:
        return self.control if arm == "control" else self.swapped

    def document_tokens(self, arm: str, i: int) -> np.ndarray:
        """The tokens of the i-th training document (with its separator) in one arm's stream."""
        off = self.control_offsets if arm == "control" else self.swapped_offsets
        return self.stream(arm)[off[i]:off[i + 1]]

    def window_indices(self, step: int, batch_size: int) -> np.ndarray:
        """Windows of (1-based) ``step``: the same for both arms."""
        start = (step - 1) * batch_size
        return (start + np.arange(batch_size)) % self.n_windows

    def batch(self, arm: str, step: int, batch_size: int) -> np.ndarray:
        """[batch_size, seq_len] token ids of one arm at ``step``."""
        s, t = self.stream(arm), self.seq_len
        return np.stack([s[i * t:(i + 1) * t] for i in self.window_indices(step, batch_size)])


def corpus_documents(config: InterventionConfig) -> list[str]:
    """The corpus's documents (the default news corpus when ``config.corpus`` is None)."""
    if config.corpus is None:
        from explorer.core.defaults import ensure_default_corpus

        path = ensure_default_corpus(progress=lambda *_: None)
    else:
        path = Path(config.corpus).expanduser()
    docs = []
    for doc in iter_documents(path, text_field=config.text_field, text_mode=config.text_mode):
        docs.append(doc)
        if config.max_documents is not None and len(docs) >= config.max_documents:
            break
    return docs


def build_streams(tokenizer, config: InterventionConfig, documents: list[str] | None = None) -> Streams:
    """Tokenise the corpus once into both arms' streams (see the module docstring)."""
    docs = corpus_documents(config) if documents is None else list(documents)
    if len(docs) <= config.heldout_documents:
        raise InterventionError(f"the corpus has {len(docs)} documents, not more than the "
                                f"{config.heldout_documents} held out; use a larger corpus or fewer held out")
    order = np.random.default_rng(config.seed).permutation(len(docs))
    held, train = order[:config.heldout_documents], order[config.heldout_documents:]
    sep = separator_ids(tokenizer, SEPARATOR)
    encode = lambda text: list(tokenizer(text, add_special_tokens=False).input_ids)  # noqa: E731
    control: list[int] = []
    swapped: list[int] = []
    c_off, s_off = [0], [0]
    n_before = n_after = 0
    for i in train:
        c_ids = encode(docs[i])
        s_ids = encode(swap_text(docs[i], config.direction))  # swap the text, then tokenise it
        n_before, n_after = n_before + len(c_ids), n_after + len(s_ids)
        control += c_ids + sep
        swapped += s_ids + sep
        c_off.append(len(control))
        s_off.append(len(swapped))
    t = config.seq_len
    if min(len(control), len(swapped)) < t:
        raise InterventionError(f"the training documents have {len(control)} tokens, fewer than one "
                                f"{t}-token window; use a larger corpus or a shorter seq_len")
    held_ids: list[int] = []
    for i in held:
        held_ids += encode(docs[i]) + sep
    n_held = min(config.heldout_windows, len(held_ids) // t)
    if n_held < 1:
        raise InterventionError(f"the {len(held)} held-out documents have {len(held_ids)} tokens, "
                                f"fewer than one {t}-token window; hold out more documents")
    heldout = np.asarray(held_ids[:n_held * t], dtype=np.int64).reshape(n_held, t)
    audit = replace(audit_swap((docs[i] for i in train), config.direction),
                    tokens_before=n_before, tokens_after=n_after)
    arrays = [np.asarray(a, dtype=np.int64) for a in (control, swapped)]
    h = hashlib.sha256()
    for a in arrays + [heldout]:
        h.update(a.tobytes())
    return Streams(t, arrays[0], arrays[1], train.astype(np.int64), np.asarray(c_off, np.int64),
                   np.asarray(s_off, np.int64), heldout, audit, h.hexdigest()[:16])


def corpus_audit(tokenizer, config: InterventionConfig | None = None) -> SwapAudit:
    """What the swapped arm's swap changes in the training documents (before a run starts)."""
    return build_streams(tokenizer, config or InterventionConfig()).audit


# ------------------------------------------------------------------------------ results
@dataclass(frozen=True, eq=False)
class ArmMetrics(Result):
    """One arm's curves: a row per evaluation (``step`` …) and the training loss of every step."""

    arm: str
    step: np.ndarray = array("E", "int64")            # one value per evaluation
    loss: np.ndarray = array("E", "float64")          # held-out loss (nats/token)
    train_loss: np.ndarray = array("E", "float64")    # mean training loss since the previous evaluation
    pronoun_preference: np.ndarray = array("E", "float64")
    pronoun_preference_se: np.ndarray = array("E", "float64")
    stereotype_alignment: np.ndarray = array("E", "float64")
    stereotype_alignment_se: np.ndarray = array("E", "float64")
    minimal_pairs: np.ndarray = array("E", "float64")
    minimal_pairs_se: np.ndarray = array("E", "float64")
    tokens_seen: np.ndarray = array("E", "int64")
    seconds: np.ndarray = array("E", "float64")       # run time at the evaluation
    eval_seconds: np.ndarray = array("E", "float64")  # time the evaluation took
    train_steps: np.ndarray = array("S", "int64")     # one value per training step
    train_losses: np.ndarray = array("S", "float64")
    checkpoints: tuple[str, ...]          # checkpoint directories, oldest first

    @classmethod
    def from_rows(cls, arm: str, rows: list[dict], steps: list[dict],
                  checkpoints: tuple[str, ...] = ()) -> ArmMetrics:
        def col(key, dtype):
            return np.array([math.nan if r.get(key) is None else r[key] for r in rows], dtype=dtype)

        return cls(
            arm=arm, step=col("step", np.int64), tokens_seen=col("tokens_seen", np.int64),
            **{k: col(k, np.float64) for k in METRIC_KEYS + ("seconds", "eval_seconds")},
            train_steps=np.array([r["step"] for r in steps], dtype=np.int64),
            train_losses=np.array([r["train_loss"] for r in steps], dtype=np.float64),
            checkpoints=tuple(checkpoints),
        )

    def last(self, key: str) -> float:
        values = getattr(self, key)
        return float(values[-1]) if len(values) else math.nan



@dataclass(frozen=True, eq=False)
class InterventionResult(Result):
    """A run (finished, cancelled or in progress): settings, swap audit and both arms' curves."""

    out_dir: str
    model: str
    config: InterventionConfig
    status: str                 # running | done | cancelled | failed
    step: int                   # steps both arms have finished
    control: ArmMetrics
    swapped: ArmMetrics
    audit: SwapAudit
    n_windows: int
    device: str
    error: str = ""

    @property
    def total_steps(self) -> int:
        return self.config.steps

    def arm(self, name: str) -> ArmMetrics:
        if name not in ARMS:
            raise InterventionError(f"no arm '{name}' (arms: {', '.join(ARMS)})")
        return self.control if name == "control" else self.swapped

    def effect(self, metric: str = "pronoun_preference") -> dict[str, float]:
        """Swapped − control at the last evaluation both arms have, with SE sqrt(se_c² + se_s²).

        For the pronoun preference a negative difference means the swapped arm moved toward " she";
        ``z`` is the difference in standard errors. Metrics without an SE report NaN for it.
        """
        n = min(len(self.control.step), len(self.swapped.step))
        if n == 0:
            return {"step": -1, "control": math.nan, "swapped": math.nan, "difference": math.nan,
                    "se": math.nan, "z": math.nan}
        c, s = float(getattr(self.control, metric)[n - 1]), float(getattr(self.swapped, metric)[n - 1])
        se_key = f"{metric}_se"
        se = (math.hypot(float(getattr(self.control, se_key)[n - 1]), float(getattr(self.swapped, se_key)[n - 1]))
              if hasattr(self.control, se_key) else math.nan)
        diff = s - c
        return {"step": int(self.control.step[n - 1]), "control": c, "swapped": s, "difference": diff,
                "se": se, "z": diff / se if se and not math.isnan(se) else math.nan}



# ---------------------------------------------------------------------------- the arms
def select_trainable(model, blocks_path: str, final_norm_path: str, spec: str) -> list[tuple[str, torch.nn.Parameter]]:
    """Mark the parameters ``spec`` trains as requiring grad (all others frozen) and return them."""
    last = parse_train(spec)
    for p in model.parameters():
        p.requires_grad_(False)
    if last is None:
        chosen = list(model.named_parameters())
    else:
        blocks = model.get_submodule(blocks_path)
        if last > len(blocks):
            raise InterventionError(f"--train last:{last} but the model has {len(blocks)} blocks")
        prefixes = [f"{blocks_path}.{i}." for i in range(len(blocks) - last, len(blocks))] + [f"{final_norm_path}."]
        chosen = [(n, p) for n, p in model.named_parameters() if n.startswith(tuple(prefixes))]
    for _, p in chosen:
        p.requires_grad_(True)
    return chosen


class _Arm:
    """One arm: its model copy, optimizer, RNG state and open metric files."""

    def __init__(self, name: str, model, config: InterventionConfig, adapter, store: Checkpoints) -> None:
        self.name, self.model, self.config = name, model, config
        self.store = store                       # <out>/<arm>/checkpoints
        self.dir = store.root.parent
        store.root.mkdir(parents=True, exist_ok=True)
        named = select_trainable(model, adapter.blocks, adapter.final_norm, config.train)
        self.params = [p for _, p in named]
        decay = [p for p in self.params if p.dim() >= 2]
        no_decay = [p for p in self.params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": config.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr)
        self.device = next(model.parameters()).device
        gen = torch.Generator().manual_seed(config.seed)
        self.rng = gen.get_state()
        self.cuda_rng = self._seeded_cuda_rng(config.seed)
        self.rows: list[dict] = []
        self.steps: list[dict] = []
        self.checkpoints: list[str] = []

    def _seeded_cuda_rng(self, seed: int) -> torch.Tensor | None:
        if self.device.type != "cuda":
            return None
        saved = torch.cuda.get_rng_state(self.device)
        torch.cuda.manual_seed(seed)
        state = torch.cuda.get_rng_state(self.device)
        torch.cuda.set_rng_state(saved, self.device)
        return state

    def train_step(self, ids: torch.Tensor, lr: float, autocast) -> float:
        """One optimizer step on a batch, under this arm's own RNG state."""
        cpu_saved = torch.get_rng_state()
        cuda_saved = torch.cuda.get_rng_state(self.device) if self.cuda_rng is not None else None
        torch.set_rng_state(self.rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state(self.cuda_rng, self.device)
        try:
            self.model.train()
            with autocast():
                loss = self.model(input_ids=ids, labels=ids).loss
            loss.backward()
            if self.config.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        finally:
            self.rng = torch.get_rng_state()
            torch.set_rng_state(cpu_saved)
            if self.cuda_rng is not None:
                self.cuda_rng = torch.cuda.get_rng_state(self.device)
                torch.cuda.set_rng_state(cuda_saved, self.device)
        return float(loss.detach())

    # ----------------------------------------------------------------- checkpoints
    def trainer_state(self) -> dict[str, torch.Tensor]:
        """Optimizer moments and RNG states as a flat dict of tensors (no pickled objects)."""
        out = {"rng_cpu": self.rng.clone()}
        if self.cuda_rng is not None:
            out["rng_cuda"] = self.cuda_rng.clone()
        for index, state in self.optimizer.state_dict()["state"].items():
            for key, value in state.items():
                out[f"opt.{index}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
        return out

    def load_trainer_state(self, path: Path) -> None:
        flat = torch.load(path, map_location="cpu", weights_only=True)
        self.rng = flat["rng_cpu"]
        if self.cuda_rng is not None and "rng_cuda" in flat:
            self.cuda_rng = flat["rng_cuda"]
        state: dict[int, dict[str, torch.Tensor]] = {}
        for name, value in flat.items():
            if name.startswith("opt."):
                _, index, key = name.split(".", 2)
                state.setdefault(int(index), {})[key] = value
        sd = self.optimizer.state_dict()
        sd["state"] = state
        self.optimizer.load_state_dict(sd)

    def save_checkpoint(self, step: int, tokenizer, extra: dict) -> Path:
        """Write the model directory and trainer state atomically; return the checkpoint's path."""
        final = self.store.path(step)
        if final.exists():
            return final
        with self.store.new(step) as tmp:        # seen under its name only once complete
            self.model.save_pretrained(tmp)      # safetensors
            tokenizer.save_pretrained(tmp)       # so the checkpoint loads like any model directory
            torch.save(self.trainer_state(), tmp / "trainer_state.pt")
            (tmp / "state.json").write_text(json.dumps({"step": step, "arm": self.name, **extra},
                                                       indent=1, allow_nan=False), encoding="utf-8")
        self.checkpoints.append(str(final))
        return final


# ----------------------------------------------------------------------------- files

def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _append_line(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({k: _jsonable(v) for k, v in row.items()}, allow_nan=False) + "\n")
        f.flush()


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSONL file (a torn last line, from a kill mid-write, is skipped)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def checkpoint_dirs(arm_dir: Path) -> list[Path]:
    """Complete checkpoints of an arm, oldest first."""
    return [p for _, p in Checkpoints(Path(arm_dir) / "checkpoints").list()]


def config_from_dict(data: dict) -> InterventionConfig:
    names = {f.name for f in fields(InterventionConfig)}
    return InterventionConfig(**{k: v for k, v in data.items() if k in names})


# ------------------------------------------------------------------------------ loading
def _load_model(path: str | Path, device: str):
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, local_files_only=True)
    except (OSError, ValueError) as e:
        raise InterventionError(f"cannot load the model at {path}: {str(e).splitlines()[0]}") from None
    model.config.use_cache = False
    return model.to(device)


def _starting_point(model_or_session, device: str):
    """(model in float32 on ``device``, tokenizer, name, path) from a ModelSession or a model argument."""
    from explorer.core.session import ModelSession, resolve_model

    if isinstance(model_or_session, ModelSession):
        session = model_or_session
        with session.lock:
            model = copy.deepcopy(session.hf)
        model.config.use_cache = False
        return model.float().to(device), session.tokenizer, session.name, session.path
    from transformers import AutoTokenizer

    name, path = resolve_model(None if model_or_session is None else str(model_or_session))
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return _load_model(path, device), tokenizer, name, path


def _autocast(device: torch.device, dtype: str):
    use_bf16 = dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda")
    if not use_bf16:
        return lambda: torch.autocast(device.type, enabled=False)
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


# ---------------------------------------------------------------------------- evaluation
@dataclass(frozen=True)
class _ProbeSet:
    templates: tuple[str, ...]
    occupations: Any
    pairs: Any


def _probe_set(config: InterventionConfig) -> _ProbeSet:
    templates = load_templates()
    if config.eval_templates is not None:
        templates = templates[:config.eval_templates]
    return _ProbeSet(templates, load_occupations(), load_minimal_pairs().head(config.eval_pairs))


def heldout_loss(model, windows: np.ndarray, batch_size: int, autocast) -> float:
    """Mean next-token loss over the held-out windows (every window has the same token count)."""
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(windows), batch_size):
            ids = torch.as_tensor(windows[start:start + batch_size], device=device)
            with autocast():
                loss = model(input_ids=ids, labels=ids).loss
            total += float(loss) * len(ids)
            n += len(ids)
    model.train(was)
    return total / n


def evaluate(model, tokenizer, streams: Streams, probes: _ProbeSet, config: InterventionConfig,
             autocast) -> dict[str, float]:
    """Held-out loss and the three bias probes of one model (the numbers of a metrics line)."""
    t0 = time.perf_counter()
    loss = heldout_loss(model, streams.heldout, config.batch_size, autocast)
    with autocast():
        bias = score_bias(model, tokenizer, templates=probes.templates, occupations=probes.occupations,
                          pairs=probes.pairs, prefix=config.prefix)
    return {"loss": loss, **bias.summary(), "eval_seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------------- run
class _NoContext:
    cancelled = False

    def report(self, *args, **kwargs) -> None:
        pass


def _check_resumable(saved: dict, config: InterventionConfig, out: Path) -> None:
    changed = JobDir.differences(asdict(config_from_dict(saved)), asdict(config), ignore=_RESUMABLE)
    if changed:
        raise InterventionError(f"{out} holds a run with other settings ({', '.join(changed)}); "
                                "use another --out directory or the same settings")


def run_intervention(session: ModelSession | str | None = None, request: InterventionConfig | None = None,
                     /, *, ctx: JobContext | None = None, out_dir: str | Path = "intervention-run",
                     **fields: Any) -> InterventionResult:
    """Train the control and swapped arms (resuming from ``out_dir`` when it holds a run).

    ``session``: a ModelSession (its model is copied), a model directory or cached hub id, or
    None for the embedded default. The request is an ``InterventionConfig`` (its fields may be
    given as keywords). Progress goes to ``ctx.report(step, steps, partial=InterventionResult,
    message)`` after every step; when ``ctx.cancelled`` turns true the run stops after the
    current step, checkpoints both arms and returns with status ``cancelled``.

    >>> from explorer import run_intervention
    >>> run = run_intervention(session, out_dir="run", steps=1, batch_size=1, seq_len=16, train="last:1",
    ...                        max_documents=12, heldout_documents=2, heldout_windows=1,
    ...                        eval_templates=1, eval_pairs=2)
    >>> run.status, run.step, run.control.step.tolist(), len(run.swapped.checkpoints)
    ('done', 1, [0, 1], 1)
    """
    from explorer.core.adapters import adapter_for
    from explorer.core.session import ModelSession, pick_device

    if isinstance(session, ModelSession):
        session.require_local("training the swap arms")
    model_or_session = session
    config = build_request(InterventionConfig, request, fields)
    config.check()
    ctx = ctx or _NoContext()
    job = JobDir(out_dir, manifest="run.json")
    out = job.path
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(pick_device(config.device))
    saved = job.read()
    if saved is not None:
        _check_resumable(saved.get("config", {}), config, out)

    base, tokenizer, name, path = _starting_point(model_or_session, str(device))
    adapter = adapter_for(getattr(base.config, "model_type", "?"))
    streams = build_streams(tokenizer, config)
    if saved is not None and saved.get("fingerprint") != streams.fingerprint:
        raise InterventionError(f"{out} holds a run on other data (the corpus or tokenizer changed); "
                                "use another --out directory")
    autocast = _autocast(device, config.dtype)
    probes = _probe_set(config)

    # Resume from the newest step that both arms checkpointed; otherwise start fresh.
    common = None
    if saved is not None:
        both = set.intersection(*(job.checkpoints(a).steps() for a in ARMS))
        common = max(both) if both else None
    arms = []
    for arm_name in ARMS:
        model = base if arm_name == "swapped" and common is None else None
        if common is not None:
            model = _load_model(job.checkpoints(arm_name).path(common), str(device))
        elif model is None:
            model = copy.deepcopy(base)
        arms.append(_Arm(arm_name, model, config, adapter, job.checkpoints(arm_name)))
    del base
    start_step, elapsed = 0, 0.0
    for arm in arms:
        arm.store.clean()  # left by a kill during a save
        metrics_file, steps_file = arm.dir / "metrics.jsonl", arm.dir / "steps.jsonl"
        if common is None:
            for f in (metrics_file, steps_file):
                f.unlink(missing_ok=True)
            arm.store.drop(after=-1)  # checkpoints of a run that never reached a common step
            continue
        ckpt = arm.store.path(common)
        arm.load_trainer_state(ckpt / "trainer_state.pt")
        state = json.loads((ckpt / "state.json").read_text(encoding="utf-8"))
        start_step, elapsed = common, float(state.get("seconds", 0.0))
        # Lines written after the checkpoint are recomputed, so the files continue consistently.
        arm.rows = [r for r in read_jsonl(metrics_file) if r["step"] <= common]
        arm.steps = [r for r in read_jsonl(steps_file) if r["step"] <= common]
        atomic_write_lines(metrics_file, arm.rows)
        atomic_write_lines(steps_file, arm.steps)
        arm.store.drop(after=common)
        arm.checkpoints = [str(p) for _, p in arm.store.list()]

    meta = {"version": 1, "model": name, "model_path": path, "config": asdict(config),
            "fingerprint": streams.fingerprint, "n_windows": streams.n_windows,
            "n_heldout_windows": int(len(streams.heldout)), "device": str(device),
            "audit": streams.audit.to_dict(), "status": "running", "step": start_step, "error": ""}
    job.write(meta)

    def result(status: str, step: int, error: str = "") -> InterventionResult:
        metrics = [ArmMetrics.from_rows(a.name, a.rows, a.steps, tuple(a.checkpoints)) for a in arms]
        return InterventionResult(out_dir=str(out), model=name, config=config, status=status, step=step,
                                  control=metrics[0], swapped=metrics[1], audit=streams.audit,
                                  n_windows=streams.n_windows, device=str(device), error=error)

    t0 = time.perf_counter() - elapsed
    tokens_per_step = config.batch_size * config.seq_len

    def log_eval(step: int, values: list[dict]) -> None:
        for arm, vals in zip(arms, values):
            previous = arm.rows[-1]["step"] if arm.rows else -1
            since = [r["train_loss"] for r in arm.steps if previous < r["step"] <= step]
            row = {"step": step, **{k: vals.get(k) for k in METRIC_KEYS if k != "train_loss"},
                   "train_loss": float(np.mean(since)) if since else None,
                   "tokens_seen": step * tokens_per_step, "seconds": time.perf_counter() - t0,
                   "eval_seconds": vals["eval_seconds"]}
            row = {k: row[k] for k in _ROW_KEYS}
            arm.rows.append(row)
            _append_line(arm.dir / "metrics.jsonl", row)

    def checkpoint(step: int) -> None:
        for arm in arms:
            arm.save_checkpoint(step, tokenizer, {"seconds": time.perf_counter() - t0,
                                                  "tokens_seen": step * tokens_per_step})

    def finish(status: str, step: int, error: str = "") -> InterventionResult:
        job.write({**meta, "status": status, "step": step, "error": error})
        return result(status, step, error)

    step = start_step
    try:
        if step == 0 and not arms[0].rows:
            # Both arms start from the same weights: one evaluation serves both.
            values = evaluate(arms[0].model, tokenizer, streams, probes, config, autocast)
            log_eval(0, [values, values])
            ctx.report(0, config.steps, partial=result("running", 0), message="evaluated the starting model")
        while step < config.steps:
            if ctx.cancelled:
                checkpoint(step)
                return finish("cancelled", step)
            step += 1
            lr = config.lr_at(step)
            losses = []
            for arm in arms:
                ids = torch.as_tensor(streams.batch(arm.name, step, config.batch_size), device=device)
                loss = arm.train_step(ids, lr, autocast)
                losses.append(loss)
                row = {"step": step, "train_loss": loss, "lr": lr, "seconds": time.perf_counter() - t0}
                arm.steps.append(row)
                _append_line(arm.dir / "steps.jsonl", row)
            if step % config.eval_every == 0 or step == config.steps:
                log_eval(step, [evaluate(a.model, tokenizer, streams, probes, config, autocast) for a in arms])
            if step % config.checkpoint_every == 0 or step == config.steps:
                checkpoint(step)
            ctx.report(step, config.steps, partial=result("running", step),
                       message=f"step {step}/{config.steps}: train loss control {losses[0]:.3f}, "
                               f"swapped {losses[1]:.3f}")
            if ctx.cancelled and step < config.steps:
                checkpoint(step)
                return finish("cancelled", step)
    except BaseException as e:
        job.write({**meta, "status": "failed", "step": step, "error": f"{type(e).__name__}: {e}"})
        raise
    return finish("done", step)


def intervention_job(model_or_session, config: InterventionConfig, out_dir: str | Path, **job_kwargs) -> Job:
    """The run as a ``Job`` (worker thread, progress callbacks, cancel) for the app."""
    return Job(lambda ctx: run_intervention(model_or_session, config, out_dir=out_dir, ctx=ctx),
               name="intervene", **job_kwargs)


# ------------------------------------------------------------------------------ reading
def load_run(out_dir: str | Path) -> InterventionResult:
    """A run directory's state as a result (finished, cancelled or still running elsewhere)."""
    job = JobDir(out_dir, manifest="run.json")
    out = job.path
    if not job.exists():
        raise InterventionError(f"{out} is not an intervention run (no run.json)")
    try:
        meta = job.read()
        config = config_from_dict(meta["config"])
        audit = SwapAudit.from_dict(meta["audit"])
    except (JobDirError, ValueError, KeyError, TypeError) as e:
        raise InterventionError(f"{job.manifest_path} is not readable ({e})") from None
    metrics = [ArmMetrics.from_rows(a, read_jsonl(out / a / "metrics.jsonl"), read_jsonl(out / a / "steps.jsonl"),
                                    tuple(str(p) for _, p in job.checkpoints(a).list())) for a in ARMS]
    return InterventionResult(out_dir=str(out), model=meta.get("model", ""), config=config,
                              status=meta.get("status", "unknown"), step=int(meta.get("step", 0)),
                              control=metrics[0], swapped=metrics[1], audit=audit,
                              n_windows=int(meta.get("n_windows", 0)), device=meta.get("device", ""),
                              error=meta.get("error", ""))


def list_runs(root: str | Path) -> list[InterventionResult]:
    """Every run directly under ``root`` (directories with a run.json), newest first."""
    root = Path(root).expanduser()
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if (p / "run.json").is_file()]
    found.sort(key=lambda p: (p / "run.json").stat().st_mtime, reverse=True)
    return [load_run(p) for p in found]


def default_runs_dir() -> Path:
    """Where the app keeps runs: ``$EXPLORER_CACHE/runs``."""
    from explorer.core.defaults import cache_dir

    return cache_dir() / "runs"


def iter_checkpoints(out_dir: str | Path, arms: tuple[str, ...] = ARMS) -> Iterator[tuple[str, int, Path]]:
    """(arm, step, directory) of every checkpoint of a run, arm by arm, oldest first."""
    for arm in arms:
        for step, p in JobDir(out_dir).checkpoints(arm).list():
            yield arm, step, p
