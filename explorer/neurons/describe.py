"""Neuron descriptions: token patterns, written explanations scored by simulation, imports, search.

- **Token pattern** (instant, always available): which tokens a neuron fires on in its top
  examples (the token at each example's position), with counts and the share of the top
  examples' activation mass (sum of positive activations) each token accounts for.
- **Written explanation** (Bills et al. 2023, "Language models can explain neurons in language
  models"; the prompts here are our own): a local instruct model (default: the attached
  session's model) reads top examples as (token, activation scaled 0–10) lists and writes a short
  explanation (greedy, bounded tokens). A simulator (the same model) then predicts each token's
  activation from the explanation, one forward per example: the example's tokens are written one
  per line as ``token<TAB>unknown`` after a prompt holding the explanation, and at every TAB the
  model's next-token probabilities over the rating tokens ``"0"``..``"10"`` (those that are single
  tokens; for SmolLM2 ``"0"``..``"9"``) are renormalised and their expected value is the
  simulated activation. The score is the Pearson correlation between simulated and true
  activations pooled over every token of the scored examples: top examples not shown to the
  explainer (odd ranks; the explainer sees even ranks) and as many random examples ("top and
  random" scoring). A constant simulation (or constant truth) has no correlation: its score is
  reported as undefined (``None``), never an error. Small models write weak explanations and
  simulate poorly: their scores are low, and they are reported as they are.
- **Token-list explanation** (explainer ``"tokens"``, no language model): the explanation is the
  list of tokens on which the unit reaches at least half its maximum in the top examples shown
  (the tokens with the most activation mass first, at most ``TOKEN_LIST_MAX``), and the simulation
  predicts 10 on those tokens and 0 elsewhere. It is scored exactly as a written explanation
  (held-out top and random examples, Pearson r). It is the baseline that needs no explainer
  model: how much of a unit a list of its tokens predicts.
- **Import**: OpenAI neuron-explainer ``NeuronRecord`` JSON (``neuron_id``,
  ``most_positive_activation_records`` and ``random_sample`` lists of ``{tokens, activations}``),
  their explanation files (``NeuronSimulationResults``: ``neuron_id`` + ``scored_explanations``
  of ``{explanation, scored_simulation: {ev_correlation_score}}``; also plain
  ``{layer, neuron, explanation, score}`` objects), and CSV files of ``layer,neuron,description``
  (optional ``score`` column).
- **Search** over token patterns, written explanations and imported descriptions, by text or by
  token.

Explanations and imports are kept as JSON in the index directory (``explanations.json``,
``imported.json``), keyed by (layer, neuron, explainer).
"""
from __future__ import annotations

import csv
import json
import math
import re
import threading
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from explorer.core.errors import ExplorerError, ModelNotFoundError
from explorer.core.files import atomic_write_text
from explorer.core.jobs import JobContext
from explorer.core.requests import build_request
from explorer.core.results import Result, array
from explorer.core.session import ModelSession, resolve_model
from explorer.core.unembed import Unembedding
from explorer.neurons.index import NeuronExample, NeuronIndex


class DescribeError(ExplorerError):
    """A description, explanation or import that cannot be made or read."""


# =================================================================== token patterns
@dataclass(frozen=True, eq=False)
class TokenPattern(Result):
    """The tokens a neuron fires on in its top examples, most frequent first."""

    layer: int
    neuron: int
    n_examples: int
    tokens: np.ndarray = array("M", "str")
    counts: np.ndarray = array("M", "int64")    # top examples whose firing token it is
    mass: np.ndarray = array("M", "float64")    # share of the top examples' positive activation mass
    summary: str


def show_token(text: str) -> str:
    """A token quoted so that spaces and newlines show: ``" he"``, ``"\\n"``."""
    return json.dumps(str(text), ensure_ascii=False)


def pattern_from_firing(layer: int, neuron: int, tokens: Sequence[str], activations: Sequence[float],
                        shown: int = 4) -> TokenPattern:
    """A token pattern from the firing token and activation of each top example."""
    n = len(tokens)
    acts = np.maximum(np.asarray(activations, dtype=np.float64), 0.0)
    total = acts.sum()
    counts: Counter[str] = Counter()
    mass: dict[str, float] = {}
    first: dict[str, int] = {}
    for i, (t, a) in enumerate(zip(tokens, acts)):
        counts[t] += 1
        mass[t] = mass.get(t, 0.0) + a
        first.setdefault(t, i)
    order = sorted(counts, key=lambda t: (-counts[t], -mass[t], first[t]))
    shares = np.array([mass[t] / total if total > 0 else 0.0 for t in order], dtype=np.float64)
    cnt = np.array([counts[t] for t in order], dtype=np.int64)
    if n == 0:
        summary = "no examples"
    else:
        parts = []
        for i, t in enumerate(order[:shown]):
            share = f", {shares[i]:.0%} of top mass" if i == 0 else f", {shares[i]:.0%}"
            parts.append(f"{show_token(t)} ({cnt[i]}/{n}{share})")
        summary = "fires on " + ", ".join(parts) + ("…" if len(order) > shown else "")
    return TokenPattern(layer=layer, neuron=neuron, n_examples=n, tokens=np.array(order, dtype=str),
                        counts=cnt, mass=shares, summary=summary)


