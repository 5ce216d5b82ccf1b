"""Chart builders for saved results: each result type's captioned figures, as its live view draws them.

A builder takes (result, the snapshot's model identity) and returns [(caption, bokeh model)];
``widgets.registry`` maps each result type to its builder. Types without one get
``summary_table``, a readable table of their fields.
"""

from __future__ import annotations

import dataclasses
import html
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from bokeh.models import Div

from explorer.analyses.heads import HeadPattern, HeadScores
from explorer.analyses.lens import LensComparison, LensResult
from explorer.core.results import Result
from explorer.interventions.ablation import AblationResult, SweepResult
from explorer.interventions.patching import PatchResult
from explorer.neurons.describe import ExampleActivations, Explanation, TokenPattern
from explorer.neurons.index import NeuronHistogram, NeuronStats, PromptActivation, SelectiveNeurons
from explorer.training.bias import BiasResult, PairScores
from explorer.training.bias_datasets import BiasDatasetResult
from explorer.training.checkpoints import CheckpointComparison
from explorer.training.intervene import ArmMetrics, InterventionResult
from explorer.training.swap import SwapAudit

from . import ablation_charts as ac
from . import heads_charts as hc
from . import intervention_charts as ic
from . import neuron_charts as nc
from .chart_style import neuron_spec
from .charts import comparison_chart, describe_divergence, lens_heatmap, quote_token, shorten, target_curve

log = logging.getLogger(__name__)

Figure = tuple[str, object]  # (caption, bokeh model)
Builder = Callable[[Result, dict], list[Figure]]  # (result, the snapshot's model identity) -> figures

DEFAULT_THRESHOLD = 0.1   # lens comparisons: |Δp| marking a divergence
ROLE_THRESHOLD = 0.5      # heads: the score a role needs (the heads view's default)

FIELDS = "result-fields"  # css class (and bokeh name) of a summary table

TABLE_CSS = """
table { border-collapse: collapse; font-size: 12px; font-variant-numeric: tabular-nums; }
th, td { text-align: left; padding: 2px 12px 2px 0; vertical-align: top; }
th { color: #555; font-weight: 600; white-space: nowrap; }
tr + tr { border-top: 1px solid #eee; }
.caption { font-weight: 600; margin-bottom: 4px; }
.note { color: #666; font-size: 12px; }
"""


def div_model(text: str, css: str = TABLE_CSS, name: str | None = None, width: int | None = None) -> Div:
    """HTML as a bokeh model: the same object shows in a Panel pane and in a standalone page."""
    kwargs = {"width": width} if width else {"sizing_mode": "stretch_width"}
    return Div(text=text, stylesheets=[css], name=name, **kwargs)


# ------------------------------------------------------------------ the lens
def lens_figures(r: LensResult, model: dict) -> list[Figure]:
    last = r.n_positions - 1
    return [
        (f"Logit lens of {shorten(r.request.prompt, 80)!r}: each cell is a layer's top token at a "
         f"position, coloured by its probability.", lens_heatmap(r, "prob")),
        (f"Probability and rank of the target {quote_token(r.target)} per layer at the last position.",
         target_curve(r, last)),
    ]


def comparison_figures(c: LensComparison, model: dict) -> list[Figure]:
    return [
        (f"{describe_divergence(c, DEFAULT_THRESHOLD)} A: {shorten(c.request.prompt_a, 60)!r}; "
         f"B: {shorten(c.request.prompt_b, 60)!r}.", comparison_chart(c, DEFAULT_THRESHOLD)),
        (f"Logit lens of prompt A, {shorten(c.request.prompt_a, 60)!r}.", lens_heatmap(c.a, "prob")),
        (f"Logit lens of prompt B, {shorten(c.request.prompt_b, 60)!r}.", lens_heatmap(c.b, "prob")),
    ]


# ------------------------------------------------------------------ heads
def _kv(model: dict) -> int | None:
    value = model.get("n_kv_heads")
    return value if isinstance(value, int) and value > 0 else None


