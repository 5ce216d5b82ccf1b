"""One registry: each result type, its name for people, its group (the view it came from), its
chart builder, and the live view (and part) its settings go back to.

The snapshot view, the HTML export and a notebook's display all look results up here:

>>> from explorer.analyses.lens import LensResult
>>> kind_for(LensResult).name, kind_for(LensResult).view
('logit lens', 'lens')

A result that is a notebook cell's last value draws its charts: ``ResultPane`` is a Panel
pane registered for every result type listed here (``pn.panel(result)`` picks it).
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from typing import Any, ClassVar

import panel as pn
import param
from panel.pane.base import ReplacementPane

from explorer.analyses.ccs import CCSResult
from explorer.analyses.demonstrations import DemoLensResult, OverthinkingResult, PromptSet
from explorer.analyses.heads import AttentionResult, DLAResult, HeadPattern, HeadScores
from explorer.analyses.hidden import HiddenStates
from explorer.analyses.lens import LensComparison, LensResult
from explorer.analyses.patchscope import PatchscopeResult
from explorer.analyses.probes import ProbeResult
from explorer.core.results import Result
from explorer.features.attribution import FeatureAttribution
from explorer.features.browse import FeatureProfile
from explorer.features.card import FeatureCard
from explorer.features.encode import FeatureActivations
from explorer.features.train import SAETrainResult
from explorer.interventions.ablation import AblationResult, SweepResult
from explorer.interventions.generate import GenerateResult, Generation
from explorer.interventions.patching import PatchResult
from explorer.interventions.steering import SteeringVector, SteerResult, SteerSweepResult
from explorer.neurons.describe import ExampleActivations, Explanation, SearchHit, TokenPattern
from explorer.neurons.index import NeuronExample, NeuronHistogram, NeuronStats, PromptActivation, SelectiveNeurons
from explorer.neurons.units import UnitComparison, UnitsOnText
from explorer.persistence.snapshot import Entry
from explorer.training.bias import BiasResult, PairScores
from explorer.training.bias_datasets import BiasDatasetResult
from explorer.training.checkpoints import CheckpointComparison
from explorer.training.intervene import ArmMetrics, InterventionResult
from explorer.training.steer_compare import SteerCompareResult
from explorer.training.swap import SwapAudit

from . import feature_figures as ff
from . import feature_view as fv
from . import figures as f
from . import probe_charts as pc
from . import steering_figures as sf

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Kind:
    """How the app treats one result type."""

    type: type
    name: str                          # for people: "logit lens", never the class name
    group: str                         # the tab it came from (snapshot and export sections)
    figures: f.Builder | None = None   # (result, model identity) -> [(caption, bokeh model)]
    view: str | None = None            # the live view its settings go back to ("lens", "heads", "ablation")
    part: str | None = None            # that view's part ("single", "sweep", "patching")
    rerun: bool = False                # quick enough to rerun at once on "Continue from here"


def probe_figures(r: ProbeResult, model: dict) -> list[f.Figure]:
    return [("Probe accuracy per layer (held-out split).", pc.probe_curve(result=r))]


def ccs_figures(r: CCSResult, model: dict) -> list[f.Figure]:
    return [("CCS accuracy per layer (unsupervised, sign fixed on the training split).", pc.probe_curve(ccs=r))]


def patchscope_figures(r: PatchscopeResult, model: dict) -> list[f.Figure]:
    return [("Patchscope: what each layer × position's hidden state decodes to in the target prompt.",
             pc.patchscope_grid(r))]


LENS, HEADS, ABLATION, NEURONS = "Logit lens", "Heads", "Ablation and patching", "Neurons"
DEMOS, SWAP, PROBES = "Demonstrations", "Pronoun swap", "Probes and patchscopes"
STEERING, FEATURES = "Generate and steering", "Features (SAEs)"
OTHER = "Other"

KINDS: tuple[Kind, ...] = (
    Kind(LensResult, "logit lens", LENS, f.lens_figures, "lens", rerun=True),
    Kind(LensComparison, "lens comparison", LENS, f.comparison_figures, "lens", rerun=True),
    Kind(HeadScores, "head scores", HEADS, f.heads_figures, "heads", rerun=True),
    Kind(HeadPattern, "head pattern", HEADS, f.pattern_figures, "heads", rerun=True),
    Kind(AttentionResult, "attention patterns", HEADS, None, "heads", rerun=True),
    Kind(DLAResult, "direct logit attribution", HEADS),
    Kind(AblationResult, "single ablation", ABLATION, f.ablation_figures, "ablation", "single", rerun=True),
    Kind(SweepResult, "ablation sweep", ABLATION, f.sweep_figures, "ablation", "sweep"),
    Kind(PatchResult, "activation patching", ABLATION, f.patch_figures, "ablation", "patching"),
    Kind(SelectiveNeurons, "most selective neurons", NEURONS, f.overview_figures),
    Kind(NeuronStats, "neuron statistics", NEURONS, f.stats_figures),
    Kind(NeuronHistogram, "neuron histogram", NEURONS, f.histogram_figures),
    Kind(TokenPattern, "neuron token pattern", NEURONS, f.pattern_text_figures),
    Kind(ExampleActivations, "neuron examples", NEURONS, f.examples_figures),
    Kind(PromptActivation, "neuron on a prompt", NEURONS, f.prompt_activation_figures),
    Kind(Explanation, "neuron explanation", NEURONS, f.explanation_figures),
    Kind(SearchHit, "neuron search hit", NEURONS),
    Kind(NeuronExample, "neuron example", NEURONS),
    Kind(PromptSet, "prompt set", DEMOS),
    Kind(DemoLensResult, "demonstration lens", DEMOS),
    Kind(OverthinkingResult, "overthinking", DEMOS),
    Kind(SwapAudit, "swap audit", SWAP, f.audit_figures),
    Kind(BiasResult, "bias metrics", SWAP, f.bias_figures),
    Kind(PairScores, "pair scores", SWAP, f.pair_figures),
    Kind(InterventionResult, "intervention run", SWAP, f.intervention_figures),
    Kind(ArmMetrics, "arm metrics", SWAP, f.arm_figures),
    Kind(CheckpointComparison, "checkpoint comparison", SWAP, f.checkpoint_figures),
    Kind(BiasDatasetResult, "bias data set", SWAP, f.bias_dataset_figures),
    Kind(HiddenStates, "hidden states", PROBES),
    Kind(ProbeResult, "probe", PROBES, probe_figures),
    Kind(CCSResult, "CCS probe", PROBES, ccs_figures),
    Kind(PatchscopeResult, "patchscope", PROBES, patchscope_figures),
    Kind(GenerateResult, "generation", STEERING, sf.generate_figures),
    Kind(Generation, "generated tokens", STEERING, sf.generation_figures),
    Kind(SteerResult, "steering", STEERING, sf.steer_figures),
    Kind(SteerSweepResult, "steering sweep", STEERING, sf.steer_sweep_figures),
    Kind(SteeringVector, "steering vector", STEERING, sf.vector_figures),
    Kind(SteerCompareResult, "steering vs swap", STEERING, sf.compare_figures),
    Kind(SAETrainResult, "SAE training", FEATURES, ff.sae_run_figures),
    Kind(FeatureActivations, "SAE features", FEATURES, ff.sae_feature_figures),
    Kind(FeatureAttribution, "SAE attribution", FEATURES, ff.sae_attribution_figures),
    Kind(FeatureCard, "SAE feature card", FEATURES),
    Kind(FeatureProfile, "feature card", FEATURES, fv.profile_figures),
    Kind(UnitsOnText, "units firing on a text", FEATURES, fv.fired_figures),
    Kind(UnitComparison, "features vs neurons", FEATURES, fv.comparison_figures),
)
GROUPS: tuple[str, ...] = tuple(dict.fromkeys(k.group for k in KINDS))


def register(kind: Kind) -> None:
    """Add (or replace) a result type's entry: new views register their results here."""
    global KINDS, GROUPS
    KINDS = tuple(k for k in KINDS if k.type is not kind.type) + (kind,)
    GROUPS = tuple(dict.fromkeys(k.group for k in KINDS))
    ResultPane.types = tuple(k.type for k in KINDS)