def token_pattern(index: NeuronIndex, layer: int, neuron: int, shown: int = 4) -> TokenPattern:
    """The token pattern of a neuron from the index's top examples."""
    examples = index.top_examples(layer, neuron)
    return pattern_from_firing(layer, neuron, [e.token for e in examples], [e.activation for e in examples],
                               shown)


# =================================================================== scoring
def correlation_score(simulated, true) -> float | None:
    """Pearson correlation of simulated and true activations pooled over all tokens.

    ``simulated`` and ``true`` are arrays or lists of per-example arrays. Returns None
    ("undefined") when either side is constant or there are fewer than two tokens.
    """
    s = np.concatenate([np.ravel(np.asarray(x, dtype=np.float64)) for x in simulated]) if _is_ragged(simulated) \
        else np.ravel(np.asarray(simulated, dtype=np.float64))
    t = np.concatenate([np.ravel(np.asarray(x, dtype=np.float64)) for x in true]) if _is_ragged(true) \
        else np.ravel(np.asarray(true, dtype=np.float64))
    if s.shape != t.shape:
        raise DescribeError(f"simulated ({s.size} values) and true ({t.size} values) activations differ in size")
    ok = np.isfinite(s) & np.isfinite(t)
    s, t = s[ok], t[ok]
    if s.size < 2:
        return None
    s, t = s - s.mean(), t - t.mean()
    ss, tt = math.sqrt(float((s * s).sum())), math.sqrt(float((t * t).sum()))
    scale_s = max(1.0, float(np.abs(s).max()))
    scale_t = max(1.0, float(np.abs(t).max()))
    if ss <= 1e-12 * scale_s or tt <= 1e-12 * scale_t:
        return None
    r = float((s * t).sum()) / (ss * tt)
    return float(min(1.0, max(-1.0, r))) if math.isfinite(r) else None


def _is_ragged(x) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and isinstance(x[0], (list, tuple, np.ndarray))


def scale_activations(acts: np.ndarray, max_activation: float) -> np.ndarray:
    """Bills et al.'s discretisation: floor(10 · relu(a) / max), clipped to 0..10 (ints)."""
    if not max_activation > 0:
        return np.zeros(np.shape(acts), dtype=np.int64)
    return np.clip(np.floor(10 * np.maximum(acts, 0) / max_activation), 0, 10).astype(np.int64)


# =================================================================== explainer
_EXPLAIN_SYSTEM = ("You are an interpretability researcher. A neuron inside a language model activates on some "
                   "tokens of a text. You read where it activates and say, in a few words, what it responds to.")
_SIM_SYSTEM = ("You predict how strongly a neuron in a language model activates on each token of a text, "
               "from a short description of what the neuron responds to. Activations go from 0 (none) "
               "to 10 (strongest); most tokens are 0.")
_PREFIX = "This neuron responds to"


def _shown_piece(t: str) -> str:
    return str(t).replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


def explain_prompt_text(examples: list[tuple[list[str], np.ndarray]], before: int = 24, after: int = 4) -> str:
    """The explainer's user message: excerpts, each with its tokens' 0–10 activations (non-zero ones)."""
    blocks = []
    for i, (tokens, scaled) in enumerate(examples, start=1):
        peak = int(np.argmax(scaled)) if len(scaled) else 0
        lo, hi = max(0, peak - before), min(len(tokens), peak + after + 1)
        text = "".join(_shown_piece(t) for t in tokens[lo:hi])
        pairs = [f"{show_token(_shown_piece(tokens[j]))} {int(scaled[j])}" for j in range(lo, hi) if scaled[j] > 0]
        blocks.append(f"Excerpt {i}: {text.strip()}\nActivations (token, 0-10): {', '.join(pairs) or 'none'}")
    return ("Here are excerpts of text where one neuron activates, each followed by the tokens it "
            "activates on, with activations from 0 to 10.\n\n" + "\n\n".join(blocks) +
            "\n\nIn a few words, what does this neuron respond to? Answer with one short phrase.")


def simulation_prompt_text(explanation: str) -> str:
    return (f"The neuron responds to {explanation.strip().rstrip('.')}.\n\n"
            "Below, each line is one token of a text, a tab, and the neuron's activation on that "
            "token (0-10). For example, for a neuron that responds to the word \"cat\":\n"
            "The\t0\n cat\t10\n sat\t0\n\nNow the text to rate:")


