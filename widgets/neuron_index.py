"""The neuron view's index parts: ``IndexPart`` opens an index (or one in the cache for this
model) or builds one over a corpus as a job (Cancel keeps a checkpoint; Build / Resume continues
it); ``OverviewPart`` draws the most selective neurons per layer (a click opens one).
"""
from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from pathlib import Path

import panel as pn
import param

from explorer.core.errors import ExplorerError
from explorer.core.jobs import CANCELLED, DONE, Job
from explorer.core.session import ModelSession
from explorer.neurons.describe import check_session
from explorer.neurons.index import (
    IndexRequest,
    NeuronIndex,
    SelectiveNeurons,
    build_index,
)

from . import neuron_charts
from .live import LiveJob
from .parts import RunState, error_text, job_running

log = logging.getLogger(__name__)

NO_INDEX_TEXT = (
    "**No neuron index is open.** An index holds every MLP neuron's top-activating and random "
    "examples over a corpus. Press **Build / Resume** to index {tokens:,} tokens of the default news "
    "corpus with the attached model (leave *Corpus* empty; the progress bar shows tokens/s and the time left), or give "
    "your own corpus (plain text, JSONL, parquet or a saved `datasets` directory). An index built "
    "earlier (here or with `python -m explorer neurons index`) opens from its directory."
)


def known_indexes(session: ModelSession) -> dict[str, str]:
    """Index directories in the cache built with this model: label -> path (newest first)."""
    from explorer.core.defaults import cache_dir

    root = cache_dir() / "neurons"
    info = session.info()
    found = []
    for manifest in root.glob("*/manifest.json") if root.is_dir() else []:
        try:
            m = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        model = m.get("model", {})
        if model.get("config_hash") != info.config_hash or model.get("name") != info.name:
            continue
        corpus = Path(str(m.get("corpus", {}).get("path", "?"))).name
        state = "" if m.get("complete") else ", partial"
        label = f"{int(m.get('tokens_done', 0)):,} tokens of {corpus}{state} ({m.get('created', '?')})"
        found.append((str(m.get("created", "")), label, str(manifest.parent)))
    found.sort(reverse=True)
    return {label: path for _, label, path in found}


