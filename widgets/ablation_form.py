"""The inputs a single ablation and a sweep each own: prompt, target, compare token and mode.

``MeasureForm`` is a mixin of params; the single ablation and the sweep each inherit it, so
each has its own copy (editing the sweep's prompt leaves the single ablation's alone).
"""
from __future__ import annotations

from typing import Any

import panel as pn
import param

from explorer.core.errors import ExplorerError
from explorer.interventions.ablation import MODES

from .parts import text_field, token_hint

MEAN_SOURCES = {"default corpus": "corpus", "my text": "text"}
FORM_INPUTS = ("prompt", "target", "compare_token", "mode", "mean_source", "mean_text", "second_prompt")


def count_text(label: str, n: int | None) -> str:
    return f"{label}: {'?' if n is None else n} token{'' if n == 1 else 's'}"


def token_count(session, text: str) -> int | None:
    """Tokens the engine will see (0 for an empty text, None when it cannot be encoded)."""
    if not text or not text.strip():
        return 0
    try:
        return int(session.encode(text).numel())
    except ExplorerError:
        return None


def counts_line(session, a: str, b: str, names: tuple[str, str], what: str) -> str:
    """'clean: 5 tokens · corrupted: 5 tokens · equal ✓' (or why they must match)."""
    na, nb = token_count(session, a), token_count(session, b)
    text = f"{count_text(names[0], na)} · {count_text(names[1], nb)}"
    if na and nb:
        text += " · equal ✓" if na == nb else f" · **they differ**: {what} needs equal token lengths"
    return text


class MeasureForm(param.Parameterized):
    """What is measured (a target's logit at the prompt's last position) and how components are ablated."""

    prompt = param.String(default="The capital of France is", label="Prompt",
                          doc="The prompt whose next-token prediction is measured (at its last position).")
    target = param.String(default=" Paris", label="Target token",
                          doc="The token whose logit, probability and rank are measured; '#1234' names a token id.")
    compare_token = param.String(default="", label="Compare token (optional)",
                                 doc="When given, the metric is logit(target) − logit(compare token).")
    mode = param.Selector(default="zero", objects=list(MODES), label="Mode",
                          doc="zero: set to 0; mean: the mean over a text; resample: the second prompt's activation.")
    mean_source = param.Selector(default="corpus", objects=MEAN_SOURCES, label="Mean over",
                                 doc="Mean mode: the text the mean activations are taken over.")
    mean_text = param.String(default="", label="Mean text", doc="Mean mode with 'my text': the text to average over.")
    second_prompt = param.String(default="", label="Second prompt (resample)",
                                 doc="Resample mode: activations come from this prompt (same token count).")
    resample_counts = param.String(default="", doc="Live token counts of the prompt and the second prompt.")
    target_hint = param.String(default="", doc="A hint when the target is likely missing its leading space.")

    def init_form(self, session) -> None:
        """Attach the model session (token counts and hints need its tokenizer); call in __init__."""
        self.session = session
        self._update_resample_counts()
        self._update_target_hint()

    def replacement(self) -> dict[str, Any]:
        """mean_text / second_prompt of a request for the current mode (checked)."""
        if self.mode == "mean" and self.mean_source == "text":
            if not self.mean_text.strip():
                raise ExplorerError("the mean text is empty: type a text to average over, or pick the default corpus")
            return {"mean_text": self.mean_text, "second_prompt": None}
        if self.mode == "resample":
            return {"mean_text": None, "second_prompt": self.second_prompt}
        return {"mean_text": None, "second_prompt": None}

    @param.depends("prompt", "second_prompt", "mode", watch=True)
    def _update_resample_counts(self) -> None:
        if self.mode != "resample":
            self.resample_counts = ""
            return
        self.resample_counts = counts_line(self.session, self.prompt, self.second_prompt,
                                           ("prompt", "second prompt"), "resampling")

    @param.depends("target", watch=True)
    def _update_target_hint(self) -> None:
        self.target_hint = token_hint(self.session, self.target)

    def form_controls(self, prefix: str) -> pn.Column:
        """Prompt, target (with its hint), compare token and the ablation mode."""
        prompt = text_field(self.param.prompt, f"{prefix}-prompt", area=True, sizing_mode="stretch_width",
                            placeholder="e.g. The capital of France is")
        target = text_field(self.param.target, f"{prefix}-target", width=150, placeholder="e.g. ' Paris'")
        compare = text_field(self.param.compare_token, f"{prefix}-compare", width=170, placeholder="optional")
        mode = pn.widgets.RadioButtonGroup.from_param(self.param.mode, css_classes=[f"{prefix}-mode"],
                                                      margin=(26, 10, 10, 10))
        hint = pn.pane.Markdown(self.param.target_hint, css_classes=[f"{prefix}-target-hint"], margin=(0, 10),
                                visible=self.param.target_hint.rx.bool(), styles={"color": "#664d03"},
                                sizing_mode="stretch_width")
        is_mean = self.param.mode.rx() == "mean"
        mean_source = pn.widgets.Select.from_param(self.param.mean_source, width=150)
        mean_text = text_field(self.param.mean_text, f"{prefix}-mean-text", area=True, sizing_mode="stretch_width",
                               placeholder="A text to average activations over", max_rows=6,
                               visible=is_mean & (self.param.mean_source.rx() == "text"))
        second = text_field(self.param.second_prompt, f"{prefix}-second-prompt", sizing_mode="stretch_width",
                            placeholder="Same number of tokens, e.g. The capital of Italy is")
        counts = pn.pane.Markdown(self.param.resample_counts, css_classes=[f"{prefix}-resample-counts"],
                                  margin=(0, 10))
        return pn.Column(
            pn.Row(prompt, target, compare, mode, sizing_mode="stretch_width"),
            hint,
            pn.Row(mean_source, mean_text, visible=is_mean, sizing_mode="stretch_width"),
            pn.Column(second, counts, visible=self.param.mode.rx() == "resample", sizing_mode="stretch_width"),
            sizing_mode="stretch_width")
