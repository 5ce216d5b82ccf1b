"""Figures for any saved result, and a standalone HTML page of a whole snapshot.

``figures_for(result)`` is what both the snapshot view and the HTML export draw, so a reopened
snapshot shows the same charts as the live session: ``BUILDERS`` maps each result type to the
chart builders its live view uses (``charts``, ``heads_charts``, ``ablation_charts``,
``neuron_charts``, ``intervention_charts``). Types without a builder get a readable table of
their fields, never nothing.
``GROUPS`` sorts results into the views they came from. The HTML page inlines bokeh's
resources: it opens from disk with no server and no network.
"""
from __future__ import annotations

import dataclasses
import html
import logging
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from bokeh.embed import file_html
from bokeh.layouts import column
from bokeh.models import Div
from bokeh.resources import INLINE

from explorer.interventions.ablation import AblationResult, SweepResult
from explorer.training.bias import BiasResult, PairScores
from explorer.training.checkpoints import CheckpointComparison
from explorer.analyses.demonstrations import DemoLensResult, OverthinkingResult, PromptSet
from explorer.neurons.describe import ExampleActivations, Explanation, SearchHit, TokenPattern
from explorer.analyses.heads import AttentionResult, DLAResult, HeadPattern, HeadScores
from explorer.training.intervene import ArmMetrics, InterventionResult
from explorer.analyses.lens import LensComparison, LensResult
from explorer.neurons.index import NeuronExample, NeuronHistogram, NeuronStats, PromptActivation, SelectiveNeurons
from explorer.interventions.generate import GenerateResult, Generation
from explorer.features.attribution import FeatureAttribution
from explorer.features.card import FeatureCard
from explorer.features.encode import FeatureActivations
from explorer.features.train import SAETrainResult
from explorer.interventions.patching import PatchResult
from explorer.analyses.ccs import CCSResult
from explorer.analyses.hidden import HiddenStates
from explorer.analyses.patchscope import PatchscopeResult
from explorer.analyses.probes import ProbeResult
from explorer.training.bias_datasets import BiasDatasetResult
from explorer.interventions.steering import SteeringVector, SteerResult, SteerSweepResult
from explorer.core.results import Result
from explorer.persistence.snapshot import Entry, Snapshot
from explorer.training.swap import SwapAudit

from . import ablation_charts as ac
from . import heads_charts as hc
from . import intervention_charts as ic
from . import neuron_charts as nc
from . import probe_charts as pc
from . import steering_charts as sc
from . import sae_charts as fc
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


def _div(text: str, css: str = TABLE_CSS, name: str | None = None, width: int | None = None) -> Div:
    """HTML as a bokeh model: the same object shows in a Panel pane and in a standalone page."""
    kwargs = {"width": width} if width else {"sizing_mode": "stretch_width"}
    return Div(text=text, stylesheets=[css], name=name, **kwargs)


# ------------------------------------------------------------------ the lens
def _lens_figures(r: LensResult, model: dict) -> list[Figure]:
    last = r.n_positions - 1
    return [
        (f"Logit lens of {shorten(r.request.prompt, 80)!r}: each cell is a layer's top token at a "
         f"position, coloured by its probability.", lens_heatmap(r, "prob")),
        (f"Probability and rank of the target {quote_token(r.target)} per layer at the last position.",
         target_curve(r, last)),
    ]


def _comparison_figures(c: LensComparison, model: dict) -> list[Figure]:
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


def _heads_figures(r: HeadScores, model: dict) -> list[Figure]:
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


def _pattern_figures(p: HeadPattern, model: dict) -> list[Figure]:
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
def _ablation_figures(r: AblationResult, model: dict) -> list[Figure]:
    out: list[Figure] = [(f"Baseline vs ablated prediction of {quote_token(r.target)}.",
                          _div(ac.ablation_card(r), ac.CARD_CSS, width=460))]
    if r.lens_baseline is not None and r.lens_ablated is not None:
        base, abl = ac.lens_pair(r)
        out += [(f"p({quote_token(r.target)}) and its rank per layer, baseline vs ablated.", ac.target_pair(r)),
                ("Logit lens without the ablation.", base),
                (f"Logit lens with {', '.join(r.components)} ablated.", abl)]
    return out