def kind_for(cls: type) -> Kind | None:
    """The entry of a result type (or of its nearest registered base class)."""
    return next((k for k in KINDS if k.type is cls), None) or next((k for k in KINDS if issubclass(cls, k.type)), None)


def kind_of(result: Any) -> Kind | None:
    return kind_for(type(result))


def display_name(result: Any) -> str:
    """What people call a result ("logit lens"), never its class name."""
    kind = kind_of(result)
    if kind is not None:
        return kind.name
    words = "".join(f" {c.lower()}" if c.isupper() else c for c in type(result).__name__).strip()
    return words.removesuffix(" result") or words


def group_of(result: Any) -> str:
    kind = kind_of(result)
    return kind.group if kind is not None else OTHER


def grouped(entries: Iterable[Entry]) -> list[tuple[str, list[tuple[int, Entry]]]]:
    """(group, [(stored index, entry), ...]) in the groups' order, each in stored order."""
    out: dict[str, list[tuple[int, Entry]]] = {name: [] for name in (*GROUPS, OTHER)}
    for i, entry in enumerate(entries):
        out[group_of(entry.result)].append((i, entry))
    return [(name, items) for name, items in out.items() if items]


def figures_for(result: Result, model: dict | None = None) -> list[f.Figure]:
    """The captioned charts of one result, as its live view draws them (a field table for types
    without charts, or when a damaged result cannot be drawn)."""
    model = model or {}
    kind = kind_of(result)
    name = display_name(result)
    if kind is not None and kind.figures is not None:
        try:
            return kind.figures(result, model)
        except Exception as e:  # a loaded result the charts cannot draw: still show what it holds
            log.exception("cannot draw a %s", type(result).__name__)
            return [(f"{name}: its fields (the chart could not be drawn: {type(e).__name__}: {e}).",
                     f.summary_table(result))]
    return [(f"{name}: its fields.", f.summary_table(result))]


class ResultPane(ReplacementPane):
    """A result as its charts: ``pn.panel(logit_lens(session, prompt))`` in a notebook cell."""

    priority: ClassVar[float] = 0.9
    types: ClassVar[tuple[type, ...]] = tuple(k.type for k in KINDS)

    @classmethod
    def applies(cls, obj: Any) -> bool:
        return isinstance(obj, cls.types)

    def __init__(self, object=None, **params) -> None:
        super().__init__(object, **params)
        self._render()

    @param.depends("object", watch=True)
    def _render(self) -> None:
        items: list = []
        if self.object is not None:
            items.append(pn.pane.Markdown(f"**{display_name(self.object)}**"))
            for caption, fig in figures_for(self.object):
                items.append(pn.pane.Bokeh(fig))
                if caption:
                    items.append(pn.pane.Markdown(f"*{caption}*"))
        self._pane = pn.Column(*items, sizing_mode="stretch_width")
        self._inner_layout[:] = [self._pane]


__all__ = ["GROUPS", "KINDS", "Kind", "OTHER", "ResultPane", "display_name", "figures_for", "group_of", "grouped",
           "kind_for", "kind_of", "register"]