class IndexPart(pn.viewable.Viewer):
    """Open or build a neuron index; ``on_index(index, model_note)`` hears of every index shown
    (``model_note``: why the attached model cannot run on it, empty when it can)."""

    index_dir = param.String(default="", label="Index directory",
                             doc="A neuron index directory to open.")
    open_index = param.Event(label="Open", doc="Open the index at index_dir.")
    corpus = param.String(default="", label="Corpus",
                          doc="Corpus to index: plain text, JSONL, parquet or a datasets directory; "
                              "empty = the default news corpus.")
    max_tokens = param.Integer(default=20_000, bounds=(0, None), label="Max tokens",
                               doc="Tokens to index (0 = the whole corpus).")
    window = param.Integer(default=64, bounds=(2, None), label="Window", doc="Tokens per example window.")
    top_k = param.Integer(default=20, bounds=(1, 500), label="Top examples", doc="Top examples kept per neuron.")
    n_random = param.Integer(default=20, bounds=(0, 500), label="Random examples",
                             doc="Random windows kept (shared by all neurons).")
    batch_windows = param.Integer(default=16, bounds=(1, None), label="Windows per batch")
    out_dir = param.String(default="", label="Output directory",
                           doc="Where the index is written; empty = the cache, keyed by model, corpus and settings.")
    build = param.Event(label="Build / Resume", doc="Build the index (a cancelled build resumes).")
    cancel = param.Event(label="Cancel", doc="Stop the build; its checkpoint is kept.")
    building = param.Boolean(default=False, doc="True while a build runs.")
    build_percent = param.Integer(default=0, bounds=(0, 100), doc="Build progress in percent.")
    build_status = param.String(default="", doc="The build's progress line.")
    index = param.ClassSelector(class_=NeuronIndex, default=None, allow_None=True, doc="The open index.")
    index_info = param.String(default="", doc="One line about the open index.")

    def __init__(self, session: ModelSession, state: RunState, on_index: Callable[[NeuronIndex, str], None],
                 background: bool = True, **params) -> None:
        """``state``: the view's shared status/error/busy line."""
        super().__init__(**params)
        self.session, self.state, self._on_index = session, state, on_index
        self.background = background  # False: jobs run on the caller's thread (notebooks, tests)
        self.model_note = ""
        self._build_job = LiveJob(self._on_build_progress, self._on_build_finish)
        self._known = pn.widgets.Select(label="Indexes in the cache", options={}, css_classes=["neuron-known"],
                                        sizing_mode="stretch_width")
        self._known.param.watch(self._on_known_selected, "value")
        self.refresh_known()
        self._layout = self._build()

    def refresh_known(self) -> None:
        """List the indexes in the cache built with this model (for the picker)."""
        try:
            found = known_indexes(self.session)
        except OSError:
            found = {}
        self._known.options = {"(choose one)": "", **found}
        self._known.disabled = not found

    def _on_known_selected(self, event) -> None:
        if event.new:
            self.index_dir = event.new

    @param.depends("open_index", watch=True)
    async def _on_open_index(self) -> None:
        await self.load_index(self.index_dir)

    async def load_index(self, path: str | Path) -> None:
        """Open an index directory (reading it off the loop); errors are shown, the old index kept."""
        path = str(path).strip()
        if not path:
            self.state.error = "**No index directory given:** type one, pick one from the cache, or build an index."
            return
        self.state.busy = True
        try:
            index = await asyncio.to_thread(NeuronIndex.open, path)
            self.set_index(index)
        except Exception as e:
            self.state.error = error_text(e, "open the index", log)
        finally:
            self.state.busy = False

    def set_index(self, index: NeuronIndex) -> None:
        """Show an index (and tell the view, which clears the other parts)."""
        try:
            check_session(index, self.session)
            self.model_note = ""
        except ExplorerError as e:
            self.model_note = str(e)
        m = index.manifest
        state = "complete" if index.complete else "partial (Build / Resume continues it)"
        info = (f"**Index** `{index.path}` · {index.model_name} · {index.n_layers} layers × {index.d_mlp:,} neurons · "
                f"{index.tokens_done:,} tokens of `{Path(str(m['corpus']['path'])).name}` · {state}")
        if self.model_note:
            info += f" · ⚠ {self.model_note}: stored data only (no shading, prompt or Explain)."
        self.param.update(index=index, index_dir=str(index.path), index_info=info)
        self._on_index(index, self.model_note)
        self.refresh_known()

    # ----------------------------------------------------------------- build
    def build_request(self) -> IndexRequest:
        corpus = self.corpus.strip()
        if corpus:
            path = Path(corpus).expanduser()
            if not path.exists():
                raise ExplorerError(f"corpus not found: {corpus} (give a text, JSONL or parquet file, or a "
                                    "datasets directory; leave it empty for the default corpus)")
            corpus = str(path)
        return IndexRequest(corpus_path=corpus or None, max_tokens=self.max_tokens or None, window=self.window,
                            top_k=self.top_k, n_random=self.n_random, batch_windows=self.batch_windows)

    @param.depends("build", watch=True)
    def _on_build(self) -> None:
        self.start_build()

    def start_build(self) -> Job | None:
        """Start (or resume) the build job; it reports to the progress bar and opens the index."""
        if job_running(self._build_job):
            return self._build_job.job
        try:
            request = self.build_request()
        except ExplorerError as e:
            self.state.error = f"**Could not build the index:** {e}"
            return None
        out = self.out_dir.strip() or None
        session = self.session
        self.param.update(building=True, build_percent=0, build_status="Starting: reading the corpus…")
        self.state.error = ""
        return self._build_job.start(lambda ctx: build_index(session, request, out_dir=out, ctx=ctx),
                                     name="neuron-index", background=self.background)

    @param.depends("cancel", watch=True)
    def _on_cancel(self) -> None:
        if job_running(self._build_job):
            self._build_job.cancel()
            self.build_status = "Cancelling: finishing the current batch and writing a checkpoint…"

    def close(self) -> None:
        """Stop a running build (its checkpoint is kept)."""
        self._build_job.cancel()

    def _on_build_progress(self, progress, partial) -> None:
        total = max(progress.total, 1)
        self.param.update(build_percent=min(100, int(100 * progress.done / total)),
                          build_status=f"{progress.done:,} / {progress.total:,} tokens · {progress.message}")

    def _on_build_finish(self, job: Job) -> None:
        self.building = False
        if job.status == DONE and job.result is not None:
            index = job.result
            elapsed = index.manifest.get("elapsed_s", 0) or 0
            self.set_index(index)
            self.param.update(build_percent=100, build_status=(
                f"Built: {index.tokens_done:,} tokens in {elapsed:.0f} s "
                f"({index.tokens_done / max(elapsed, 1e-9):,.0f} tokens/s this run)."))
        elif job.status == CANCELLED and job.result is not None:
            self.build_status = (f"Cancelled at {job.result.tokens_done:,} tokens; the checkpoint is kept: "
                                 "press Build / Resume to continue.")
        else:
            self.build_status = "The build failed."
            self.state.error = f"**Could not build the index:** {job.error}"

    def _build(self) -> pn.viewable.Viewable:
        index_dir = pn.widgets.TextInput.from_param(self.param.index_dir, sizing_mode="stretch_width",
                                                    placeholder="/path/to/index", css_classes=["neuron-index-dir"])
        open_btn = pn.widgets.Button.from_param(self.param.open_index, width=90, margin=(26, 10, 10, 10),
                                                css_classes=["neuron-open-index"])
        corpus = pn.widgets.TextInput.from_param(self.param.corpus, sizing_mode="stretch_width",
                                                 placeholder="empty = the default news corpus",
                                                 css_classes=["neuron-corpus"])
        max_tokens = pn.widgets.IntInput.from_param(self.param.max_tokens, width=120, step=1000,
                                                    css_classes=["neuron-max-tokens"])
        build = pn.widgets.Button.from_param(self.param.build, color="primary", width=140, margin=(26, 10, 10, 10),
                                             disabled=self.param.building, css_classes=["neuron-build"])
        cancel = pn.widgets.Button.from_param(self.param.cancel, width=90, margin=(26, 10, 10, 10),
                                              disabled=self.param.building.rx.not_(), css_classes=["neuron-cancel"])
        advanced = pn.Card(
            pn.FlexBox(*(pn.widgets.IntInput.from_param(p, width=130)
                         for p in (self.param.window, self.param.top_k, self.param.n_random,
                                   self.param.batch_windows))),
            pn.widgets.TextInput.from_param(self.param.out_dir, sizing_mode="stretch_width",
                                            placeholder="empty = the cache"),
            title="Build settings", collapsed=True, sizing_mode="stretch_width", margin=(0, 10))
        progress = pn.indicators.Progress(value=self.param.build_percent, max=100, sizing_mode="stretch_width",
                                          visible=self.param.build_status.rx.bool(), css_classes=["neuron-progress"],
                                          margin=(0, 10))
        build_status = pn.pane.Markdown(self.param.build_status, css_classes=["neuron-build-status"],
                                        sizing_mode="stretch_width", margin=(0, 10))
        picker = pn.Column(
            pn.Row(self._known, index_dir, open_btn, sizing_mode="stretch_width"),
            pn.Row(corpus, max_tokens, build, cancel, sizing_mode="stretch_width"),
            advanced, progress, build_status, sizing_mode="stretch_width", css_classes=["neuron-picker"])
        info = pn.pane.Markdown(self.param.index_info, css_classes=["neuron-index-info"],
                                visible=self.param.index_info.rx.bool(), sizing_mode="stretch_width", margin=(0, 10))
        return pn.Column(picker, info, sizing_mode="stretch_width")

    def __panel__(self) -> pn.viewable.Viewable:
        return self._layout