def _sweep_figures(r: SweepResult, model: dict) -> list[Figure]:
    state = "" if r.complete else f" (cancelled at {r.done}/{r.total}: grey cells were not run)"
    return [(f"Effect of ablating each component on {ac.metric_name(r.target, r.compare)} after "
             f"{shorten(r.request.prompt, 60)!r}{state}.", ac.sweep_chart(r)),
            ("The largest effects.", _div(ac.sweep_top_html(r), TABLE_CSS, width=320))]


def _patch_figures(r: PatchResult, model: dict) -> list[Figure]:
    return [(f"Fraction of the gap restored by patching the clean {r.site} of {shorten(r.request.clean, 50)!r} "
             f"into {shorten(r.request.corrupt, 50)!r}, per layer and position.", ac.patch_chart(r))]


# ------------------------------------------------------------------ neurons
def _overview_figures(r: SelectiveNeurons, model: dict) -> list[Figure]:
    return [(f"The {r.n_per_layer} most selective neurons of every layer over {r.tokens:,} indexed tokens.",
             nc.selectivity_overview(r))]


def _histogram_figures(r: NeuronHistogram, model: dict) -> list[Figure]:
    return [(f"Activation histogram of L{r.layer} N{r.neuron} over a 1-in-{r.stride} token subsample.",
             nc.activation_histogram(r))]


def _prompt_activation_figures(r: PromptActivation, model: dict) -> list[Figure]:
    return [(f"L{r.layer} N{r.neuron}'s activation at every token of {shorten(r.prompt, 60)!r}.",
             nc.prompt_activation_chart(r))]


def _examples_figures(r: ExampleActivations, model: dict) -> list[Figure]:
    what = "top-activating" if r.kind == "top" else r.kind
    return [(f"L{r.layer} N{r.neuron}: {len(r)} {what} examples, each token shaded by its activation.",
             _div(nc.examples_html(r), nc.EXAMPLES_CSS))]


def _rows(pairs: Iterable[tuple[str, str]]) -> str:
    return "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in pairs)


def _stats_figures(s: NeuronStats, model: dict) -> list[Figure]:
    rows = [("max", f"{s.max:.4g}"), ("mean", f"{s.mean:.3g}"), ("std", f"{s.std:.3g}"), ("min", f"{s.min:.3g}"),
            ("fires (> 0) on", f"{s.frequency:.1%} of {s.tokens:,} tokens")]
    rows += [(f"p{100 * q:g} ≈", f"{v:.3g}") for q, v in zip(s.quantile_levels, s.quantiles)]
    return [(f"Activation statistics of L{s.layer} N{s.neuron}.", _div(f"<table>{_rows(rows)}</table>",
                                                                       width=320))]


def _pattern_text_figures(p: TokenPattern, model: dict) -> list[Figure]:
    rows = "".join(f"<tr><td>{html.escape(quote_token(t))}</td><td>{int(c)}</td><td>{float(m):.1%}</td></tr>"
                   for t, c, m in zip(p.tokens, p.counts, p.mass))
    text = (f"<div class='caption'>{html.escape(p.summary)}</div><table><tr><th>token</th>"
            f"<th>top examples</th><th>share of mass</th></tr>{rows}</table>")
    return [(f"The tokens L{p.layer} N{p.neuron} fires on in its {p.n_examples} top examples.",
             _div(text, width=420))]


def _explanation_figures(e: Explanation, model: dict) -> list[Figure]:
    rows = [("explanation", e.explanation or "(no explanation written)"), ("score", e.score_text),
            ("how", e.score_note), ("explainer", e.explainer),
            ("scored on", f"{e.n_top} top + {e.n_random} random examples"), ("source", e.source)]
    return [(f"Written explanation of L{e.layer} N{e.neuron} and its simulation score.",
             _div(f"<table>{_rows(rows)}</table>"))]


# ------------------------------------------------------------------ pronoun swap
def _audit_figures(a: SwapAudit, model: dict) -> list[Figure]:
    return [("How often each word pair was swapped.", ic.audit_chart(a)),
            ("Token counts before → after, counts per pair and sample changes (removed / inserted).",
             _div(ic.audit_html(a), ic.AUDIT_CSS))]


def _bias_figures(b: BiasResult, model: dict) -> list[Figure]:
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