def heads_figures(r: HeadScores, model: dict) -> list[Figure]:
    kv = _kv(model)
    prompt = shorten(r.request.prompt, 60)
    return [
        (f"Induction score per head (repeated random tokens, {r.request.seq_len} ×2, seed {r.request.seed}); "
         f"letters mark roles with a score ≥ {ROLE_THRESHOLD}.",
         hc.heads_grid(r, "induction", ROLE_THRESHOLD, n_kv_heads=kv)),
        (f"Direct logit attribution of each head to {quote_token(r.target)} after {prompt!r} "
         f"(logit {r.attribution.logit:.2f}).", hc.heads_grid(r, "dla", ROLE_THRESHOLD, n_kv_heads=kv)),
        (f"Every head's scores on {prompt!r}, sorted by induction.",
         hc.heads_table(r, ROLE_THRESHOLD, kv, sort_by="induction")),
    ]


def pattern_figures(p: HeadPattern, model: dict) -> list[Figure]:
    n_heads = model.get("n_heads") if isinstance(model.get("n_heads"), int) else None
    kv = _kv(model) if n_heads else None
    name = hc.head_label(p.layer, p.head)
    return [
        (f"{name}'s attention on {shorten(p.prompt, 60)!r}: query (row) to key (column).",
         hc.pattern_figure(p, hc.head_color(0), n_heads, kv)),
        (f"{name}: each query token's lines to the key tokens it attends to.",
         hc.pattern_lines([p], n_heads, kv)),
    ]


# ------------------------------------------------------------------ ablation and patching
def ablation_figures(r: AblationResult, model: dict) -> list[Figure]:
    out: list[Figure] = [(f"Baseline vs ablated prediction of {quote_token(r.target)}.",
                          div_model(ac.ablation_card(r), ac.CARD_CSS, width=460))]
    if r.lens_baseline is not None and r.lens_ablated is not None:
        base, abl = ac.lens_pair(r)
        out += [(f"p({quote_token(r.target)}) and its rank per layer, baseline vs ablated.", ac.target_pair(r)),
                ("Logit lens without the ablation.", base),
                (f"Logit lens with {', '.join(r.components)} ablated.", abl)]
    return out


def sweep_figures(r: SweepResult, model: dict) -> list[Figure]:
    state = "" if r.complete else f" (cancelled at {r.done}/{r.total}: grey cells were not run)"
    return [(f"Effect of ablating each component on {ac.metric_name(r.target, r.compare)} after "
             f"{shorten(r.request.prompt, 60)!r}{state}.", ac.sweep_chart(r)),
            ("The largest effects.", div_model(ac.sweep_top_html(r), TABLE_CSS, width=320))]


def patch_figures(r: PatchResult, model: dict) -> list[Figure]:
    return [(f"Fraction of the gap restored by patching the clean {r.site} of {shorten(r.request.clean, 50)!r} "
             f"into {shorten(r.request.corrupt, 50)!r}, per layer and position.", ac.patch_chart(r))]


# ------------------------------------------------------------------ neurons
def overview_figures(r: SelectiveNeurons, model: dict) -> list[Figure]:
    return [(f"The {r.n_per_layer} most selective neurons of every layer over {r.tokens:,} indexed tokens.",
             nc.selectivity_overview(r))]


def histogram_figures(r: NeuronHistogram, model: dict) -> list[Figure]:
    return [(f"Activation histogram of neuron {neuron_spec(r.layer, r.neuron)} over a 1-in-{r.stride} token subsample.",
             nc.activation_histogram(r))]


def prompt_activation_figures(r: PromptActivation, model: dict) -> list[Figure]:
    return [(f"Neuron {neuron_spec(r.layer, r.neuron)}'s activation at every token of {shorten(r.prompt, 60)!r}.",
             nc.prompt_activation_chart(r))]


def examples_figures(r: ExampleActivations, model: dict) -> list[Figure]:
    what = "top-activating" if r.kind == "top" else r.kind
    return [(f"Neuron {neuron_spec(r.layer, r.neuron)}: {len(r)} {what} examples, each token shaded by its activation.",
             div_model(nc.examples_html(r), nc.EXAMPLES_CSS))]