class OverviewPart(pn.viewable.Viewer):
    """The most selective neurons of every layer; a click on a point calls ``on_pick(layer, neuron)``."""

    n_per_layer = param.Integer(default=5, bounds=(1, 50), label="Neurons per layer")
    result = param.ClassSelector(class_=SelectiveNeurons, default=None, allow_None=True,
                                 doc="The overview shown.")

    def __init__(self, on_pick: Callable[[int, int], None], history=None, **params) -> None:
        super().__init__(**params)
        self._on_pick, self.history = on_pick, history
        self.index: NeuronIndex | None = None
        self._chart = pn.pane.Bokeh(None, css_classes=["neuron-overview"], sizing_mode="stretch_width")

    def set_index(self, index: NeuronIndex) -> None:
        self.index = index
        self._update()

    @param.depends("n_per_layer", watch=True)
    def _update(self) -> None:
        if self.index is None:
            return
        overview = self.index.selective_neurons(self.n_per_layer)
        self.result = overview
        if self.history is not None:
            self.history.add(overview, f"selective neurons ({overview.n_per_layer} per layer)")
        fig = neuron_charts.selectivity_overview(overview)
        source = fig.select_one({"name": neuron_charts.OVERVIEW_SOURCE})
        source.selected.on_change("indices", self._tap(source, overview))
        self._chart.object = fig

    def _tap(self, source, overview: SelectiveNeurons):
        def on_tap(attr, old, new) -> None:
            if new and self.result is overview:  # ignore taps on a replaced chart
                self._on_pick(int(source.data["layer"][new[0]]), int(source.data["neuron"][new[0]]))
        return on_tap

    def __panel__(self) -> pn.viewable.Viewable:
        n = pn.widgets.IntInput.from_param(self.param.n_per_layer, width=130)
        return pn.Column(pn.Row(n), self._chart, sizing_mode="stretch_width")
