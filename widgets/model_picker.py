"""The sidebar's model picker: attach another local model without restarting the app.

It lists what ``explorer.core.model_catalog.local_models`` finds (a folder the user types, the
project's model cache, the local Hugging Face cache) and takes any other path as free text, or a
model to run on an NDIF server (``--remote``: only its config and tokenizer are read here).
Loading runs as a job off the page's thread; a model that cannot load leaves the current one
attached and says why. ``on_loaded(session)`` (the app's) receives the new ``ModelSession``.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import panel as pn
import param

from explorer.core.errors import ExplorerError
from explorer.core.jobs import DONE, FAILED, Job, JobContext
from explorer.core.model_catalog import ModelChoice, local_models
from explorer.core.session import ModelSession

from .live import LiveJob
from .parts import HELP_STYLE, alert

log = logging.getLogger(__name__)

PICKER_HELP = ("Pick a model found on this machine (a folder you name, the project's cache, the local "
               "Hugging Face cache) or type a model directory, or a model an NDIF server runs (its config "
               "and tokenizer must be here; the key comes from NDIF_API_KEY). The views reset to the new "
               "model; the results so far stay, labelled by model.")

SOURCE_LABELS = {"folder": "folder", "project": "project cache", "hf-cache": "HF cache"}


def choice_label(choice: ModelChoice) -> str:
    """What the list shows for a model: 'org/name (HF cache)', or its note when unsupported."""
    label = f"{choice.name} ({SOURCE_LABELS.get(choice.source, choice.source)})"
    return label if choice.supported else f"{label}: {choice.note}"


class ModelPicker(pn.viewable.Viewer):
    """Lists local models and attaches one; ``catalog`` holds ``local_models`` keyword arguments."""

    folder = param.String(default="", doc="A folder of model directories (or one model directory) to list.")
    selected = param.String(default="", doc="The listed model's directory to attach.")
    path = param.String(default="", doc="Any other model directory (or cached hub id) to attach.")
    status = param.String(default="", doc="What the picker did last (markdown).")
    error = param.String(default="", doc="Why the last load failed; empty when none.")
    loading = param.Boolean(default=False, doc="True while a model loads.")
    remote_model = param.String(default="", doc="A model an NDIF server serves (hub id or its directory).")
    ndif_host = param.String(default="", doc="The NDIF server's URL; empty: NDIF_HOST or ndif.us; "
                                             "'local': serialise each trace as for a server, run it here.")
    attach_listed = param.Event(label="Attach")
    attach_path = param.Event(label="Attach path")
    attach_remote = param.Event(label="Attach remote")
    rescan = param.Event(label="List")

    def __init__(self, on_loaded: Callable[[ModelSession], None], device: str = "auto",
                 catalog: dict | None = None, **params) -> None:
        params.setdefault("ndif_host", os.environ.get("NDIF_HOST", ""))
        super().__init__(**params)
        self.on_loaded = on_loaded
        self.device = device
        self.catalog = dict(catalog or {})
        self.choices: tuple[ModelChoice, ...] = ()
        self.live = LiveJob(lambda _progress, _partial: None, self._finished)
        self._target = ""
        self._t0 = 0.0
        self._select = pn.widgets.Select(label="Local models", options={}, sizing_mode="stretch_width",
                                         css_classes=["model-picker-list"])
        self._select.param.watch(lambda e: setattr(self, "selected", e.new or ""), "value")
        self.refresh()

    # ---------------------------------------------------------------- listing
    def refresh(self) -> tuple[ModelChoice, ...]:
        """Scan again (the typed folder first); only the file system is read."""
        extra = [self.folder.strip()] if self.folder.strip() else []
        if extra and not Path(extra[0]).expanduser().is_dir():
            self.error = f"**Not a folder:** {self.folder.strip()}"
            extra = []
        self.choices = local_models(extra, **self.catalog)
        options = {choice_label(c): c.path for c in self.choices}
        self._select.options = options
        if options:  # the first model that can be attached, else the first listed
            first = next((c for c in self.choices if c.supported), self.choices[0])
            self._select.value = first.path
        self.selected = self._select.value or ""
        if not self.loading:
            self.status = f"{len(self.choices)} local models found." if self.choices else "No local models found."
        return self.choices

    @param.depends("rescan", watch=True)
    def _on_rescan(self) -> None:
        self.error = ""
        self.refresh()

    @param.depends("attach_listed", watch=True)
    def _on_attach_listed(self) -> None:
        if self.selected:
            self.load(self.selected)

    @param.depends("attach_path", watch=True)
    def _on_attach_path(self) -> None:
        if self.path.strip():
            self.load(self.path.strip())
        else:
            self.error = "**Type a model directory** (with config.json) to attach."

    @param.depends("attach_remote", watch=True)
    def _on_attach_remote(self) -> None:
        if self.remote_model.strip():
            self.load(self.remote_model.strip(), remote=True)
        else:
            self.error = "**Type the model** the NDIF server serves (a hub id, or its directory there)."

    # ---------------------------------------------------------------- loading
    def load(self, target: str, background: bool = True, remote: bool = False) -> Job | None:
        """Load ``target`` (a listed directory, another path, a cached hub id) as a job; on success
        ``on_loaded`` gets the session. ``background=False`` blocks (notebooks, tests). ``remote``:
        on the NDIF server ``ndif_host`` names (see ``ModelSession.load``)."""
        if self.live.running:
            return None
        choice = next((c for c in self.choices if c.path == target), None)
        name = choice.name if choice is not None else Path(target).expanduser().name or target
        if remote:
            name += " (NDIF)"
        self._target, self._t0 = name, time.monotonic()
        self.param.update(loading=True, error="", status=f"Loading **{name}**…")
        device = self.device
        host = self.ndif_host.strip()

        def work(ctx: JobContext) -> ModelSession:
            if remote:
                return ModelSession.load(target, remote="local" if host == "local" else True,
                                         ndif_host=None if host in ("", "local") else host)
            session = ModelSession.load(target, device=device)
            if choice is not None:
                session.name = choice.name  # 'org/name', not a cache revision's hash
            return session

        return self.live.start(work, name="load-model", background=background)

    def _finished(self, job: Job) -> None:
        self.loading = False
        name = self._target
        if job.status == FAILED:
            self.param.update(error=f"**Could not attach {name}:** {job.error}. The current model stays attached.",
                              status="")
            return
        if job.status != DONE or job.result is None:
            self.status = "Loading stopped."
            return
        try:
            self.on_loaded(job.result)
        except ExplorerError as e:
            self.param.update(error=f"**Could not attach {name}:** {e}", status="")
            return
        except Exception as e:  # a bug in the switch, not the model: say so, keep the trace
            log.exception("attaching %s failed", name)
            self.param.update(error=f"**Unexpected error** while attaching {name} ({type(e).__name__}: {e}).",
                              status="")
            return
        self.status = f"Attached **{name}** ({time.monotonic() - self._t0:.1f} s)."

    def cancel(self) -> None:
        """Drop a load in flight's result (loading itself cannot be interrupted)."""
        self.live.cancel()

    def __panel__(self) -> pn.viewable.Viewable:
        folder = pn.widgets.TextInput.from_param(self.param.folder, label="Folder of models",
                                                 placeholder="~/models", sizing_mode="stretch_width",
                                                 css_classes=["model-picker-folder"])
        path = pn.widgets.TextInput.from_param(self.param.path, label="Other model directory",
                                               placeholder="/path/to/model", sizing_mode="stretch_width",
                                               css_classes=["model-picker-path"])
        busy = self.param.loading
        rescan = pn.widgets.Button.from_param(self.param.rescan, width=70, css_classes=["model-picker-rescan"],
                                              disabled=busy)
        attach = pn.widgets.Button.from_param(self.param.attach_listed, color="primary", width=90,
                                              css_classes=["model-picker-attach"], disabled=busy)
        attach_path = pn.widgets.Button.from_param(self.param.attach_path, width=120,
                                                   css_classes=["model-picker-attach-path"], disabled=busy)
        remote_model = pn.widgets.TextInput.from_param(self.param.remote_model, label="Remote model (NDIF)",
                                                       placeholder="meta-llama/Llama-3.1-70B",
                                                       sizing_mode="stretch_width", css_classes=["model-picker-remote"])
        ndif_host = pn.widgets.TextInput.from_param(self.param.ndif_host, label="NDIF server",
                                                    placeholder="NDIF_HOST, else https://api.ndif.us",
                                                    sizing_mode="stretch_width", css_classes=["model-picker-host"])
        attach_remote = pn.widgets.Button.from_param(self.param.attach_remote, width=120, disabled=busy,
                                                     css_classes=["model-picker-attach-remote"])
        bar = pn.indicators.Progress(value=-1, active=busy, visible=busy, sizing_mode="stretch_width",
                                     css_classes=["model-picker-progress"], margin=(4, 10))
        return pn.Column(
            folder, rescan, self._select, attach, path, attach_path, remote_model, ndif_host, attach_remote, bar,
            pn.pane.Markdown(self.param.status, css_classes=["model-picker-status"], margin=(0, 10),
                             sizing_mode="stretch_width"),
            alert(self.param.error, "model-picker-error"),
            pn.pane.Markdown(PICKER_HELP, styles=HELP_STYLE, margin=(0, 10), sizing_mode="stretch_width"),
            sizing_mode="stretch_width", css_classes=["model-picker"],
        )


__all__ = ["ModelPicker", "choice_label"]