def _pair_figures(p: PairScores, model: dict) -> list[Figure]:
    return [(f"{p.name}: {p.n} pairs; above the diagonal the stereotyped sentence is more likely "
             f"(share {p.pct_stereotype:.3f} ± {p.se:.3f}).", ic.pairs_chart(p))]


_RUN_CAPTIONS = {
    "pronoun_preference": "Pronoun preference of both arms against step (± 1 SE band; below 0 favours ' she').",
    "stereotype_alignment": "Stereotype alignment of both arms (correlation with the share of men, ± 1 SE).",
    "minimal_pairs": "Minimal pairs: share where the stereotyped sentence is more likely (± 1 SE; 0.5 = none).",
    "loss": "Held-out loss (original text) of both arms.",
    "train_loss": "Training loss of every step, both arms.",
}


def _intervention_figures(r: InterventionResult, model: dict) -> list[Figure]:
    figs = ic.run_charts(r)
    effect = ic.effect_text(r).replace("**", "")
    return [(f"{effect} Run {Path(r.out_dir).name}: {r.status}, {r.step}/{r.config.steps} steps.",
             _div(ic.effect_table(r), ic.EFFECT_CSS, width=560))] + \
        [(_RUN_CAPTIONS[key], fig) for key, fig in figs.items()]


def _arm_figures(a: ArmMetrics, model: dict) -> list[Figure]:
    return [(f"The {a.arm} arm: {_RUN_CAPTIONS[key][0].lower()}{_RUN_CAPTIONS[key][1:]}", fig)
            for key, fig in ic.run_charts(a).items()]


def _checkpoint_figures(c: CheckpointComparison, model: dict) -> list[Figure]:
    out = [(f"{ic.checkpoint_metric_text(c, m)[0].capitalize()} across {len(c.labels)} checkpoints (± 1 SE).",
            ic.checkpoint_metric_chart(c, m)) for m in c.metric_names]
    if c.layer_labels:
        out.append((f"Lens probability of {quote_token(c.target)} after each layer at the end of "
                    f"{shorten(c.prompt, 60)!r}, per checkpoint.", ic.checkpoint_lens_chart(c)))
    out.append(("Every checkpoint's metrics.", _div(ic.checkpoints_summary_html(c), ic.EFFECT_CSS)))
    return out


def _probe_figures(r: ProbeResult, model: dict) -> list[Figure]:
    best = f"; best {r.best_label}" if r.best_label else ""
    return [(f"Held-out accuracy of a linear probe for {r.label_names[1]!r} vs {r.label_names[0]!r} per layer "
             f"(n = {r.n}, ± 1 SE; shuffled-label control and chance{best}).", pc.probe_curve(r))]


def _ccs_figures(r: CCSResult, model: dict) -> list[Figure]:
    return [(f"CCS test accuracy per layer ({r.n_test} held-out pairs), beside a supervised pair probe and "
             f"the logit lens's answer; best {r.best_label}.", pc.probe_curve(ccs=r))]


def _patchscope_figures(r: PatchscopeResult, model: dict) -> list[Figure]:
    return [("Patchscope: each block's hidden state at each source position, patched into the identity "
             "prompt; the cell is its top next token, coloured by probability.", pc.patchscope_grid(r))]


def _bias_dataset_figures(r: BiasDatasetResult, model: dict) -> list[Figure]:
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.3f}</td></tr>" for k, v in r.extra.items()
                   if isinstance(v, (int, float)))
    table = (f"<table><tr><th>{html.escape(r.metric)}</th><td>{r.value:.3f} ± {r.se:.3f} (n = {r.n})</td></tr>"
             f"{rows}</table>")
    return [(f"{r.dataset}: {r.metric} over {r.n} items.", _div(table, TABLE_CSS, width=420))]
# ------------------------------------------------------------------ generation and steering
def _generate_figures(r: GenerateResult, model: dict) -> list[Figure]:
    out = [(f"Generated after {shorten(r.request.prompt, 60)!r}: {arm.label} ({arm.stop_reason}).",
            sc.token_strip(arm)) for arm in r.arms]
    if any(arm.has_lens for arm in r.arms) and len(r.main.token_ids):
        out.append(("Rank of the first generated token per layer, in each arm.", sc.rank_chart(r, 0)))
    return out


def _arm_tokens_figures(g: Generation, model: dict) -> list[Figure]:
    return [(f"Generated tokens: {g.label} ({g.stop_reason}).", sc.token_strip(g))]


