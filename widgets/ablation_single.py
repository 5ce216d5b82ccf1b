"""A single ablation: ablate a few components together and compare with the baseline.

A forward pass of a few seconds, run with ``await asyncio.to_thread(...)`` as the lens view
does. The part owns its inputs (``MeasureForm`` plus the components); a result whose inputs
were edited afterwards is marked stale until the next run.
"""
from __future__ import annotations

import asyncio
import time

import panel as pn
import param

from explorer.core.components import SYNTAX, ComponentError, components_for
from explorer.core.session import ModelSession
from explorer.interventions import ablation as engine
from explorer.interventions.ablation import AblationRequest, AblationResult
from explorer.persistence.history import History

from . import ablation_charts as ac
from .ablation_form import FORM_INPUTS, MeasureForm
from .charts import shorten
from .live import QueuedRuns
from .parts import RunState, alert, help_text, stale_note, text_field

COMPONENT_HELP = (
    "Comma-separated specs, counting from 0: **L.H** a head (3.1), **L:N** an MLP neuron (5:1024), "
    "**attn:L** / **mlp:L** a block's whole attention / MLP output, **block:L** a whole block "
    "(its output := its input). With an **SAE folder** set, **sae:F** ablates SAE feature F and "
    "**sae:F=V** clamps it to V (the SAE's error term kept). All listed components are ablated together.")


class SingleAblation(QueuedRuns, MeasureForm, RunState, pn.viewable.Viewer):
    """Ablate the listed components together; the card, target chart and both lenses."""

    components = param.String(default="", label="Components", doc=COMPONENT_HELP)
    sae_dir = param.String(default="", label="SAE folder (for sae:F specs)",
                           doc="An SAE in the SAELens layout (cfg.json + sae_weights.safetensors).")
    run = param.Event(label="Run ablation", doc="Ablate the components and compare with the baseline.")
    result = param.ClassSelector(class_=AblationResult, default=None, allow_None=True,
                                 doc="The single ablation shown.")

    def __init__(self, session: ModelSession, history: History | None = None, **params) -> None:
        params.setdefault("status", "Type components and press **Run ablation**.")
        super().__init__(**params)
        self.history = history
        self.init_form(session)
        # Bokeh panes stay visible (empty until a result comes): see lens_view for why.
        self._card = pn.pane.HTML("", css_classes=["ablation-card"], width=430, stylesheets=[ac.CARD_CSS],
                                  margin=(5, 20, 5, 10))
        self._target_pair = pn.pane.Bokeh(None, css_classes=["ablation-target-pair"], sizing_mode="stretch_width")
        self._lens_baseline = pn.pane.Bokeh(None, css_classes=["ablation-lens-baseline"],
                                            sizing_mode="stretch_width")
        self._lens_ablated = pn.pane.Bokeh(None, css_classes=["ablation-lens-ablated"],
                                           sizing_mode="stretch_width")
        self.param.watch(self._mark_stale, [*FORM_INPUTS, "components", "sae_dir"])
        self._layout = self._build()

    def select(self, specs: list[str]) -> None:
        """Put component specs into the field; one that does not exist is reported (the field keeps it)."""
        specs = [s.strip() for s in specs if s and s.strip()]
        self.components = ", ".join(specs)
        try:
            components_for(self.session, [s for s in specs if not engine.is_feature_spec(s)] or specs)
            self.error = ""
        except ComponentError as e:
            self.error = f"**Check the components:** {e}"

    def request(self) -> AblationRequest:
        if not self.components.strip():
            raise ComponentError(f"no components given: {SYNTAX}")
        return AblationRequest(prompt=self.prompt, target=self.target, components=self.components,
                               mode=self.mode, compare_token=self.compare_token or None,
                               sae=self.sae_dir.strip() or None, **self.replacement())

    def _mark_stale(self, *_events) -> None:
        if self.result is not None:
            self.stale = True

    @param.depends("run", watch=True)
    async def _on_run(self) -> None:
        await self.compute()

    async def _compute_once(self) -> None:
        started = time.perf_counter()
        try:
            result = await asyncio.to_thread(engine.ablate, self.session, self.request())
        except Exception as e:  # bad input says what to do; the previous result stays (marked stale)
            self.fail(e, "run the ablation")
            return
        model_s = time.perf_counter() - started
        self._publish(result, model_s)

    def _publish(self, result: AblationResult, model_s: float) -> None:
        if self.history is not None:
            self.history.add(result, f"ablation {', '.join(result.components)} ({result.request.mode}): "
                                     f"{shorten(result.request.prompt, 30)}")
        started = time.perf_counter()
        self.param.update(result=result, error="", stale=False)  # builds the charts (watcher below)
        charts_s = time.perf_counter() - started
        effect = result.metric_effect
        what = "logit diff" if result.baseline.logit_diff is not None else "logit"
        self.status = (f"**{result.model}** · ablated {', '.join(result.components)} ({result.request.mode}) · "
                       f"{what} {effect:+.3f} · p {result.baseline.prob:.3f} → {result.ablated.prob:.3f} · "
                       f"model {model_s:.2f} s · charts {charts_s:.2f} s")

    @param.depends("result", watch=True)
    def _update_charts(self) -> None:
        result = self.result
        if result is None:
            return
        self._card.object = ac.ablation_card(result)
        if result.lens_baseline is not None and result.lens_ablated is not None:
            base, abl = ac.lens_pair(result)
            self._lens_baseline.object = base
            self._lens_ablated.object = abl
            self._target_pair.object = ac.target_pair(result)

    def _build(self) -> pn.viewable.Viewable:
        components = text_field(self.param.components, "ablation-components", sizing_mode="stretch_width",
                                placeholder="e.g. 3.1, 5:1024, mlp:2")
        run = pn.widgets.Button.from_param(self.param.run, color="primary", width=140, height=36,
                                           margin=(26, 10, 10, 10), disabled=self.param.busy,
                                           css_classes=["ablation-run"])
        status = pn.pane.Markdown(self.param.status, css_classes=["ablation-status"], margin=(0, 10),
                                  sizing_mode="stretch_width")
        lenses = pn.Row(self._lens_baseline, self._lens_ablated, sizing_mode="stretch_width")
        results = pn.Column(status, stale_note(self.param.stale, "ablation-stale"),
                            pn.Row(self._card, self._target_pair, sizing_mode="stretch_width"), lenses,
                            sizing_mode="stretch_width", loading=self.param.busy, css_classes=["ablation-results"])
        sae = text_field(self.param.sae_dir, "ablation-sae", width=260, placeholder="e.g. runs/sae-l12")
        return pn.Column(self.form_controls("ablation"), pn.Row(components, sae, run, sizing_mode="stretch_width"),
                         help_text(COMPONENT_HELP, "ablation-help"), alert(self.param.error, "ablation-error"),
                         results, sizing_mode="stretch_width")

    def __panel__(self) -> pn.viewable.Viewable:
        return self._layout