class Explainer:
    """A local causal LM that writes explanations and simulates activations.

    ``model`` is a Hugging Face causal LM (plain or nnsight-wrapped: only used outside traces),
    ``lock`` the lock that guards it (the session's, when it is the attached model).
    """

    def __init__(self, model, tokenizer, name: str, lock=None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.lock = lock if lock is not None else threading.RLock()
        self._digits: tuple[list[int], np.ndarray] | None = None
        self._unembedding: Unembedding | None = None

    @property
    def unembedding(self) -> Unembedding:
        """The explainer model's hidden states → logits (only the rating tokens' rows are read)."""
        if self._unembedding is None:
            self._unembedding = Unembedding.of(self.model, lock=self.lock)
        return self._unembedding

    # ------------------------------------------------------------------ loading
    @classmethod
    def for_session(cls, session) -> Explainer:
        return cls(session.hf, session.tokenizer, f"session:{session.name}", session.lock)

    @classmethod
    def load(cls, spec: str | Explainer | TokenListExplainer | None, session=None) -> Explainer | TokenListExplainer:
        """``None``/``"session"``: the attached session's model; ``"default"``: the embedded default;
        ``"tokens"``: the token-list explainer (no model); otherwise a local model directory or a
        hub id already in the local cache."""
        if isinstance(spec, (Explainer, TokenListExplainer)):   # already loaded
            return spec
        if spec == TokenListExplainer.name:
            return TokenListExplainer()
        if spec in (None, "", "session"):
            if session is None:
                spec = "default"
            else:
                return cls.for_session(session)
        with _LOADED_LOCK:
            if spec in _LOADED:
                return _LOADED[spec]
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if spec == "default":
            from explorer.core.defaults import DEFAULT_MODEL_NAME, ensure_default_model

            name, path = DEFAULT_MODEL_NAME, str(ensure_default_model(progress=lambda *_: None))
            if session is not None and Path(session.path or "-").resolve() == Path(path).resolve():
                return cls.for_session(session)
        else:
            name, path = _resolve_model(spec)
        try:
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
        except Exception as e:
            raise DescribeError(f"cannot load the explainer '{spec}': {str(e).splitlines()[0]}") from None
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        explainer = cls(model, tok, name)
        with _LOADED_LOCK:
            _LOADED[spec] = explainer
        return explainer

    # ------------------------------------------------------------------ prompts
    def _chat_ids(self, system: str, user: str, assistant_prefix: str = "") -> list[int]:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template([{"role": "system", "content": system},
                                            {"role": "user", "content": user}],
                                           add_generation_prompt=True, tokenize=False)
        else:
            text = f"{system}\n\n{user}\n\n"
        return list(tok(text + assistant_prefix, add_special_tokens=False).input_ids)

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def context_length(self) -> int:
        cfg = self.model.config
        for key in ("max_position_embeddings", "n_positions", "n_ctx"):
            value = getattr(cfg, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return 2048

    def fit_explain_prompt(self, examples: list[tuple[list[str], np.ndarray]], max_new_tokens: int) -> str:
        """The longest explain prompt (most examples, most context) that fits the context."""
        room = self.context_length - max_new_tokens
        for n in range(len(examples), 0, -1):
            for before in (24, 12, 6):
                text = explain_prompt_text(examples[:n], before=before)
                if len(self._chat_ids(_EXPLAIN_SYSTEM, text, _PREFIX)) <= room:
                    return text
        raise DescribeError(f"the explainer's context ({self.context_length} tokens) is too short "
                            "for even one example")

    # ------------------------------------------------------------------ explain
    def describe(self, examples: list[tuple[list[str], np.ndarray]], max_new_tokens: int = 40) -> str:
        """An explanation of the unit from its shown examples ((tokens, 0–10 activations) pairs)."""
        return self.explain(self.fit_explain_prompt(examples, max_new_tokens), max_new_tokens=max_new_tokens)

    def explain(self, user_text: str, max_new_tokens: int = 40) -> str:
        """Greedy completion of "This neuron responds to …" for the prompt; one line, stripped."""
        ids = self._chat_ids(_EXPLAIN_SYSTEM, user_text, _PREFIX)
        x = torch.tensor([ids], device=self._device())
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        with torch.no_grad(), self.lock, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = self.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                                      do_sample=False, num_beams=1, use_cache=True, pad_token_id=pad,
                                      temperature=None, top_p=None, top_k=None)
        text = tok.decode(out[0, x.shape[1]:], skip_special_tokens=True)
        return clean_explanation(text)

    # ------------------------------------------------------------------ simulate
    def rating_tokens(self) -> tuple[list[int], np.ndarray]:
        """Token ids of the ratings "0".."10" that are single tokens, and their values."""
        if self._digits is None:
            ids, values = [], []
            for v in range(11):
                t = self.tokenizer(str(v), add_special_tokens=False).input_ids
                if len(t) == 1:
                    ids.append(t[0])
                    values.append(v)
            if len(ids) < 2:
                raise DescribeError(f"the explainer '{self.name}' has no single-token digits to rate with")
            self._digits = (ids, np.array(values, dtype=np.float64))
        return self._digits

    def simulation_ids(self, explanation: str, tokens: Sequence[str]) -> list[tuple[list[int], list[int]]]:
        """The simulation prompt's ids and, per token, the position whose next-token logits rate it.

        One prompt normally; several (each with the header and the next tokens) when the
        example does not fit the explainer's context in one.
        """
        tok = self.tokenizer
        header = self._chat_ids(_SIM_SYSTEM, simulation_prompt_text(explanation))
        tab = tok("\t", add_special_tokens=False).input_ids
        rest = tok("unknown\n", add_special_tokens=False).input_ids
        limit = self.context_length
        prompts: list[tuple[list[int], list[int]]] = []
        ids, reads = list(header), []
        for t in tokens:
            line = tok(_shown_piece(t), add_special_tokens=False).input_ids + tab
            if len(ids) + len(line) + len(rest) > limit and reads:
                prompts.append((ids, reads))
                ids, reads = list(header), []
            if len(ids) + len(line) + len(rest) > limit:
                raise DescribeError(f"the explainer's context ({limit} tokens) is too short for the "
                                    "simulation prompt")
            ids += line
            reads.append(len(ids) - 1)
            ids += rest
        prompts.append((ids, reads))
        return prompts

    def simulate(self, explanation: str, examples: Sequence[Sequence[str]]) -> list[np.ndarray]:
        """Expected 0–10 activation of every token of each example (one forward per example)."""
        digit_ids, values = self.rating_tokens()
        device = self._device()
        out = []
        for tokens in examples:
            parts = []
            for ids, reads in self.simulation_ids(explanation, tokens):
                x = torch.tensor([ids], device=device)
                with torch.no_grad(), self.lock:
                    hidden = self._last_hidden(x)
                    logits = self.unembedding.logits(hidden[0, reads], tokens=digit_ids, normed=True)
                p = torch.softmax(logits, dim=-1).cpu().double().numpy()
                parts.append((p * values).sum(-1))
            out.append(np.concatenate(parts).astype(np.float32))
        return out

    def _last_hidden(self, x: torch.Tensor) -> torch.Tensor:
        """Final hidden states (after the final norm) for every position."""
        base = self.model.get_decoder() if hasattr(self.model, "get_decoder") else None
        if base is None or base is self.model:
            base = getattr(self.model, self.model.base_model_prefix)
        return base(input_ids=x, attention_mask=torch.ones_like(x)).last_hidden_state


TOKEN_LIST_MAX = 8          # tokens a token-list explanation names, at most
_TOKEN_LIST_PREFIX = "the tokens "


class TokenListExplainer:
    """The explainer ``"tokens"``: explanations that list firing tokens, simulated by matching them.

    >>> ex = TokenListExplainer()
    >>> text = ex.describe([(["a", " he", " ran"], np.array([0, 10, 2])), ([" she", "."], np.array([7, 0]))])
    >>> text
    'the tokens [" he", " she"]'
    >>> ex.simulate(text, [[" he", " went", " she"]])[0].tolist()
    [10.0, 0.0, 10.0]
    """

    name = "tokens"

    def describe(self, examples: list[tuple[list[str], np.ndarray]], max_new_tokens: int = 40) -> str:
        mass: Counter = Counter()
        for tokens, acts in examples:
            for t, a in zip(tokens, np.asarray(acts)):
                if a >= 5:         # at least half the maximum (activations are scaled 0–10)
                    mass[t] += float(a)
        chosen = [t for t, _ in sorted(mass.items(), key=lambda kv: (-kv[1], kv[0]))[:TOKEN_LIST_MAX]]
        return _TOKEN_LIST_PREFIX + json.dumps(chosen, ensure_ascii=False) if chosen else ""

    def simulate(self, explanation: str, examples: Sequence[Sequence[str]]) -> list[np.ndarray]:
        if not explanation.startswith(_TOKEN_LIST_PREFIX):
            raise DescribeError(f"not a token-list explanation: {explanation!r}")
        try:
            listed = set(json.loads(explanation[len(_TOKEN_LIST_PREFIX):]))
        except (ValueError, TypeError):
            raise DescribeError(f"a token-list explanation holds a malformed list: {explanation!r}") from None
        return [np.array([10.0 if t in listed else 0.0 for t in tokens], dtype=np.float32) for tokens in examples]


_LOADED: dict[str, Explainer] = {}
_LOADED_LOCK = threading.Lock()


def _resolve_model(spec: str) -> tuple[str, str]:
    try:
        return resolve_model(spec)
    except ModelNotFoundError as e:
        raise DescribeError(f"explainer: {e} (an instruct model works best)") from None


def clean_explanation(text: str) -> str:
    """First line of a generated explanation, without quotes, a trailing period or chat leftovers."""
    text = text.strip().split("\n")[0].strip()
    text = re.split(r"<\|", text)[0].strip()
    text = re.sub(r"\s*[(\[]?\b(?:10|\d)\b[)\]]?$", "", text)  # a copied 0-10 activation at the end
    text = text.rstrip(".,;:").strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'`":
        text = text[1:-1].strip()
    return text


# =================================================================== explanations
@dataclass(frozen=True, eq=False)
class Explanation(Result):
    """A written explanation of one neuron and its simulation score."""

    layer: int
    neuron: int
    explainer: str
    explanation: str
    score: float | None           # Pearson r, top-and-random; None = undefined
    score_note: str               # why the score is undefined, or how it was computed
    n_top: int                    # top examples scored (not shown to the explainer)
    n_random: int                 # random examples scored
    max_activation: float         # the activation that maps to 10 in the explainer's prompt
    simulated: np.ndarray = array("E W", "float32")  # expected 0-10 per token, scored examples
    true: np.ndarray = array("E W", "float32")       # true activations of those tokens
    source: str = "explained"     # "explained" or "imported"

    @property
    def score_text(self) -> str:
        return "undefined" if self.score is None else f"{self.score:.3f}"


def _example_arrays(index: NeuronIndex, session, layer: int, neuron: int,
                    examples: list[NeuronExample]) -> np.ndarray:
    """True activations [E, window] of a neuron over its examples' windows (one trace)."""
    if not examples:
        return np.zeros((0, index.window), dtype=np.float32)
    ids = torch.from_numpy(np.stack([e.token_ids for e in examples]))
    acts = index.unit_activations(session, layer, ids)   # the neurons, or the index's other units
    return acts[:, :, neuron].cpu().numpy().astype(np.float32)


def check_session(index: NeuronIndex, session) -> None:
    """The session must run the model the index was built with."""
    info = session.info()
    want = index.manifest["model"]
    if info.config_hash != want.get("config_hash") or info.name != want.get("name"):
        raise DescribeError(f"the index was built with {want.get('name')} (config {want.get('config_hash')}) "
                            f"but the attached model is {info.name} (config {info.config_hash}); "
                            "attach the index's model with --model")


@dataclass(frozen=True, eq=False)
class ExampleActivations(Result):
    """A neuron's top (or random) examples with its activation at every token of each window.

    ``token_activations`` comes from running the model on the stored token ids (``None`` when
    no model matching the index was given: then only ``activations``, the index's value at
    ``positions``, is known).
    """

    layer: int
    neuron: int
    kind: str                          # "top" or "random"
    positions: np.ndarray = array("E", "int64")      # the example's position (its max, for top examples)
    activations: np.ndarray = array("E", "float32")  # the index's activation at that position
    token_ids: np.ndarray = array("E W", "int64")
    tokens: np.ndarray = array("E W", "str")
    window_index: np.ndarray = array("E", "int64")   # the window's number in the corpus stream
    token_activations: np.ndarray | None = array("E W", "float32", default=None)

    def relations(self) -> str | None:
        if len(self.positions) and (self.positions.min() < 0 or self.positions.max() >= self.tokens.shape[1]):
            return f"positions outside the {self.tokens.shape[1]}-token windows"
        return None

    def __len__(self) -> int:
        return len(self.positions)


def _examples_result(layer: int, neuron: int, kind: str, examples: list[NeuronExample], window: int,
                     acts: np.ndarray | None) -> ExampleActivations:
    n = len(examples)
    return ExampleActivations(
        layer=layer, neuron=neuron, kind=kind,
        positions=np.array([e.position for e in examples], dtype=np.int64),
        activations=np.array([e.activation for e in examples], dtype=np.float32),
        token_ids=np.stack([e.token_ids for e in examples]).astype(np.int64) if n else np.zeros((0, window), np.int64),
        tokens=np.stack([e.tokens for e in examples]).astype(str) if n else np.zeros((0, window), dtype=str),
        window_index=np.array([e.window_index for e in examples], dtype=np.int64),
        token_activations=None if acts is None else acts.astype(np.float32))


def example_activations(index: NeuronIndex, layer: int, neuron: int,
                        session=None) -> tuple[ExampleActivations, ExampleActivations]:
    """A neuron's (top, random) examples; with ``session`` (the index's model) every token's activation.

    One trace over all the examples' windows, stopped after ``layer``.
    """
    index.check_neuron(layer, neuron)
    top = index.top_examples(layer, neuron)
    rand = index.random_examples(layer, neuron)
    top_acts = rand_acts = None
    if session is not None:
        check_session(index, session)
        acts = _example_arrays(index, session, layer, neuron, top + rand)
        top_acts, rand_acts = acts[:len(top)], acts[len(top):]
    return (_examples_result(layer, neuron, "top", top, index.window, top_acts),
            _examples_result(layer, neuron, "random", rand, index.window, rand_acts))


@dataclass(frozen=True)
class ExplainRequest:
    """Which neuron to explain, with what, and on how many examples (see ``explain_neuron``)."""

    layer: int
    neuron: int
    explainer: str | Explainer | None = None  # a model directory or cached hub id; None: the session's
    n_explain: int = 10          # top examples shown to the explainer (even ranks)
    n_score_top: int = 10        # held-out top examples simulated for the score (odd ranks)
    n_score_random: int = 10     # random examples simulated for the score
    max_new_tokens: int = 40     # the explanation's length, at most
    refresh: bool = False        # explain again even if the store holds an explanation


def explain_neuron(session: ModelSession, request: ExplainRequest | None = None, /, *,
                   ctx: JobContext | None = None, index: NeuronIndex | str | Path,
                   store: DescriptionStore | None = None, **fields: Any) -> Explanation:
    """Explain a neuron of ``index`` with a local instruct model and score the explanation by simulation.

    ``session`` runs the index's model (for the examples' true activations); the request's
    ``explainer`` writes and simulates (default: the session's own model). Cached in the index
    directory (or ``store``) by (layer, neuron, explainer) unless ``refresh``.

    >>> from explorer import build_index, explain_neuron
    >>> index = build_index(session, max_tokens=256, window=32, top_k=4, n_random=2, out_dir="index")
    >>> best = index.selective_neurons(1)          # the most selective neuron of each layer
    >>> e = explain_neuron(session, layer=3, neuron=int(best.neurons[3]), index=index,
    ...                    n_explain=2, n_score_top=1, n_score_random=1, max_new_tokens=8)
    >>> e.explainer, e.n_top, e.n_random, e.simulated.shape == e.true.shape
    ('session:SmolLM2-135M-Instruct', 1, 1, True)
    """
    session.require_local("explaining a neuron")
    request = build_request(ExplainRequest, request, fields)
    layer, neuron = request.layer, request.neuron
    n_explain, n_score_top, n_score_random = request.n_explain, request.n_score_top, request.n_score_random
    max_new_tokens, refresh, explainer = request.max_new_tokens, request.refresh, request.explainer
    if not isinstance(index, NeuronIndex):
        index = NeuronIndex.open(index)
    index.check_neuron(layer, neuron)
    explainer = Explainer.load(explainer, session)
    store = store or DescriptionStore(index.path)
    if not refresh:
        cached = store.get_explanation(layer, neuron, explainer.name)
        if cached is not None:
            return cached
    check_session(index, session)
    top = index.top_examples(layer, neuron)
    shown = top[0::2][:n_explain]
    held = top[1::2][:n_score_top]
    note = "top-and-random: held-out top examples (odd ranks) and random examples"
    if not held:  # too few examples to hold any out: score on what the explainer saw
        held = shown[:n_score_top]
        note = "top examples (all shown to the explainer: too few to hold out) and random examples"
    rand = index.random_examples(layer, neuron)[:n_score_random]
    true_shown = _example_arrays(index, session, layer, neuron, shown)
    true_scored = _example_arrays(index, session, layer, neuron, held + rand)
    max_act = float(np.max(true_shown, initial=0.0))
    empty = np.zeros((0, index.window), dtype=np.float32)
    if not shown or max_act <= 0:
        result = Explanation(layer=layer, neuron=neuron, explainer=explainer.name, explanation="", score=None,
                             score_note="undefined: the neuron is never positive in its top examples",
                             n_top=0, n_random=0, max_activation=max_act, simulated=empty, true=empty)
        store.put_explanation(result)
        return result
    scaled = [(list(e.tokens), scale_activations(t, max_act)) for e, t in zip(shown, true_shown)]
    text = explainer.describe(scaled, max_new_tokens=max_new_tokens)
    if not text:
        result = Explanation(layer=layer, neuron=neuron, explainer=explainer.name, explanation="", score=None,
                             score_note="undefined: the explainer wrote no explanation", n_top=len(held),
                             n_random=len(rand), max_activation=max_act, simulated=empty, true=true_scored)
        store.put_explanation(result)
        return result
    sims = explainer.simulate(text, [list(e.tokens) for e in held + rand])
    simulated = np.stack(sims).astype(np.float32) if sims else empty
    score = correlation_score(simulated, true_scored)
    if score is None:
        note = "undefined: the simulation (or the true activation) is constant over the scored tokens"
    result = Explanation(layer=layer, neuron=neuron, explainer=explainer.name, explanation=text, score=score,
                         score_note=note, n_top=len(held), n_random=len(rand), max_activation=max_act,
                         simulated=simulated, true=true_scored)
    store.put_explanation(result)
    return result


# =================================================================== the store
def _key(layer: int, neuron: int, source: str) -> str:
    return f"{layer}:{neuron}:{source}"


class DescriptionStore:
    """Written and imported descriptions kept as JSON in a directory (usually the index's)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        self._lock = threading.Lock()

    @property
    def explanations_file(self) -> Path:
        return self.path / "explanations.json"

    @property
    def imported_file(self) -> Path:
        return self.path / "imported.json"

    def _read(self, path: Path) -> dict:
        if not path.exists():
            return {}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise DescribeError(f"{path} is not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise DescribeError(f"{path} does not hold a JSON object")
        return data

    def _write(self, path: Path, data: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(data, ensure_ascii=False, allow_nan=False))

    # explanations (written here)
    def put_explanation(self, e: Explanation) -> None:
        with self._lock:
            data = self._read(self.explanations_file)
            data[_key(e.layer, e.neuron, e.explainer)] = e.to_dict()
            self._write(self.explanations_file, data)

    def get_explanation(self, layer: int, neuron: int, explainer: str) -> Explanation | None:
        d = self._read(self.explanations_file).get(_key(layer, neuron, explainer))
        return Explanation.from_dict(d) if d else None

    def explanations(self) -> list[Explanation]:
        return [Explanation.from_dict(d) for d in self._read(self.explanations_file).values()]

    # imported descriptions
    def imported(self) -> list[dict]:
        return list(self._read(self.imported_file).values())

    def add_imported(self, entries: list[dict]) -> int:
        with self._lock:
            data = self._read(self.imported_file)
            for e in entries:
                data[_key(e["layer"], e["neuron"], e["source"])] = e
            self._write(self.imported_file, data)
        return len(entries)

    def for_neuron(self, layer: int, neuron: int) -> list[dict]:
        """Every written and imported description of one neuron, as plain dicts."""
        out = [{"source": e.explainer, "kind": "explanation", "description": e.explanation, "score": e.score,
                "score_note": e.score_note}
               for e in self.explanations() if (e.layer, e.neuron) == (layer, neuron)]
        out += [{k: v for k, v in d.items() if k not in ("layer", "neuron")}
                for d in self.imported() if (d["layer"], d["neuron"]) == (layer, neuron)]
        return out


# =================================================================== import
def _neuron_id(obj: dict, where: str) -> tuple[int, int]:
    nid = obj.get("neuron_id")
    if isinstance(nid, dict) and "layer_index" in nid and "neuron_index" in nid:
        return int(nid["layer_index"]), int(nid["neuron_index"])
    if "layer" in obj and "neuron" in obj:
        return int(obj["layer"]), int(obj["neuron"])
    raise DescribeError(f"{where}: no neuron_id {{layer_index, neuron_index}} (or layer and neuron)")


def _records(obj: dict, key: str, where: str) -> list[dict]:
    recs = obj.get(key) or []
    if not isinstance(recs, list):
        raise DescribeError(f"{where}: '{key}' is not a list of activation records")
    out = []
    for i, r in enumerate(recs):
        if not (isinstance(r, dict) and isinstance(r.get("tokens"), list) and isinstance(r.get("activations"), list)):
            raise DescribeError(f"{where}: {key}[{i}] is not an activation record {{tokens, activations}}")
        if len(r["tokens"]) != len(r["activations"]):
            raise DescribeError(f"{where}: {key}[{i}] has {len(r['tokens'])} tokens but "
                                f"{len(r['activations'])} activations")
        out.append({"tokens": [str(t) for t in r["tokens"]],
                    "activations": [float(a) for a in r["activations"]]})
    return out


def record_entry(obj: dict, where: str, source: str) -> dict:
    """An imported description from one NeuronRecord: its token pattern, with the records kept."""
    layer, neuron = _neuron_id(obj, where)
    top = _records(obj, "most_positive_activation_records", where)
    rand = _records(obj, "random_sample", where)
    if not top:
        raise DescribeError(f"{where}: the record has no most_positive_activation_records")
    fire_tok, fire_act = [], []
    for r in top:
        if r["activations"]:
            j = int(np.argmax(r["activations"]))
            fire_tok.append(r["tokens"][j])
            fire_act.append(r["activations"][j])
    pattern = pattern_from_firing(layer, neuron, fire_tok, fire_act)
    return {"layer": layer, "neuron": neuron, "source": source, "kind": "record",
            "description": pattern.summary, "score": None, "tokens": pattern.tokens.tolist(),
            "mass": pattern.mass.tolist(), "top_records": top[:20], "random_records": rand[:20]}


def explanation_entries(obj: dict, where: str, source: str) -> list[dict]:
    """Imported explanations from a NeuronSimulationResults object (or a plain one)."""
    layer, neuron = _neuron_id(obj, where)
    out = []
    if "scored_explanations" in obj:
        items = obj["scored_explanations"]
        if not isinstance(items, list):
            raise DescribeError(f"{where}: scored_explanations is not a list")
        for i, item in enumerate(items):
            if not isinstance(item, dict) or not isinstance(item.get("explanation"), str):
                raise DescribeError(f"{where}: scored_explanations[{i}] has no explanation text")
            sim = item.get("scored_simulation") or {}
            score = sim.get("ev_correlation_score") if isinstance(sim, dict) else None
            out.append((item["explanation"], score))
    elif isinstance(obj.get("explanation"), str):
        out.append((obj["explanation"], obj.get("score")))
    else:
        raise DescribeError(f"{where}: no explanation (expected scored_explanations or explanation)")
    entries = []
    for i, (text, score) in enumerate(out):
        score = float(score) if isinstance(score, (int, float)) and math.isfinite(score) else None
        entries.append({"layer": layer, "neuron": neuron, "source": source if len(out) == 1 else f"{source}#{i}",
                        "kind": "explanation", "description": text.strip(), "score": score})
    return entries


def _json_objects(path: Path) -> list[tuple[dict, str]]:
    """The JSON objects of a .json file (one object or a list) or a .jsonl file, with locations."""
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        data = json.loads(text)
        items = data if isinstance(data, list) else [data]
        return [(o, f"{path}" + (f"[{i}]" if isinstance(data, list) else "")) for i, o in enumerate(items)]
    except json.JSONDecodeError:
        pass
    out = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((json.loads(line), f"{path}, line {n}"))
        except json.JSONDecodeError as e:
            raise DescribeError(f"{path}, line {n}: not valid JSON ({e.msg})") from None
    return out


def import_csv(path: Path, source: str) -> list[dict]:
    entries = []
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise DescribeError(f"{path} is empty")
    header = [h.strip().lower() for h in rows[0]]
    if {"layer", "neuron", "description"} <= set(header):
        cols = {name: header.index(name) for name in ("layer", "neuron", "description")}
        score_col = header.index("score") if "score" in header else None
        body, first = rows[1:], 2
    else:
        cols, score_col, body, first = {"layer": 0, "neuron": 1, "description": 2}, None, rows, 1
    for n, row in enumerate(body, start=first):
        if not any(c.strip() for c in row):
            continue
        try:
            layer, neuron = int(row[cols["layer"]]), int(row[cols["neuron"]])
            text = row[cols["description"]].strip()
        except (ValueError, IndexError):
            raise DescribeError(f"{path}, line {n}: expected layer,neuron,description "
                                "(integers, then text)") from None
        score = None
        if score_col is not None and score_col < len(row) and row[score_col].strip():
            try:
                score = float(row[score_col])
            except ValueError:
                raise DescribeError(f"{path}, line {n}: score '{row[score_col]}' is not a number") from None
        entries.append({"layer": layer, "neuron": neuron, "source": source, "kind": "csv",
                        "description": text, "score": score})
    if not entries:
        raise DescribeError(f"{path} has no descriptions")
    return entries


def import_descriptions(store_dir: str | Path, path: str | Path, kind: str = "auto",
                        source: str | None = None) -> int:
    """Import neuron records, explanations or a CSV into the store at ``store_dir``; returns the count.

    ``kind``: ``records``, ``explanations``, ``csv`` or ``auto`` (by extension and content).
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise DescribeError(f"file not found: {p}")
    files = sorted(f for f in p.rglob("*") if f.suffix in (".json", ".jsonl", ".csv")) if p.is_dir() else [p]
    if not files:
        raise DescribeError(f"{p} holds no .json, .jsonl or .csv files")
    entries: list[dict] = []
    for f in files:
        src = source or f"imported:{f.stem if not p.is_dir() else p.name}"
        k = kind
        if k == "auto" and f.suffix.lower() == ".csv":
            k = "csv"
        if k == "csv":
            entries += import_csv(f, src)
            continue
        for obj, where in _json_objects(f):
            if not isinstance(obj, dict):
                raise DescribeError(f"{where}: expected a JSON object")
            kk = k
            if kk == "auto":
                if "most_positive_activation_records" in obj:
                    kk = "records"
                elif "scored_explanations" in obj or "explanation" in obj:
                    kk = "explanations"
                else:
                    raise DescribeError(f"{where}: neither a neuron record (most_positive_activation_records) "
                                        "nor an explanation (scored_explanations)")
            if kk == "records":
                entries.append(record_entry(obj, where, src))
            elif kk == "explanations":
                entries += explanation_entries(obj, where, src)
            else:
                raise DescribeError(f"unknown import kind '{kind}' (use auto, records, explanations or csv)")
    return DescriptionStore(store_dir).add_imported(entries)


# =================================================================== search
@dataclass(frozen=True)
class SearchHit(Result):
    layer: int
    neuron: int
    source: str          # "pattern", an explainer name, or an import source
    kind: str            # "pattern", "explanation", "record", "csv"
    description: str
    score: float | None  # the explanation's score, where there is one
    relevance: float     # 0..1: matching tokens' share of top mass, or the score


def _words(query: str) -> list[str]:
    words = re.findall(r"\w+", query.lower())
    return words or [query.strip().lower()]


def _matches(text: str, words: list[str]) -> bool:
    low = text.lower()
    return all(re.search(rf"(?<!\w){re.escape(w)}(?!\w)", low) for w in words)


def _norm_token(t: str) -> str:
    return str(t).strip().lower()


def search(where: str | Path | NeuronIndex, query: str | None = None, token: str | None = None,
           limit: int = 50) -> list[SearchHit]:
    """Neurons whose descriptions match ``query`` (all its words), or that fire on ``token``.

    Token patterns come from the index (if ``where`` holds one), written explanations and imports
    from its description store. A token matches exactly, or else ignoring case and surrounding
    spaces (``he`` finds ``" he"`` and ``"He"``).
    """
    if not query and not token:
        raise DescribeError("search needs a query text or a token")
    if isinstance(where, NeuronIndex):
        index, path = where, where.path
    else:
        path = Path(where).expanduser()
        if not path.exists():
            raise DescribeError(f"no such directory: {path}")
        index = NeuronIndex.open(path) if (path / "manifest.json").exists() else None
    store = DescriptionStore(path)
    hits: list[SearchHit] = []
    words = _words(query) if query else []

    def token_ok(t: str) -> bool:
        if token is not None:
            return t == token or _norm_token(t) == _norm_token(token)
        return any(_norm_token(t) == w or _matches(t, [w]) for w in words) if words else False

    # token patterns of the index
    if index is not None:
        vocab = index.vocab()
        if token is not None:
            exact = [i for i, s in vocab.items() if s == token]
            wanted = exact or [i for i, s in vocab.items() if _norm_token(s) == _norm_token(token)]
            groups = [set(wanted)]
        else:
            groups = [{i for i, s in vocab.items() if _matches(s, [w])} for w in words]
        fire = index.firing_token_ids()                    # [rows, N, k]
        acts = np.maximum(index.arrays["top_act"], 0.0)
        valid = index.arrays["top_row"] >= 0
        if all(groups):
            mask = np.ones(fire.shape[:2], dtype=bool)
            for g in groups:
                mask &= (np.isin(fire, list(g)) & valid).any(-1)
            allowed = set().union(*groups)
            hit_mask = np.isin(fire, list(allowed)) & valid
            total = (acts * valid).sum(-1)
            share = np.where(total > 0, (acts * hit_mask).sum(-1) / np.where(total > 0, total, 1), 0.0)
            layers = index.layers                          # the model layer of each array row
            for row, neuron in zip(*np.nonzero(mask)):
                pat = token_pattern(index, layers[row], int(neuron))
                hits.append(SearchHit(layers[row], int(neuron), "pattern", "pattern", pat.summary, None,
                                      float(share[row, neuron])))
    # imported records' patterns
    for d in store.imported():
        if d.get("kind") == "record" and (token is not None or words):
            toks, mass = d.get("tokens", []), d.get("mass", [])
            matched = [i for i, t in enumerate(toks) if token_ok(t)]
            ok = bool(matched) if token is not None else all(
                any(_norm_token(toks[i]) == w or _matches(toks[i], [w]) for i in range(len(toks))) for w in words)
            if ok and matched:
                hits.append(SearchHit(d["layer"], d["neuron"], d["source"], "record", d["description"], None,
                                      float(sum(mass[i] for i in matched))))
    # written and imported descriptions (text query only)
    if query:
        for e in store.explanations():
            if e.explanation and _matches(e.explanation, words):
                hits.append(SearchHit(e.layer, e.neuron, e.explainer, "explanation", e.explanation, e.score,
                                      max(0.0, e.score or 0.0)))
        for d in store.imported():
            if d.get("kind") != "record" and _matches(d.get("description", ""), words):
                hits.append(SearchHit(d["layer"], d["neuron"], d["source"], d.get("kind", "imported"),
                                      d["description"], d.get("score"), max(0.0, d.get("score") or 0.0)))
    order = {"explanation": 0, "csv": 1, "record": 2, "pattern": 3}
    hits.sort(key=lambda h: (-h.relevance, order.get(h.kind, 4), h.layer, h.neuron))
    return hits[:limit]


def describe_neuron(index: NeuronIndex, layer: int, neuron: int) -> dict[str, Any]:
    """Everything known about a neuron's meaning: its token pattern and stored descriptions."""
    pattern = token_pattern(index, layer, neuron)
    return {"pattern": pattern.summary, "descriptions": DescriptionStore(index.path).for_neuron(layer, neuron)}