def table_rows(pairs: Iterable[tuple[str, str]]) -> str:
    return "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in pairs)


def stats_figures(s: NeuronStats, model: dict) -> list[Figure]:
    rows = [("max", f"{s.max:.4g}"), ("mean", f"{s.mean:.3g}"), ("std", f"{s.std:.3g}"), ("min", f"{s.min:.3g}"),
            ("fires (> 0) on", f"{s.frequency:.1%} of {s.tokens:,} tokens")]
    rows += [(f"p{100 * q:g} ≈", f"{v:.3g}") for q, v in zip(s.quantile_levels, s.quantiles)]
    return [(f"Activation statistics of neuron {neuron_spec(s.layer, s.neuron)}.",
             div_model(f"<table>{table_rows(rows)}</table>", width=320))]


def pattern_text_figures(p: TokenPattern, model: dict) -> list[Figure]:
    rows = "".join(f"<tr><td>{html.escape(quote_token(t))}</td><td>{int(c)}</td><td>{float(m):.1%}</td></tr>"
                   for t, c, m in zip(p.tokens, p.counts, p.mass))
    text = (f"<div class='caption'>{html.escape(p.summary)}</div><table><tr><th>token</th>"
            f"<th>top examples</th><th>share of mass</th></tr>{rows}</table>")
    return [(f"The tokens neuron {neuron_spec(p.layer, p.neuron)} fires on in its {p.n_examples} top examples.",
             div_model(text, width=420))]


def explanation_figures(e: Explanation, model: dict) -> list[Figure]:
    rows = [("explanation", e.explanation or "(no explanation written)"), ("score", e.score_text),
            ("how", e.score_note), ("explainer", e.explainer),
            ("scored on", f"{e.n_top} top + {e.n_random} random examples"), ("source", e.source)]
    return [(f"Written explanation of neuron {neuron_spec(e.layer, e.neuron)} and its simulation score.",
             div_model(f"<table>{table_rows(rows)}</table>"))]


# ------------------------------------------------------------------ pronoun swap
def audit_figures(a: SwapAudit, model: dict) -> list[Figure]:
    return [("How often each word pair was swapped.", ic.audit_chart(a)),
            ("Token counts before → after, counts per pair and sample changes (removed / inserted).",
             div_model(ic.audit_html(a), ic.AUDIT_CSS))]


def bias_figures(b: BiasResult, model: dict) -> list[Figure]:
    s = b.summary()
    head = (f"Pronoun preference {s['pronoun_preference']:+.3f} ± {s['pronoun_preference_se']:.3f}, stereotype "
            f"alignment {s['stereotype_alignment']:+.3f} ± {s['stereotype_alignment_se']:.3f}, minimal pairs "
            f"{s['minimal_pairs']:.3f} ± {s['minimal_pairs_se']:.3f} ({len(b.templates)} templates × "
            f"{len(b.occupations)} occupations).")
    out = [(f"{head} Each occupation's pronoun preference against its share of men.", ic.bias_chart(b)),
           (f"Minimal pairs ({b.pairs.n}): each point a pair; above the diagonal the stereotyped sentence is "
            f"more likely.", ic.pairs_chart(b.pairs))]
    if b.crows is not None:
        out.append((f"CrowS-Pairs ({b.crows.n} pairs).", ic.pairs_chart(b.crows)))
    return out


def pair_figures(p: PairScores, model: dict) -> list[Figure]:
    return [(f"{p.name}: {p.n} pairs; above the diagonal the stereotyped sentence is more likely "
             f"(share {p.pct_stereotype:.3f} ± {p.se:.3f}).", ic.pairs_chart(p))]


_RUN_CAPTIONS = {
    "pronoun_preference": "Pronoun preference of both arms against step (± 1 SE band; below 0 favours ' she').",
    "stereotype_alignment": "Stereotype alignment of both arms (correlation with the share of men, ± 1 SE).",
    "minimal_pairs": "Minimal pairs: share where the stereotyped sentence is more likely (± 1 SE; 0.5 = none).",
    "loss": "Held-out loss (original text) of both arms.",
    "train_loss": "Training loss of every step, both arms.",
}