def _steer_figures(r: SteerResult, model: dict) -> list[Figure]:
    return [(f"Steering {shorten(r.request.prompt, 60)!r}.", _div(sc.apply_html(r), sc.TABLE_CSS))]


def _steer_sweep_figures(r: SteerSweepResult, model: dict) -> list[Figure]:
    out = [(f"The metric against α for {shorten(r.request.prompt, 60)!r}.", sc.sweep_chart(r))]
    if r.texts:
        out.append(("Steered continuations.", _div(sc.texts_html(r), sc.TABLE_CSS)))
    return out


def _vector_figures(v: SteeringVector, model: dict) -> list[Figure]:
    return [("A steering vector and the tokens it was read at.", _div(sc.vector_html(v), sc.TABLE_CSS))]


def _sae_run_figures(r: SAETrainResult, model: dict) -> list[Figure]:
    return [(f"SAE training (layer {r.layer} {r.site}, width {r.width}, k {r.k}): {fc.METRICS[m][0].lower()}.", fig)
            for m, fig in fc.training_charts(r).items()]


def _sae_feature_figures(r: FeatureActivations, model: dict) -> list[Figure]:
    return [(f"Top SAE features per position of {shorten(r.prompt, 60)!r}.", fc.features_heatmap(r))]


def _sae_attribution_figures(r: FeatureAttribution, model: dict) -> list[Figure]:
    return [(f"SAE features by activation × gradient of {quote_token(r.target)} after {shorten(r.prompt, 60)!r}.",
             fc.attribution_heatmap(r))]


BUILDERS: dict[type, Builder] = {
    ProbeResult: _probe_figures,
    CCSResult: _ccs_figures,
    PatchscopeResult: _patchscope_figures,
    BiasDatasetResult: _bias_dataset_figures,
    LensResult: _lens_figures,
    LensComparison: _comparison_figures,
    HeadScores: _heads_figures,
    HeadPattern: _pattern_figures,
    AblationResult: _ablation_figures,
    SweepResult: _sweep_figures,
    PatchResult: _patch_figures,
    SelectiveNeurons: _overview_figures,
    NeuronHistogram: _histogram_figures,
    PromptActivation: _prompt_activation_figures,
    ExampleActivations: _examples_figures,
    NeuronStats: _stats_figures,
    TokenPattern: _pattern_text_figures,
    Explanation: _explanation_figures,
    SwapAudit: _audit_figures,
    BiasResult: _bias_figures,
    PairScores: _pair_figures,
    InterventionResult: _intervention_figures,
    ArmMetrics: _arm_figures,
    CheckpointComparison: _checkpoint_figures,
    GenerateResult: _generate_figures,
    Generation: _arm_tokens_figures,
    SteerResult: _steer_figures,
    SteerSweepResult: _steer_sweep_figures,
    SteeringVector: _vector_figures,
    SAETrainResult: _sae_run_figures,
    FeatureActivations: _sae_feature_figures,
    FeatureAttribution: _sae_attribution_figures,
}

# The views results come from, in the app's tab order; anything else is "Other".
GROUPS: dict[str, tuple[type, ...]] = {
    "Logit lens": (LensResult, LensComparison),
    "Heads": (HeadScores, HeadPattern, AttentionResult, DLAResult),
    "Ablation and patching": (AblationResult, SweepResult, PatchResult),
    "Neurons": (SelectiveNeurons, NeuronStats, NeuronHistogram, TokenPattern, ExampleActivations,
                PromptActivation, Explanation, SearchHit, NeuronExample),
    "Demonstrations": (PromptSet, DemoLensResult, OverthinkingResult),
    "Pronoun swap": (SwapAudit, BiasResult, PairScores, InterventionResult, ArmMetrics, CheckpointComparison,
                     BiasDatasetResult),
    "Probes": (HiddenStates, ProbeResult, CCSResult, PatchscopeResult),
    "Generate and steering": (GenerateResult, Generation, SteerResult, SteerSweepResult, SteeringVector),
    "Features (SAEs)": (SAETrainResult, FeatureActivations, FeatureAttribution, FeatureCard),
}
OTHER = "Other"


def group_of(result: Result) -> str:
    for name, kinds in GROUPS.items():
        if isinstance(result, kinds):
            return name
    return OTHER


