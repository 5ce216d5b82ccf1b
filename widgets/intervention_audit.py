"""The pronoun-swap tab's corpus part: the corpus, the swap direction and *Preview swap*.

*Preview swap* runs ``corpus_audit`` (tokenising both arms' text, a second or so, in a worker
thread) and shows the counts per word pair, the token counts before → after and sample changes,
before any training starts. A bad corpus is a visible error; what was shown stays. The part's
three inputs are also the run's corpus settings (``fields()``).
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import panel as pn
import param

from explorer.persistence.history import History
from explorer.training.intervene import InterventionConfig, corpus_audit
from explorer.training.swap import SwapAudit

from . import intervention_charts as ic
from .parts import alert, error_text, help_text

log = logging.getLogger(__name__)

DIRECTIONS = {"masculine → feminine": "m2f", "feminine → masculine": "f2m"}
CORPUS_HELP = ("Empty: the default news corpus (300 articles). Or a path: plain text (.txt, one document per "
               "line or paragraph), JSONL or parquet with a text field, or a folder saved by `datasets`.")


class SwapAuditPart(pn.viewable.Viewer):
    """Corpus, swap direction and the swap audit (no training)."""

    corpus = param.String(default="", label="Corpus (empty: default news corpus)", doc=CORPUS_HELP)
    text_mode = param.Selector(default="lines", objects=["lines", "paragraphs"], label="Text: one document per",
                               doc="Plain-text corpora: a document per line, or per blank-line-separated paragraph.")
    direction = param.Selector(default="m2f", objects=DIRECTIONS, label="Swapped arm",
                               doc="The swap the swapped arm's text gets; the control arm trains on the original.")
    preview = param.Event(label="Preview swap", doc="Audit the swap of the training documents (no training).")
    audit = param.ClassSelector(class_=SwapAudit, default=None, allow_None=True, doc="The swap audit shown.")
    busy = param.Boolean(default=False, doc="True while the audit runs.")
    error = param.String(default="", doc="The last error shown; empty when none.")

    def __init__(self, tokenizer: Callable[[], Any], config: Callable[[], InterventionConfig],
                 history: History | None = None, **params) -> None:
        """``tokenizer()`` gives the model's tokenizer, ``config()`` the run's checked settings."""
        super().__init__(**params)
        self._tokenizer, self._config = tokenizer, config
        self.history = history
        self._chart = pn.pane.Bokeh(None, css_classes=["swap-audit-chart"], margin=(5, 10))
        self._html = pn.pane.HTML("", css_classes=["swap-audit"], stylesheets=[ic.AUDIT_CSS],
                                  sizing_mode="stretch_width", margin=(5, 10))
        self._layout = self._build()

    def fields(self) -> dict[str, Any]:
        """The run settings this part holds (``InterventionConfig`` fields)."""
        return dict(corpus=self.corpus.strip() or None, text_mode=self.text_mode, direction=self.direction)

    def show_config(self, config: InterventionConfig) -> None:
        """Put a run's corpus settings into the fields."""
        self.param.update(corpus=config.corpus or "", text_mode=config.text_mode, direction=config.direction)

    @param.depends("preview", watch=True)
    async def _on_preview(self) -> None:
        await self.preview_audit()

    async def preview_audit(self) -> SwapAudit | None:
        """Audit the swap of the current corpus (no training); errors are shown, the last audit kept."""
        if self.busy:
            return None
        self.busy = True
        try:
            config = self._config()
            audit = await asyncio.to_thread(corpus_audit, self._tokenizer(), config)
        except Exception as e:  # bad input says what to do; a bug is logged
            self.error = error_text(e, "read the corpus", log)
            return None
        finally:
            self.busy = False
        self.param.update(audit=audit, error="")
        if self.history is not None:
            self.history.add(audit, f"swap audit ({audit.direction}): {config.corpus or 'news corpus'}")
        return audit

    @param.depends("audit", watch=True)
    def _update_audit(self) -> None:
        if self.audit is not None:
            self._chart.object = ic.audit_chart(self.audit)
            self._html.object = ic.audit_html(self.audit)

    def _build(self) -> pn.viewable.Viewable:
        corpus = pn.widgets.TextInput.from_param(self.param.corpus, css_classes=["swap-corpus"],
                                                 sizing_mode="stretch_width",
                                                 placeholder="default news corpus, or "
                                                             "/path/to/corpus.txt|.jsonl|.parquet")
        text_mode = pn.widgets.Select.from_param(self.param.text_mode, width=170)
        direction = pn.widgets.Select.from_param(self.param.direction, width=190, css_classes=["swap-direction"])
        preview = pn.widgets.Button.from_param(self.param.preview, width=140, height=36, margin=(26, 10, 10, 10),
                                               disabled=self.param.busy, css_classes=["swap-preview"])
        audit = pn.Row(self._chart, self._html, sizing_mode="stretch_width", loading=self.param.busy)
        return pn.Column(pn.Row(corpus, text_mode, direction, preview, sizing_mode="stretch_width"),
                         help_text(CORPUS_HELP, "swap-corpus-help"), alert(self.param.error, "swap-audit-error"),
                         audit, sizing_mode="stretch_width")

    def __panel__(self) -> pn.viewable.Viewable:
        return self._layout
