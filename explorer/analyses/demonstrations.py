"""False demonstrations: the "overthinking" experiment (Halawi et al. 2023) in miniature.

A labelled task (``assets/demonstrations/<task>.json``: texts, single-token labels, a template)
gives few-shot prompts under two conditions that share every demonstration and query and
differ only in the labels shown: **correct** (each demonstration shows its true label) and
**permuted** (each shows ``labels[permutation[true]]``, a fixed derangement drawn by seed).

Definitions (all measured at the prompt's last position, the token before the query's label):

- **Accuracy** per layer, against the query's *true* label in both conditions: the label whose
  logit ``norm_f(h_l) · W_U[label]`` is largest among the label tokens (label-restricted top-1;
  only the label rows of W_U are used). ``h_l`` is the residual stream after the embeddings
  (row 0) and after each block, so the last row is the model's own output. The paper's
  *calibrated* accuracy is computed alongside (``calibrated_accuracy``).
- **Critical layer**: the first row from which the permuted-prompt accuracy stays below the
  correct-prompt accuracy by more than ``margin`` at every later row (``critical_row``).
- **False-induction score** of a head (the paper's ``cfs_lab_prime``): on a prompt, the sum of
  the head's attention from the last position to the label tokens of demonstrations of the
  query's own (true) class, minus the sum over the other classes' label tokens divided by
  (classes − 1). On permuted prompts those same-class demonstrations show the wrong label, so
  a head that copies them pushes the wrong answer. Averaged over the permuted prompts; ranked.
- **Ablation**: zero each chosen head's slice of the attention output projection's input
  (``"L.H"`` components in ``zero`` mode, as ``explorer.interventions.ablation``) at every position or at the
  last one only, and re-measure the final-layer accuracy gap (correct − permuted);
  ``gap reduction = 1 − gap_ablated / gap_clean``.

Every batch of prompts is one nnsight trace over a left-padded batch with explicit
``attention_mask`` and ``position_ids`` (each prompt keeps its own positions); only the last
position of each row is saved, plus, when attention is read, each head's attention row from
the last position (under eager attention; the weights are per query head, so GQA is handled).
"""
from __future__ import annotations

import json
import string
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nnsight
import numpy as np
import torch

from explorer.analyses.heads import eager_attention
from explorer.analyses.lens import layer_labels
from explorer.core.components import components_for, geometry
from explorer.core.defaults import ASSETS_DIR
from explorer.core.errors import ExplorerError
from explorer.core.jobs import JobContext
from explorer.core.modules import submodule
from explorer.core.requests import build_request
from explorer.core.results import Result, array, sized
from explorer.core.session import ModelSession

TASKS_DIR = ASSETS_DIR / "demonstrations"
CONDITIONS = ("correct", "permuted")
POSITIONS = ("all", "last")


class DemonstrationError(ExplorerError):
    """Bad task file or experiment settings."""


class Cancelled(ExplorerError):
    def __init__(self) -> None:
        super().__init__("the experiment was cancelled")


# ================================================================================== task
@dataclass(frozen=True)
class Task:
    """A labelled task: ``texts[i]`` has class ``classes[i]`` (an index into ``labels``)."""

    name: str
    labels: tuple[str, ...]
    template: str                  # one demonstration, with {text} and {label}
    texts: tuple[str, ...]
    classes: tuple[int, ...]
    description: str = ""

    @property
    def query_template(self) -> str:
        """The demonstration template up to (not including) the space before ``{label}``."""
        return self.template[: self.template.index(" {label}")]

    @property
    def n_classes(self) -> int:
        return len(self.labels)


def _check_template(template: str) -> None:
    fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    if fields != {"text", "label"}:
        raise DemonstrationError(
            f"the template must use exactly the fields {{text}} and {{label}}, found {sorted(fields)}")
    if " {label}" not in template or template.index("{text}") > template.index("{label}"):
        raise DemonstrationError("the template must show {text} first and then ' {label}' (with a space "
                                 "before it: the label token carries a leading space)")


