"""The neuron view's prompt part: the card's neuron (or the typed layer and neuron) on a prompt,
a bar per token. A forward pass in a worker thread; the result goes into ``history``."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import panel as pn
import param

from explorer.core.session import ModelSession
from explorer.neurons.index import PromptActivation, prompt_activation
from explorer.persistence.history import History

from . import neuron_charts
from .chart_style import neuron_spec
from .parts import RunState, error_text, text_field

log = logging.getLogger(__name__)


class PromptPart(pn.viewable.Viewer):
    """Run one neuron on a prompt; ``target()`` gives the (layer, neuron) to read."""

    prompt = param.String(default="The nurse said that she would be late.", label="Prompt",
                          doc="Text to read the neuron's activation on.")
    run_prompt = param.Event(label="Run on prompt")
    result = param.ClassSelector(class_=PromptActivation, default=None, allow_None=True,
                                 doc="The last prompt run shown.")
    busy = param.Boolean(default=False)

    def __init__(self, session: ModelSession, state: RunState, target: Callable[[], tuple[int, int]],
                 history: History | None = None, **params) -> None:
        """``state``: the view's shared status/error line."""
        super().__init__(**params)
        self.session, self.state, self._target, self.history = session, state, target, history
        self.model_note = ""  # why the attached model cannot run on the open index; empty when it can
        self._chart = pn.pane.Bokeh(None, css_classes=["neuron-prompt-chart"], sizing_mode="stretch_width")

    def set_model_note(self, note: str) -> None:
        self.model_note = note

    @param.depends("run_prompt", watch=True)
    async def _on_run_prompt(self) -> None:
        await self.compute()

    async def compute(self) -> None:
        """The target neuron on the prompt, without blocking the loop."""
        layer, neuron = self._target()
        if self.model_note:
            self.state.error = f"**Cannot run the prompt:** {self.model_note}"
            return
        self.busy = True
        try:
            result = await asyncio.to_thread(prompt_activation, self.session, self.prompt, layer=layer, neuron=neuron)
        except Exception as e:
            self.state.error = error_text(e, "run the prompt", log)
            return
        finally:
            self.busy = False
        if self.history is not None:
            self.history.add(result, f"neuron {neuron_spec(layer, neuron)} on a prompt")
        self.result = result
        self.state.error = ""

    @param.depends("result", watch=True)
    def _update_chart(self) -> None:
        if self.result is not None:
            self._chart.object = neuron_charts.prompt_activation_chart(self.result)

    def __panel__(self) -> pn.viewable.Viewable:
        prompt = text_field(self.param.prompt, "neuron-prompt", live=False, sizing_mode="stretch_width")
        run = pn.widgets.Button.from_param(self.param.run_prompt, width=140, margin=(26, 10, 10, 10),
                                           disabled=self.param.busy, css_classes=["neuron-run-prompt"])
        return pn.Column(pn.Row(prompt, run, sizing_mode="stretch_width"),
                         pn.Column(self._chart, loading=self.param.busy, sizing_mode="stretch_width"),
                         sizing_mode="stretch_width")
