"""The probes view: what each layer knows about a label, read by linear probes (and by CCS and the
logit lens on true/false statements), the accuracy curve filling in live.

The work runs as a job (``widgets.live.LiveJob``): one batched pass collects every layer's
hidden states, then the probe of each row is fitted and reported as a partial result, which
arrives on the page's loop; the chart is rebuilt there by a pure builder from
``widgets.probe_charts`` and swapped into its pane (no Bokeh model is touched from the worker).
With "also CCS", contrast pairs are made from the true/false statements (or read from a pairs
file) and CCS with its comparisons is drawn on the same chart. Finished results (and a
cancelled partial probe curve) go into ``history``. The best row's direction downloads as a
steering vector and as a probe (safetensors).
"""
from __future__ import annotations

import io
import logging
from pathlib import Path

import panel as pn
import param

from explorer.analyses.ccs import CCSRequest, CCSResult, builtin_pairs, load_pairs, pairs_from_statements, run_ccs
from explorer.analyses.probes import (
    OffsetContext,
    ProbeError,
    ProbeRequest,
    ProbeResult,
    builtin_sets,
    load_labelled,
    probe_bytes,
    run_probes,
    steering_vector_bytes,
)
from explorer.core.errors import ExplorerError
from explorer.core.jobs import CANCELLED, Job, Progress
from explorer.core.session import ModelSession
from explorer.persistence.history import History

from . import probe_charts as pc
from .live import LiveJob
from .parts import alert

log = logging.getLogger(__name__)

FILE = "my file"


def dataset_options() -> dict[str, str]:
    """Select options: every built-in set with its size and classes, then the user's file."""
    opts = {f"{name} ({info['size']}: {' / '.join(info['classes'])})": name for name, info in builtin_sets().items()}
    opts["a JSONL/CSV file (text, label[, group])"] = FILE
    return opts