def task_from_dict(data: dict) -> Task:
    """A Task from the JSON layout of ``assets/demonstrations/*.json``, checked."""
    try:
        labels = tuple(str(x) for x in data["labels"])
        template = str(data["template"])
        items = list(data["items"])
        texts = tuple(str(it["text"]) for it in items)
        names = [str(it["label"]) for it in items]
    except (KeyError, TypeError) as e:
        raise DemonstrationError(
            f"a task needs 'labels', 'template' and 'items' with 'text' and 'label' (missing {e})") from None
    if len(labels) < 2 or len(set(labels)) != len(labels):
        raise DemonstrationError(f"a task needs at least two distinct labels, got {list(labels)}")
    unknown = sorted(set(names) - set(labels))
    if unknown:
        raise DemonstrationError(f"items use labels not in the task's labels: {unknown}")
    _check_template(template)
    return Task(name=str(data.get("name", "task")), labels=labels, template=template, texts=texts,
                classes=tuple(labels.index(n) for n in names), description=str(data.get("description", "")))


def load_task(name_or_path: str = "topics") -> Task:
    """A task by name (``assets/demonstrations/<name>.json``) or by path to such a file."""
    path = Path(name_or_path)
    if not path.suffix:
        path = TASKS_DIR / f"{name_or_path}.json"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in TASKS_DIR.glob("*.json")))
        raise DemonstrationError(f"no task file {path}: pass a JSON file or one of: {known}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DemonstrationError(f"{path.name} is not valid JSON: {e}") from None
    return task_from_dict(data)


def label_token_ids(tokenizer, labels: Sequence[str]) -> np.ndarray:
    """The token id of ``' ' + label`` for each label; each must be exactly one token."""
    out = []
    for label in labels:
        ids = tokenizer(" " + label, add_special_tokens=False).input_ids
        if len(ids) != 1:
            pieces = [tokenizer.decode([i]) for i in ids]
            raise DemonstrationError(f"label {label!r} is {len(ids)} tokens with a leading space ({pieces}); "
                                     "pick labels that are single tokens")
        out.append(ids[0])
    if len(set(out)) != len(out):
        raise DemonstrationError("two labels map to the same token")
    return np.array(out, dtype=np.int64)


def derangement(n: int, seed: int) -> np.ndarray:
    """A random permutation of range(n) with no fixed point (class c is shown as perm[c])."""
    if n < 2:
        raise DemonstrationError("a derangement needs at least two classes")
    rng = np.random.default_rng([int(seed), 7])
    while True:  # rejection sampling: about 1/e of permutations are derangements
        perm = rng.permutation(n)
        if not np.any(perm == np.arange(n)):
            return perm.astype(np.int64)


# =============================================================================== prompts
@dataclass(frozen=True)
class DemoRequest:
    """Prompts to build: ``n_prompts`` queries (classes balanced), each after ``n_demos``
    demonstrations (balanced: n_demos / classes per class, shuffled), drawn with ``seed``."""

    task: str = "topics"
    n_prompts: int = 36
    n_demos: int = 9
    seed: int = 0
    batch_size: int = 12   # prompts per trace


@dataclass(frozen=True, eq=False)
class PromptSet(Result):
    """The prompts of both conditions. Index 0 of the leading axis is 'correct', 1 'permuted'."""

    task: str
    labels: tuple[str, ...] = sized("C")
    label_ids: np.ndarray = array("C", "int64")      # the tokens of ' ' + label
    permutation: np.ndarray = array("C", "int64")    # class c is shown as labels[permutation[c]] when permuted
    query_index: np.ndarray = array("N", "int64")    # the query's item in the task
    query_class: np.ndarray = array("N", "int64")    # its true class
    demo_index: np.ndarray = array("N k", "int64")   # the demonstrations' items, in prompt order
    demo_class: np.ndarray = array("N k", "int64")   # their true classes
    prompts: np.ndarray = array("2 N", "str")
    n_tokens: np.ndarray = array("2 N", "int64")
    label_positions: np.ndarray = array("2 N k", "int64")  # token index of each demonstration's label

    @property
    def n_prompts(self) -> int:
        return len(self.query_class)

    @property
    def n_classes(self) -> int:
        return len(self.labels)

    def shown_class(self, condition: int) -> np.ndarray:
        """[N, k] the class each demonstration shows in a condition."""
        return self.demo_class if condition == 0 else self.permutation[self.demo_class]


def _label_position(offsets, ids, char: int, want: int, prompt: str) -> int:
    for k, (a, b) in enumerate(offsets):
        if a <= char < b:
            if ids[k] != want:
                raise DemonstrationError(f"the label at character {char} of {prompt[:40]!r}... does not "
                                         "tokenise as its own token; change the template")
            return k
    raise DemonstrationError("a label's token was not found in the tokenised prompt")


def _render(tokenizer, task: Task, demos: Sequence[tuple[str, int]], query: str, label_ids: np.ndarray
            ) -> tuple[str, int, list[int]]:
    """(prompt, its token count, each demonstration label's token index)."""
    head, tail = task.template.split("{label}")   # head ends with the space before the label
    parts, label_chars, n = [], [], 0
    for text, shown in demos:
        before = head.format(text=text)
        label_chars.append((n + len(before), shown))  # the label's first letter
        part = before + task.labels[shown] + tail.format()
        parts.append(part)
        n += len(part)
    prompt = "".join(parts) + task.query_template.format(text=query)
    enc = tokenizer(prompt, return_offsets_mapping=True)
    ids, offsets = enc.input_ids, enc.offset_mapping
    # Byte-level BPE offsets may or may not include a token's leading space: look for the
    # token covering the label's first letter, and check it is the ' label' token.
    positions = [_label_position(offsets, ids, char, int(label_ids[shown]), prompt) for char, shown in label_chars]
    return prompt, len(ids), positions


def build_prompts(tokenizer, request: DemoRequest, task: Task | None = None) -> PromptSet:
    """Sample queries and demonstrations (seeded) and render both conditions' prompts."""
    task = task or load_task(request.task)
    C = task.n_classes
    if request.n_prompts < 1:
        raise DemonstrationError(f"the number of prompts must be at least 1, got {request.n_prompts}")
    if request.n_demos < C or request.n_demos % C:
        raise DemonstrationError(f"the number of demonstrations must be a positive multiple of the "
                                 f"{C} classes (balanced), got {request.n_demos}")
    if request.batch_size < 1:
        raise DemonstrationError(f"the batch size must be at least 1, got {request.batch_size}")
    label_ids = label_token_ids(tokenizer, task.labels)
    perm = derangement(C, request.seed)
    classes = np.array(task.classes)
    by_class = [np.flatnonzero(classes == c) for c in range(C)]
    per_class = request.n_demos // C
    need = -(-request.n_prompts // C)  # queries of the most frequent class
    for c, items in enumerate(by_class):
        if len(items) < max(need, per_class + 1):
            raise DemonstrationError(f"class {task.labels[c]!r} has {len(items)} items: too few for "
                                     f"{request.n_prompts} prompts with {request.n_demos} demonstrations")
    rng = np.random.default_rng(int(request.seed))
    picked = [rng.permutation(items) for items in by_class]
    queries = np.array([picked[i % C][i // C] for i in range(request.n_prompts)], dtype=np.int64)
    demo_index = np.empty((request.n_prompts, request.n_demos), dtype=np.int64)
    for i, q in enumerate(queries):
        chosen = np.concatenate([rng.choice(items[items != q], per_class, replace=False) for items in by_class])
        demo_index[i] = rng.permutation(chosen)
    demo_class = classes[demo_index]
    prompts = np.empty((2, request.n_prompts), dtype=object)
    n_tokens = np.empty((2, request.n_prompts), dtype=np.int64)
    positions = np.empty((2, request.n_prompts, request.n_demos), dtype=np.int64)
    for cond in range(2):
        for i, q in enumerate(queries):
            shown = demo_class[i] if cond == 0 else perm[demo_class[i]]
            demos = [(task.texts[j], int(s)) for j, s in zip(demo_index[i], shown)]
            prompts[cond, i], n_tokens[cond, i], positions[cond, i] = _render(
                tokenizer, task, demos, task.texts[q], label_ids)
    return PromptSet(task=task.name, labels=task.labels, label_ids=label_ids, permutation=perm,
                     query_index=queries, query_class=classes[queries], demo_index=demo_index,
                     demo_class=demo_class, prompts=prompts.astype(str), n_tokens=n_tokens,
                     label_positions=positions)


# ============================================================================== metrics
def label_accuracy(label_logits: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """[N, R, C] label logits, [N] classes -> [R]: share of prompts whose top label is the truth.

    Ties (exactly equal logits) go to the lowest label index, as ``argmax`` does."""
    return (label_logits.argmax(-1) == truth[:, None]).mean(0)


def calibrated_accuracy(label_logits: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """The paper's calibrated accuracy (``cal_correct_over_incorrect``): [N, R, C] -> [R].

    Probabilities normalised over the label tokens; per row and label, the threshold is the
    (C−1)/C quantile of that label's probability over the prompts; a prompt scores 1 if its
    true label's probability is above its threshold, 1/C if equal. Chance is 1/C.
    """
    z = label_logits.astype(np.float64)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    C = p.shape[-1]
    q = np.quantile(p, (C - 1) / C, axis=0)                 # [R, C]
    n = np.arange(len(truth))
    p_true = p[n, :, truth]                                  # [N, R]
    q_true = q[:, truth].T                                   # [N, R]
    return ((p_true > q_true) + (p_true == q_true) / C).mean(0)


def critical_row(correct: np.ndarray, permuted: np.ndarray, margin: float) -> int | None:
    """The first row l with correct[m] − permuted[m] > margin for every m ≥ l (None if none)."""
    below = (np.asarray(correct) - np.asarray(permuted)) > margin
    if not below[-1]:
        return None
    above = np.flatnonzero(~below)
    return int(above[-1] + 1) if len(above) else 0


def label_attention_weights(prompts: PromptSet) -> tuple[np.ndarray, np.ndarray]:
    """[N, k] 0/1 weights of each demonstration's label token: same true class as the query, other.

    "Same class" is the demonstration's true class, in both conditions: on permuted prompts
    these demonstrations show the label the query's class is permuted to."""
    same = (prompts.demo_class == prompts.query_class[:, None]).astype(np.float32)
    return same, 1.0 - same


# ================================================================================ traces
def _left_pad(seqs: Sequence[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded ids, attention mask and position ids (each row counts from its first token)."""
    width = max(s.numel() for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - s.numel():] = s
        mask[i, width - s.numel():] = 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp_min(0)


def _head_slices(session: ModelSession, heads: Sequence[str]) -> dict[int, list[slice]]:
    """Layer -> the o_proj input slices of the heads (specs 'L.H', checked against the model)."""
    comps = components_for(session, heads) if heads else ()
    bad = [c.spec for c in comps if c.kind != "head"]
    if bad:
        raise DemonstrationError(f"only heads (L.H) can be ablated here, got {', '.join(bad)}")
    d_head = geometry(session).d_head
    out: dict[int, list[slice]] = {}
    for c in comps:
        out.setdefault(c.layer, []).append(slice(c.index * d_head, (c.index + 1) * d_head))
    return out


def _trace_batch(session: ModelSession, seqs: Sequence[torch.Tensor], label_ids: torch.Tensor, *,
                 attention: bool, zero: dict[int, list[slice]], positions: str
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One trace over a padded batch: label logits [B, R, C] per row (R = 1 + layers) and, with
    ``attention``, each head's attention from the last position [B, L, H, width] (left-padded)."""
    adapter = session.adapter
    ids, mask, pos = _left_pad(seqs, session.tokenizer.pad_token_id or 0)
    dev = session.device
    blocks = session.blocks()
    resid_in = session.module(adapter.resid_in)
    rows: list = []
    pats: list = []
    with torch.no_grad(), session.lock:
        with eager_attention(session.traced_model) if attention else nullcontext():
            # No ``session`` inside the trace: a remote one ships the block's variables.
            with session.trace(input_ids=ids.to(dev), attention_mask=mask.to(dev),
                               position_ids=pos.to(dev), logits_to_keep=1):
                nnsight.save(rows)
                nnsight.save(pats)
                rows.append(resid_in.output[:, -1].save())
                for layer in range(len(blocks)):
                    block = blocks[layer]
                    if layer in zero:  # before the attention module returns: in execution order
                        x = submodule(block, adapter.attn_out).input
                        for sl in zero[layer]:
                            if positions == "last":
                                x[:, -1, sl] = 0
                            else:
                                x[:, :, sl] = 0
                    if attention:
                        pats.append(submodule(block, adapter.attn).output[1][:, :, -1].save())
                    out = block.output
                    rows.append((out[0] if isinstance(out, tuple) else out)[:, -1].save())
        out_dev = session.unembedding.device  # one device for a sharded model's layers
        stream = torch.stack([r.to(out_dev) for r in rows], dim=1)  # [B, R, d]
        logits = session.logits(stream, tokens=label_ids)          # [B, R, C]: only the label rows
        att = torch.stack([p.to(out_dev) for p in pats], dim=1).float() if attention else None  # [B, L, H, width]
    return logits.float().cpu(), None if att is None else att.cpu()


def _run_prompts(session: ModelSession, prompts: PromptSet, batch_size: int, *, attention: bool,
                 heads: Sequence[str] = (), positions: str = "all", ctx=None
                 ) -> tuple[np.ndarray, np.ndarray | None]:
    """Both conditions' prompts in batches (similar lengths together).

    Returns label logits [2, N, R, C] and, with ``attention``, the summed attention from the last
    position to same-class / other-class demonstration labels, [condition, (same, other), N, L, H]."""
    if positions not in POSITIONS:
        raise DemonstrationError(f"unknown ablation positions {positions!r}: use one of {', '.join(POSITIONS)}")
    zero = _head_slices(session, heads)
    N = prompts.n_prompts
    seqs = [session.encode(str(p)) for p in prompts.prompts.reshape(-1)]  # [2N], condition-major
    for s, n in zip(seqs, prompts.n_tokens.reshape(-1)):
        if s.numel() != n:
            raise DemonstrationError("the prompts tokenise differently from when they were built: "
                                     "rebuild them with this model's tokenizer")
    label_ids = torch.from_numpy(prompts.label_ids)
    order = np.argsort([s.numel() for s in seqs], kind="stable")
    R, C = session.n_layers + 1, prompts.n_classes
    logits = np.empty((2 * N, R, C), dtype=np.float32)
    scores = None
    if attention:
        n_heads = int(session.hf.config.num_attention_heads)
        scores = np.empty((2, 2 * N, session.n_layers, n_heads), dtype=np.float32)
        same, other = label_attention_weights(prompts)
        positions_flat = prompts.label_positions.reshape(2 * N, -1)
        same, other = np.concatenate([same, same]), np.concatenate([other, other])
    done = 0
    for start in range(0, 2 * N, batch_size):
        if ctx is not None and ctx.cancelled:
            raise Cancelled()
        idx = order[start:start + batch_size]
        out, att = _trace_batch(session, [seqs[i] for i in idx], label_ids, attention=attention,
                                zero=zero, positions=positions)
        logits[idx] = out.numpy()
        if attention:
            width = att.shape[-1]
            for b, i in enumerate(idx):
                cols = torch.from_numpy(positions_flat[i] + width - seqs[i].numel())  # undo the left pad
                at = att[b][..., cols]                                              # [L, H, k]
                scores[0, i] = (at * torch.from_numpy(same[i])).sum(-1).numpy()
                scores[1, i] = (at * torch.from_numpy(other[i])).sum(-1).numpy()
        done += len(idx)
        if ctx is not None:
            ctx.report(done, 2 * N, message="ablation" if heads else "lens")
    logits = logits.reshape(2, N, R, C)
    if attention:
        scores = scores.reshape(2, 2, N, *scores.shape[2:]).transpose(1, 0, 2, 3, 4)  # [cond, same/other, ...]
    return logits, scores


# ======================================================================== lens results
@dataclass(frozen=True, eq=False)
class DemoLensResult(Result):
    """Per-layer label logits of both conditions and the heads' attention to demonstration labels."""

    request: DemoRequest
    model: str
    prompts: PromptSet
    layer_labels: tuple[str, ...] = sized("R")      # "embed", "L0", ...
    label_logits: np.ndarray = array("2 N R C", "float32")  # norm_f(h) · W_U[label] at the last position
    attn_same: np.ndarray = array("2 N L H", "float32")     # summed attention to same-class labels
    attn_other: np.ndarray = array("2 N L H", "float32")    # summed attention to other-class labels

    def relations(self) -> str | None:
        N, C = self.prompts.n_prompts, self.prompts.n_classes
        if self.label_logits.shape[1] != N or self.label_logits.shape[3] != C:
            return f"label_logits has shape {self.label_logits.shape} for {N} prompts of {C} classes"
        if self.attn_same.shape[2] != len(self.layer_labels) - 1:
            return f"attn_same has {self.attn_same.shape[2]} layers, the lens {len(self.layer_labels) - 1}"
        return None

    @property
    def accuracy(self) -> np.ndarray:
        """[2, R] label-restricted top-1 accuracy against the true labels (correct, permuted)."""
        truth = self.prompts.query_class
        return np.stack([label_accuracy(self.label_logits[c], truth) for c in range(2)])

    @property
    def calibrated(self) -> np.ndarray:
        """[2, R] the paper's calibrated accuracy against the true labels."""
        truth = self.prompts.query_class
        return np.stack([calibrated_accuracy(self.label_logits[c], truth) for c in range(2)])

    @property
    def follows_demonstrations(self) -> np.ndarray:
        """[R] share of permuted prompts whose top label is the permuted one (the shown mapping)."""
        return label_accuracy(self.label_logits[1], self.prompts.permutation[self.prompts.query_class])

    @property
    def gap(self) -> np.ndarray:
        """[R] correct- minus permuted-prompt accuracy."""
        acc = self.accuracy
        return acc[0] - acc[1]

    def critical_row(self, margin: float = 0.1, metric: str = "accuracy") -> int | None:
        """The critical layer as a row index into ``layer_labels`` (see ``critical_row``)."""
        acc = {"accuracy": self.accuracy, "calibrated": self.calibrated}[metric]
        return critical_row(acc[0], acc[1], margin)

    def critical_layer(self, margin: float = 0.1, metric: str = "accuracy") -> str | None:
        row = self.critical_row(margin, metric)
        return None if row is None else self.layer_labels[row]

    def head_scores(self, condition: int = 1) -> np.ndarray:
        """[L, H] false-induction score (same − other / (C − 1)), mean over a condition's prompts."""
        C = self.prompts.n_classes
        return (self.attn_same[condition] - self.attn_other[condition] / (C - 1)).mean(0)

    def top_heads(self, k: int = 10, condition: int = 1) -> list[tuple[int, int, float]]:
        """The k heads with the largest false-induction score: [(layer, head, score)]."""
        s = self.head_scores(condition)
        flat = s.ravel()
        order = np.argsort(-flat, kind="stable")[:k]
        return [(int(i // s.shape[1]), int(i % s.shape[1]), float(flat[i])) for i in order]


def demonstration_lens(session: ModelSession, request: DemoRequest | str | None = None, /, *,
                       ctx: JobContext | None = None, task: Task | None = None,
                       **fields: Any) -> DemoLensResult:
    """Per-layer label logits and label attention of both conditions (cached per request).

    A string request names the task; ``task`` gives one in memory instead (not cached).

    >>> from explorer import demonstration_lens
    >>> lens = demonstration_lens(session, "topics", n_prompts=3, n_demos=3)
    >>> lens.accuracy.shape                  # (correct, permuted) × (embeddings + 30 layers)
    (2, 31)
    """
    request = build_request(DemoRequest, request, fields)

    def compute() -> DemoLensResult:
        prompts = build_prompts(session.tokenizer, request, task)
        logits, scores = _run_prompts(session, prompts, request.batch_size, attention=True, ctx=ctx)
        return DemoLensResult(request=request, model=session.name, prompts=prompts,
                              layer_labels=layer_labels(session.n_layers), label_logits=logits,
                              attn_same=scores[:, 0], attn_other=scores[:, 1])

    if task is not None:
        return compute()  # an in-memory task is not part of the request: not cached
    return session.cached(("demo-lens", request), compute)


def ablated_label_logits(session: ModelSession, prompts: PromptSet, heads: Sequence[str],
                         positions: str = "all", batch_size: int = 12, ctx=None) -> np.ndarray:
    """Final-layer label logits [2, N, C] of both conditions with ``heads`` ('L.H') zeroed."""
    if not heads:
        raise DemonstrationError("no heads given to ablate")
    logits, _ = _run_prompts(session, prompts, batch_size, attention=False, heads=heads,
                             positions=positions, ctx=ctx)
    return logits[:, :, -1]


# ==================================================================== the experiment
@dataclass(frozen=True)
class OverthinkingRequest:
    """The whole experiment: lens of both conditions, head ranking, ablation of the top
    ``n_ablate`` heads vs ``n_random`` draws of as many random other heads (seeded)."""

    demo: DemoRequest = DemoRequest()
    margin: float = 0.1          # critical layer: gap above this from there on
    n_ablate: int = 5
    n_random: int = 3
    positions: str = "all"       # zero the heads at every position, or at the last one only
    seed: int = 0                # random heads


@dataclass(frozen=True, eq=False)
class OverthinkingResult(Result):
    """The lens, the top candidates, and final-layer label logits after each ablation."""

    request: OverthinkingRequest
    model: str
    lens: DemoLensResult
    top_heads: np.ndarray = array("k", "str")             # 'L.H', best first
    random_heads: np.ndarray = array("D k", "str")
    ablated_top: np.ndarray = array("2 N C", "float32")     # final-layer label logits, top heads zeroed
    ablated_random: np.ndarray = array("D 2 N C", "float32")  # each random draw zeroed

    def relations(self) -> str | None:
        N, C = self.lens.prompts.n_prompts, self.lens.prompts.n_classes
        if self.ablated_top.shape[1:] != (N, C):
            return f"ablated_top has shape {self.ablated_top.shape}, expected {(2, N, C)}"
        return None

    def _final(self, logits: np.ndarray) -> np.ndarray:
        """[2, N, C] -> [2] final-layer accuracy (correct, permuted)."""
        truth = self.lens.prompts.query_class
        return np.array([label_accuracy(logits[c][:, None], truth)[0] for c in range(2)])

    @property
    def clean_accuracy(self) -> np.ndarray:
        """[2] final-layer accuracy without ablation (correct, permuted)."""
        return self.lens.accuracy[:, -1]

    @property
    def top_accuracy(self) -> np.ndarray:
        """[2] final-layer accuracy with the top candidates zeroed."""
        return self._final(self.ablated_top)

    @property
    def random_accuracy(self) -> np.ndarray:
        """[D, 2] final-layer accuracy with each random draw zeroed."""
        return np.stack([self._final(x) for x in self.ablated_random]) if len(self.ablated_random) else np.empty((0, 2))

    @property
    def clean_gap(self) -> float:
        a = self.clean_accuracy
        return float(a[0] - a[1])

    @property
    def top_gap(self) -> float:
        a = self.top_accuracy
        return float(a[0] - a[1])

    @property
    def random_gaps(self) -> np.ndarray:
        """[D] the gap after each random draw."""
        a = self.random_accuracy
        return a[:, 0] - a[:, 1]

    def gap_reduction(self, gap: float | np.ndarray) -> float | np.ndarray:
        """1 − gap / clean gap: the share of the clean gap an ablation closed (NaN if it is 0)."""
        g = np.asarray(gap, dtype=float)
        out = 1 - g / self.clean_gap if self.clean_gap else np.full_like(g, np.nan)
        return float(out) if out.ndim == 0 else out

    def critical_layer(self) -> str | None:
        return self.lens.critical_layer(self.request.margin)


def random_head_sets(n_layers: int, n_heads: int, exclude: Sequence[str], k: int, draws: int,
                     seed: int) -> np.ndarray:
    """[draws, k] 'L.H' specs: each draw k distinct heads not in ``exclude`` (seeded)."""
    pool = [f"{l}.{h}" for l in range(n_layers) for h in range(n_heads) if f"{l}.{h}" not in set(exclude)]
    if k > len(pool):
        raise DemonstrationError(f"cannot draw {k} random heads from the {len(pool)} left")
    rng = np.random.default_rng([int(seed), 11])
    return np.array([[pool[i] for i in rng.choice(len(pool), k, replace=False)] for _ in range(draws)],
                    dtype=str).reshape(draws, k)


def overthinking(session: ModelSession, request: OverthinkingRequest | None = None, /, *,
                 ctx: JobContext | None = None, **fields: Any) -> OverthinkingResult:
    """Run the experiment (cached per request). ``ctx`` (a JobContext) gets progress per batch.

    >>> from explorer import DemoRequest, overthinking
    >>> result = overthinking(session, demo=DemoRequest(n_prompts=3, n_demos=3), n_ablate=2, n_random=1)
    >>> result.top_heads.shape, result.random_heads.shape   # the 2 top candidates; one random draw of 2
    ((2,), (1, 2))
    """
    request = build_request(OverthinkingRequest, request, fields)

    def compute() -> OverthinkingResult:
        if not 1 <= request.n_ablate:
            raise DemonstrationError(f"the number of heads to ablate must be at least 1, got {request.n_ablate}")
        if request.n_random < 0:
            raise DemonstrationError(f"the number of random draws cannot be negative, got {request.n_random}")
        if request.positions not in POSITIONS:
            raise DemonstrationError(f"unknown ablation positions {request.positions!r}: use one of "
                                     f"{', '.join(POSITIONS)}")
        n_heads = int(session.hf.config.num_attention_heads)
        if request.n_ablate > session.n_layers * n_heads:
            raise DemonstrationError(f"the model has only {session.n_layers * n_heads} heads")
        n = 2 * request.demo.n_prompts
        total = n * (2 + request.n_random)
        lens = demonstration_lens(session, request.demo, ctx=_Offset(ctx, 0, total))
        top = np.array([f"{l}.{h}" for l, h, _ in lens.top_heads(request.n_ablate)], dtype=str)
        rand = random_head_sets(session.n_layers, n_heads, list(top), request.n_ablate, request.n_random, request.seed)
        run = lambda heads, i: ablated_label_logits(  # noqa: E731
            session, lens.prompts, list(heads), request.positions, request.demo.batch_size,
            ctx=_Offset(ctx, n * (1 + i), total))
        ablated_top = run(top, 0)
        ablated_random = np.stack([run(r, 1 + i) for i, r in enumerate(rand)]) if len(rand) else \
            np.empty((0, 2, request.demo.n_prompts, lens.prompts.n_classes), dtype=np.float32)
        return OverthinkingResult(request=request, model=session.name, lens=lens, top_heads=top,
                                  random_heads=rand, ablated_top=ablated_top,
                                  ablated_random=ablated_random.astype(np.float32))

    return session.cached(("overthinking", request), compute)


class _Offset:
    """Progress of one stage reported as part of the whole experiment."""

    def __init__(self, ctx, offset: int, total: int) -> None:
        self.ctx, self.offset, self.total = ctx, offset, total

    @property
    def cancelled(self) -> bool:
        return self.ctx is not None and self.ctx.cancelled

    def report(self, done: int, total: int, partial=None, message: str = "") -> None:
        if self.ctx is not None:
            self.ctx.report(self.offset + done, self.total, partial=partial, message=message)