def grouped(entries: Iterable[Entry]) -> list[tuple[str, list[tuple[int, Entry]]]]:
    """(group, [(stored index, entry), ...]) in the groups' order, each in stored order."""
    out: dict[str, list[tuple[int, Entry]]] = {name: [] for name in (*GROUPS, OTHER)}
    for i, entry in enumerate(entries):
        out[group_of(entry.result)].append((i, entry))
    return [(name, items) for name, items in out.items() if items]


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
    rows = _rows((f.name, _value_text(getattr(result, f.name))) for f in dataclasses.fields(result))
    extra = f"<div class='note'>{html.escape(note)}</div>" if note else ""
    return _div(f"{extra}<table class='{FIELDS}'>{rows}</table>", name=FIELDS)


def figures_for(result: Result, model: dict | None = None) -> list[Figure]:
    """The captioned charts of one result, as its live view draws them (a field table for types
    without charts, or when a damaged result cannot be drawn)."""
    model = model or {}
    build = next((b for cls, b in BUILDERS.items() if isinstance(result, cls)), None)
    if build is not None:
        try:
            return build(result, model)
        except Exception as e:  # a loaded result the charts cannot draw: still show what it holds
            log.exception("cannot draw a %s", type(result).__name__)
            return [(f"{type(result).__name__}: its fields (the chart could not be drawn: {type(e).__name__}: {e}).",
                     summary_table(result))]
    return [(f"{type(result).__name__}: its fields.", summary_table(result))]


# ------------------------------------------------------------------ manifest
def manifest_rows(manifest: dict) -> list[tuple[str, str]]:
    """(what, value) rows describing a snapshot: its model, when it was made, with what."""
    model = manifest.get("model") or {}
    rows = [("model", str(model.get("name", "unknown")))]
    for key, label in (("architecture", "architecture"), ("n_layers", "layers"), ("config_hash", "config hash"),
                       ("weights_hash", "weights hash")):
        if key in model:
            rows.append((label, str(model[key])))
    rows.append(("created", str(manifest.get("created", "unknown"))))
    rows.append(("schema version", str(manifest.get("schema_version", "?"))))
    packages = manifest.get("packages") or {}
    if packages:
        rows.append(("packages", ", ".join(f"{k} {v}" for k, v in packages.items())))
    return rows


def manifest_html(manifest: dict) -> str:
    return f"<table class='snapshot-manifest'>{_rows(manifest_rows(manifest))}</table>"


# ------------------------------------------------------------------ the page
def snapshot_page(snapshot: Snapshot | Iterable[Entry], title: str = "Interp Explorer snapshot") -> str:
    """One self-contained HTML document: every result's charts, titled and captioned, by group."""
    snap = snapshot if isinstance(snapshot, Snapshot) else Snapshot(manifest={}, entries=tuple(snapshot))
    model = snap.model
    header = (f"<h1>{html.escape(title)}</h1><p>{len(snap.entries)} results made with "
              f"<b>{html.escape(str(model.get('name', 'an unknown model')))}</b>.</p>{manifest_html(snap.manifest)}")
    parts: list = [_div(header)]
    for group, items in grouped(snap.entries):
        parts.append(_div(f"<h2>{html.escape(group)}</h2>"))
        for i, entry in items:
            kind = type(entry.result).__name__
            parts.append(_div(f"<h3>{i + 1}. {html.escape(entry.label or kind)}</h3>"
                              f"<div class='note'>{html.escape(kind)}</div>"))
            for caption, fig in figures_for(entry.result, model):
                parts.append(fig)
                if caption:
                    parts.append(_div(f"<p class='caption'><i>{html.escape(caption)}</i></p>"))
    return file_html(column(*parts, sizing_mode="stretch_width"), resources=INLINE, title=title)


def export_html(snapshot: Snapshot | Iterable[Entry], path: str | Path, title: str = "Interp Explorer snapshot") -> Path:
    """Write every result's charts, titled and captioned, to one self-contained HTML file."""
    path = Path(path)
    path.write_text(snapshot_page(snapshot, title), encoding="utf-8")
    return path


__all__ = ["BUILDERS", "GROUPS", "figures_for", "summary_table", "group_of", "grouped", "manifest_rows",
           "manifest_html", "snapshot_page", "export_html"]