class ProbesView(pn.viewable.Viewer):
    """Per-layer probes of one ModelSession; usable alone in a notebook: ``ProbesView(session)``."""

    dataset = param.Selector(default="facts", objects=["facts"], label="Data",
                             doc="A built-in labelled set (size and classes shown) or your own file.")
    path = param.String(default="", label="File path",
                        doc="JSONL lines {text, label[, group]} or a CSV with those columns; for CCS also "
                            "JSONL lines {pos, neg, label}.")
    site = param.Selector(default="last", objects=["last", "mean"], label="Read at",
                          doc="The last token, or the mean over the text's tokens.")
    folds = param.Integer(default=5, bounds=(2, 20), label="Folds", doc="k of the stratified k-fold.")
    with_ccs = param.Boolean(default=False, label="Also CCS and the lens answer (true/false statements)",
                             doc="Contrast pairs from true/false statements: CCS, a supervised pair probe and the "
                                 "logit lens's answer on the same chart.")
    ccs_epochs = param.Integer(default=1000, bounds=(10, 5000), label="CCS epochs")
    run = param.Event(label="Run probes")
    cancel = param.Event(label="Stop")

    result = param.ClassSelector(class_=ProbeResult, default=None, allow_None=True, doc="The probe curve shown.")
    ccs_result = param.ClassSelector(class_=CCSResult, default=None, allow_None=True, doc="The CCS curves shown.")
    status = param.String(default="Pick data and press **Run probes**.")
    error = param.String(default="")
    busy = param.Boolean(default=False)
    progress = param.Number(default=0.0, bounds=(0.0, 1.0))

    def __init__(self, session: ModelSession, history: History | None = None, background: bool = True,
                 **params) -> None:
        options = dataset_options()
        super().__init__(**params)
        self.background = background  # False: the job runs on the caller's thread (notebooks, tests)
        self.param.dataset.objects = list(options.values())
        self.param.dataset.names = options
        self.session = session
        self.history = history
        self._job = LiveJob(self._on_progress, self._on_finish)
        self._chart = pn.pane.Bokeh(None, css_classes=["probes-chart"], sizing_mode="stretch_width")
        self._save_vector = pn.widgets.FileDownload(callback=self._vector_file, filename="probe_vector.safetensors",
                                                    label="Save direction as steering vector", disabled=True,
                                                    css_classes=["probes-save-vector"], width=270)
        self._save_probe = pn.widgets.FileDownload(callback=self._probe_file, filename="probe.safetensors",
                                                   label="Save probe", disabled=True, css_classes=["probes-save-probe"],
                                                   width=150)
        self._layout = self._build_layout(options)

    # ------------------------------------------------------------------ data
    def _data(self):
        if self.dataset == FILE:
            if not self.path.strip():
                raise ProbeError("type the path of a JSONL or CSV file, or pick a built-in set")
            return load_labelled(self.path)
        from explorer.analyses.probes import load_builtin

        return load_builtin(self.dataset)

    def _pairs(self, data):
        if self.dataset != FILE:
            return builtin_pairs(self.dataset)
        if Path(self.path).suffix.lower() == ".jsonl" and '"pos"' in Path(self.path).read_text(encoding="utf-8")[:2000]:
            return load_pairs(self.path)
        if set(data.labels) <= {"true", "false", "1", "0"}:
            return pairs_from_statements(data.texts, [v in ("true", "1") for v in data.labels], data.name,
                                         groups=data.groups)
        raise ExplorerError("CCS needs true/false statements (labels true/false or 1/0) or a pairs file")

    # ------------------------------------------------------------------ running
    @param.depends("run", watch=True)
    def _on_run(self) -> None:
        self.start()

    def start(self) -> Job | None:
        """Start a probe run for the current settings (blocks when the view was made with background=False)."""
        if self._job.running:
            return None
        try:
            data = self._data()
            request = ProbeRequest(data.texts, data.labels, site=self.site, folds=self.folds, data_name=data.name,
                                   groups=data.groups)
            from explorer.analyses.probes import check_request

            check_request(request)
            ccs_request = None
            if self.with_ccs:
                pairs = self._pairs(data)
                ccs_request = CCSRequest(pairs.pos, pairs.neg, pairs.labels, site=self.site, epochs=self.ccs_epochs,
                                         data_name=pairs.name, groups=pairs.groups)
        except ExplorerError as e:
            self.error = f"**Could not start:** {e}"
            return None
        except OSError as e:
            self.error = f"**Could not read the file:** {e}"
            return None
        self.param.update(error="", busy=True, progress=0.0, ccs_result=None, result=None,
                          status=f"Collecting hidden states of {len(request.texts)} texts…")
        self._save_vector.disabled = self._save_probe.disabled = True
        session = self.session

        def work(ctx):
            n_probe = len(request.texts) // request.batch_size + session.n_layers + 2
            n_ccs = 0 if ccs_request is None else 2 * len(ccs_request.pos) // ccs_request.batch_size + 4
            total = n_probe + n_ccs
            probes = run_probes(session, request, ctx=OffsetContext(ctx, 0, total))
            if ccs_request is None or ctx.cancelled:
                return probes, None
            return probes, run_ccs(session, ccs_request, ctx=OffsetContext(ctx, n_probe, total))

        return self._job.start(work, name="probes", background=self.background)

    @param.depends("cancel", watch=True)
    def _on_cancel(self) -> None:
        self._job.cancel()
        if self._job.running:
            self.status = "Stopping after the current layer…"

    def _on_progress(self, progress: Progress, partial) -> None:
        self.progress = progress.fraction
        if isinstance(partial, ProbeResult):
            self.result = partial
        self.status = f"{progress.message or 'working'} · {progress.done}/{progress.total} · {progress.elapsed:.1f} s"

    def _on_finish(self, job: Job) -> None:
        self.busy = False
        if job.error:
            self.error = f"**The probe run failed:** {job.error}"
            if self.result is not None and self.history is not None:
                self.history.add(self.result, f"probes (partial): {self.result.request.data_name}")
            return
        probes, ccs = job.result if job.result is not None else (None, None)
        if probes is None and self.result is not None:
            probes = self.result  # cancelled after some rows: keep what finished
        if probes is None:
            self.status = "Stopped before any layer finished."
            return
        self.param.update(result=probes, ccs_result=ccs, progress=1.0)
        if self.history is not None:
            self.history.add(probes, f"probes: {probes.request.data_name} ({probes.request.site})")
            if ccs is not None:
                self.history.add(ccs, f"CCS: {ccs.request.data_name}")
        done = probes.complete
        self._save_vector.disabled = self._save_probe.disabled = not done or probes.best_row <= 0
        best = f"best {probes.best_label} {probes.accuracy[probes.best_row]:.2f}" if probes.best_row >= 0 else ""
        self.status = (f"{'Stopped' if job.status == CANCELLED else 'Done'} in {job.progress.elapsed:.1f} s · "
                       f"{probes.n} texts · {best} (chance {probes.chance:.2f}, control at best "
                       f"{probes.control_accuracy[probes.best_row]:.2f})"
                       + (f" · CCS best {ccs.best_label} {ccs.accuracy[ccs.best_row]:.2f}" if ccs is not None else ""))
        if done:
            layer = probes.best_row - 1
            self._save_vector.filename = f"probe_vector_{probes.request.data_name}_L{layer}.safetensors"
            self._save_probe.filename = f"probe_{probes.request.data_name}_L{layer}.safetensors"

    # ------------------------------------------------------------------ charts
    @param.depends("result", "ccs_result", watch=True)
    def _update_chart(self) -> None:
        if self.result is None and self.ccs_result is None:
            return
        self._chart.object = pc.probe_curve(self.result, self.ccs_result)

    def _vector_file(self):
        return io.BytesIO(steering_vector_bytes(self.result))

    def _probe_file(self):
        return io.BytesIO(probe_bytes(self.result))

    # ------------------------------------------------------------------ layout
    def _build_layout(self, options) -> pn.viewable.Viewable:
        dataset = pn.widgets.Select.from_param(self.param.dataset, options=options, width=300,
                                               css_classes=["probes-dataset"])
        path = pn.widgets.TextInput.from_param(self.param.path, width=320, css_classes=["probes-path"],
                                               visible=self.param.dataset.rx() == FILE,
                                               placeholder="/path/to/data.jsonl")
        site = pn.widgets.RadioButtonGroup.from_param(self.param.site, margin=(26, 10, 10, 10))
        folds = pn.widgets.IntInput.from_param(self.param.folds, width=80)
        ccs = pn.widgets.Checkbox.from_param(self.param.with_ccs, margin=(30, 10, 10, 10), css_classes=["probes-ccs"])
        epochs = pn.widgets.IntInput.from_param(self.param.ccs_epochs, width=100, visible=self.param.with_ccs)
        run = pn.widgets.Button.from_param(self.param.run, color="primary", width=120, height=36,
                                           margin=(26, 10, 10, 10), disabled=self.param.busy,
                                           css_classes=["probes-run"])
        stop = pn.widgets.Button.from_param(self.param.cancel, width=80, height=36, margin=(26, 10, 10, 10),
                                            visible=self.param.busy, css_classes=["probes-stop"])
        bar = pn.indicators.Progress(value=(self.param.progress.rx() * 100).rx.pipe(int), max=100, width=300,
                                     visible=self.param.busy, css_classes=["probes-progress"])
        error = alert(self.param.error, "probes-error")
        status = pn.pane.Markdown(self.param.status, sizing_mode="stretch_width", css_classes=["probes-status"])
        help_text = pn.pane.Markdown(
            "Held-out accuracy of a logistic-regression probe at every layer (k-fold; items of one *group* stay "
            "in one fold), with a shuffled-label control and the chance line. CCS is trained without labels; "
            "the training pairs' labels only fix its sign.", sizing_mode="stretch_width", styles={"color": "#555"})
        return pn.Column(
            pn.FlexBox(dataset, path, site, folds, ccs, epochs, run, stop, align_items="flex-start",
                       sizing_mode="stretch_width"),
            help_text, error, pn.Row(bar, status, sizing_mode="stretch_width"), self._chart,
            pn.Row(self._save_vector, self._save_probe), sizing_mode="stretch_width", css_classes=["probes-view"])

    def __panel__(self) -> pn.viewable.Viewable:
        return self._layout