def intervention_figures(r: InterventionResult, model: dict) -> list[Figure]:
    figs = ic.run_charts(r)
    effect = ic.effect_text(r).replace("**", "")
    return [(f"{effect} Run {Path(r.out_dir).name}: {r.status}, {r.step}/{r.config.steps} steps.",
             div_model(ic.effect_table(r), ic.EFFECT_CSS, width=560))] + \
        [(_RUN_CAPTIONS[key], fig) for key, fig in figs.items()]


def arm_figures(a: ArmMetrics, model: dict) -> list[Figure]:
    return [(f"The {a.arm} arm: {_RUN_CAPTIONS[key][0].lower()}{_RUN_CAPTIONS[key][1:]}", fig)
            for key, fig in ic.run_charts(a).items()]


def checkpoint_figures(c: CheckpointComparison, model: dict) -> list[Figure]:
    out = [(f"{ic.checkpoint_metric_text(c, m)[0].capitalize()} across {len(c.labels)} checkpoints (± 1 SE).",
            ic.checkpoint_metric_chart(c, m)) for m in c.metric_names]
    if c.layer_labels:
        out.append((f"Lens probability of {quote_token(c.target)} after each layer at the end of "
                    f"{shorten(c.prompt, 60)!r}, per checkpoint.", ic.checkpoint_lens_chart(c)))
    out.append(("Every checkpoint's metrics.", div_model(ic.checkpoints_summary_html(c), ic.EFFECT_CSS)))
    return out


def bias_dataset_figures(r: BiasDatasetResult, model: dict) -> list[Figure]:
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.3f}</td></tr>" for k, v in r.extra.items()
                   if isinstance(v, (int, float)))
    table = (f"<table><tr><th>{html.escape(r.metric)}</th><td>{r.value:.3f} ± {r.se:.3f} (n = {r.n})</td></tr>"
             f"{rows}</table>")
    return [(f"{r.dataset}: {r.metric} over {r.n} items.", div_model(table, TABLE_CSS, width=420))]


# ------------------------------------------------------------------ summary tables
def _value_text(value, depth: int = 0) -> str:
    """A field's value for people: arrays by dtype, shape and range; nested results by type."""
    if isinstance(value, np.ndarray):
        text = f"{value.dtype} array {list(value.shape)}"
        if value.size and value.dtype.kind in "biuf":
            finite = value[np.isfinite(value)] if value.dtype.kind == "f" else value
            if finite.size:
                text += f", {finite.min():.4g} … {finite.max():.4g}"
        elif value.size and value.dtype.kind == "U":
            text += ": " + ", ".join(repr(str(v)) for v in value.reshape(-1)[:6]) + (" …" if value.size > 6 else "")
        return text
    if isinstance(value, Result):
        return f"{type(value).__name__} ({len(dataclasses.fields(value))} fields)"
    if dataclasses.is_dataclass(value):
        if depth:
            return type(value).__name__
        return ", ".join(f"{f.name}={_value_text(getattr(value, f.name), depth + 1)}"
                         for f in dataclasses.fields(value))
    if isinstance(value, (list, tuple)):
        shown = ", ".join(_value_text(v, depth + 1) for v in value[:8])
        return f"[{shown}{', …' if len(value) > 8 else ''}] ({len(value)})"
    if isinstance(value, str):
        return repr(shorten(value, 160)) if depth else shorten(value, 400)
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def summary_table(result: Result, note: str = "") -> Div:
    """Every field of a result in a two-column table (the fallback for types without charts)."""
    rows = table_rows((f.name, _value_text(getattr(result, f.name))) for f in dataclasses.fields(result))
    extra = f"<div class='note'>{html.escape(note)}</div>" if note else ""
    return div_model(f"{extra}<table class='{FIELDS}'>{rows}</table>", name=FIELDS)
