"""The Steering tab: build a steering vector from two prompt lists, apply it, sweep α live.

**Build**: two lists typed one prompt per line (or uploaded as text / JSONL files), a layer and a
method; the table shows the token each prompt was read at. The vector can be saved (safetensors)
and loaded again; the Generate tab uses the current one. **Apply**: the target token at the last
position without and with α·v (or with the direction ablated at every layer). **Sweep**: the
metric against α as a job whose chart fills in live, and the steered text for chosen α values.
**Steering vs the pronoun swap** (``steering_compare``): the bias probes and held-out loss under
steering at each α and the direction ablated, beside a swap run's control and swapped arms.
"""
from __future__ import annotations

import asyncio
import io
import logging
import tempfile
from pathlib import Path

import panel as pn
import param

from explorer.core.errors import ExplorerError
from explorer.core.session import ModelSession
from explorer.interventions.steering import (
    METHODS,
    BuildRequest,
    SteeringVector,
    SteerRequest,
    SteerSweepRequest,
    SteerSweepResult,
    build_vector,
    load_vector,
    parse_alphas,
    steer_apply,
    steer_sweep,
    vector_bytes,
)
from explorer.persistence.history import History

from . import steering_charts as sc
from .live import LiveJob
from .parts import alert
from .steering_compare import SteerComparePart

log = logging.getLogger(__name__)

POSITIVE = "I love this movie\nWhat a wonderful day\nThe food was delicious"
NEGATIVE = "I hate this movie\nWhat a terrible day\nThe food was disgusting"


def lines_of(text: str) -> tuple[str, ...]:
    return tuple(line for line in text.splitlines() if line.strip())


def file_lines(data: bytes, name: str) -> str:
    """An uploaded prompt file as one prompt per line (JSONL rows: their 'text')."""
    import json

    text = data.decode("utf-8", errors="replace")
    if not name.endswith((".jsonl", ".json")):
        return text
    out = []
    for line in text.splitlines():
        if line.strip():
            row = json.loads(line)
            out.append(row.get("text", "") if isinstance(row, dict) else str(row))
    return "\n".join(out)


class SteeringView(pn.viewable.Viewer):
    """Steering vectors on one ModelSession; usable alone: ``SteeringView(session)``."""

    positive = param.String(default=POSITIVE, label="Positive prompts (one per line)")
    negative = param.String(default=NEGATIVE, label="Negative prompts (one per line)")
    layer = param.Integer(default=None, allow_None=True, label="Layer")
    method = param.Selector(default="mean", objects=list(METHODS), label="Method")
    build = param.Event(label="Build vector")
    vector = param.ClassSelector(class_=SteeringVector, default=None, allow_None=True)
    sae_dir = param.String(default="", label="SAE folder",
                           doc="An SAE in the SAELens layout: a feature's decoder direction becomes the vector.")
    sae_feature = param.Integer(default=0, bounds=(0, None), label="Feature")
    from_feature = param.Event(label="Vector from feature",
                               doc="The feature's decoder row, normalised to length 1, at the SAE's layer.")

    prompt = param.String(default="I think this film is", label="Prompt")
    target = param.String(default=" great", label="Target token")
    compare_token = param.String(default=" bad", label="Compare token (optional)")
    alpha = param.Number(default=4.0, label="α")
    positions = param.Selector(default="all", objects=["all", "last"], label="Add at")
    apply = param.Event(label="Apply")
    ablate = param.Event(label="Ablate direction")
    alphas = param.String(default="-8,-4,-2,0,2,4,8", label="α values")
    text_alphas = param.String(default="-8,8", label="Steered text at α")
    sweep = param.Event(label="Sweep α")
    cancel = param.Event(label="Stop")

    sweep_result = param.ClassSelector(class_=SteerSweepResult, default=None, allow_None=True)
    busy = param.Boolean(default=False)
    running = param.Boolean(default=False)
    status = param.String(default="Type two prompt lists and press **Build vector**.")
    error = param.String(default="")

    def __init__(self, session: ModelSession, history: History | None = None, **params) -> None:
        params.setdefault("layer", session.n_layers // 3)
        super().__init__(**params)
        self.session = session
        self.history = history
        self._live = LiveJob(self._on_sweep_progress, self._on_sweep_finish)
        self._vector_pane = pn.pane.HTML("", css_classes=["steer-vector"], stylesheets=[sc.TABLE_CSS])
        self._apply_pane = pn.pane.HTML("", css_classes=["steer-apply"], stylesheets=[sc.TABLE_CSS])
        self._sweep_pane = pn.pane.Bokeh(None, css_classes=["steer-sweep-chart"], sizing_mode="stretch_width")
        self._texts_pane = pn.pane.HTML("", css_classes=["steer-texts"], stylesheets=[sc.TABLE_CSS])
        self._pos_file = pn.widgets.FileInput(accept=".txt,.jsonl", css_classes=["steer-pos-file"])
        self._neg_file = pn.widgets.FileInput(accept=".txt,.jsonl", css_classes=["steer-neg-file"])
        self._vec_file = pn.widgets.FileInput(accept=".safetensors", css_classes=["steer-load"])
        self._pos_file.param.watch(lambda e: self._read_list("positive", e.new, self._pos_file.filename), "value")
        self._neg_file.param.watch(lambda e: self._read_list("negative", e.new, self._neg_file.filename), "value")
        self._vec_file.param.watch(lambda e: self.load_bytes(e.new), "value")
        self._save = pn.widgets.FileDownload(callback=self._vector_file, filename="steering-vector.safetensors",
                                             label="Save vector", css_classes=["steer-save"])
        self.compare = SteerComparePart(session, history, vector=lambda: self.vector)
        self._layout = self._build_layout()

    # -------------------------------------------------------------------- build
    def _read_list(self, which: str, data: bytes | None, name: str | None) -> None:
        if data:
            try:
                setattr(self, which, file_lines(data, name or ""))
            except ValueError as e:
                self.error = f"**Cannot read {name}:** {e}"

    def build_request(self) -> BuildRequest:
        if self.layer is None:
            raise ExplorerError("give the layer the vector is read at")
        return BuildRequest(lines_of(self.positive), lines_of(self.negative), self.layer, self.method)

    @param.depends("build", watch=True)
    async def _on_build(self) -> None:
        await self.run_model(lambda: build_vector(self.session, self.build_request()), self._built)

    def _built(self, vec: SteeringVector) -> None:
        self.vector = vec
        if self.history is not None:
            self.history.add(vec, f"steering vector L{vec.layer} ({vec.method})")
        self.status = f"Built a **{vec.method}** vector at L{vec.layer} (norm {vec.norm:.2f})."

    @param.depends("vector", watch=True)
    def _update_vector(self) -> None:
        self._vector_pane.object = "" if self.vector is None else sc.vector_html(self.vector)

    @param.depends("from_feature", watch=True)
    def _on_from_feature(self) -> None:
        self.vector_from_feature()

    def vector_from_feature(self) -> None:
        """Make feature ``sae_feature``'s unit decoder row (``sae_dir``) the current vector."""
        from explorer.core.fingerprint import model_fingerprint
        from explorer.features.edits import feature_vector, sae_for

        try:
            if not self.sae_dir.strip():
                raise ExplorerError("give the SAE folder (cfg.json + sae_weights.safetensors)")
            vec = feature_vector(sae_for(self.session, self.sae_dir.strip()), self.sae_feature,
                                 model=self.session.name, fingerprint=model_fingerprint(self.session))
        except ExplorerError as e:
            self.error = f"**Cannot use the feature:** {e}"
            return
        self.error = ""
        self._built(vec)

    def load_bytes(self, data: bytes | None) -> None:
        """Load a vector file's bytes (the Load button)."""
        if not data:
            return
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "vector.safetensors"
            path.write_bytes(data)
            try:
                vec = load_vector(path, self.session)
            except ExplorerError as e:
                self.error = f"**Cannot load the vector:** {e}"
                return
        self.error = ""
        self._built(vec)

    def _vector_file(self) -> io.BytesIO:
        if self.vector is None:
            self.error = "**No vector to save yet.**"
            return io.BytesIO(b"")
        return io.BytesIO(vector_bytes(self.vector))

    # -------------------------------------------------------------------- apply
    def _steer_request(self, mode: str) -> SteerRequest:
        if self.vector is None:
            raise ExplorerError("build or load a vector first")
        return SteerRequest(self.prompt, self.target, self.vector, layer=None, alpha=self.alpha,
                            positions=self.positions, mode=mode, compare_token=self.compare_token or None)

    @param.depends("apply", watch=True)
    async def _on_apply(self) -> None:
        await self.run_model(lambda: steer_apply(self.session, self._steer_request("add")), self._applied)

    @param.depends("ablate", watch=True)
    async def _on_ablate(self) -> None:
        await self.run_model(lambda: steer_apply(self.session, self._steer_request("ablate")), self._applied)

    def _applied(self, result) -> None:
        if self.history is not None:
            self.history.add(result, f"steer apply: {self.prompt[:30]}")
        self._apply_pane.object = sc.apply_html(result)

    async def run_model(self, fn, done) -> None:
        """Run ``fn`` in a worker thread; ``done(result)`` on success, the error shown otherwise."""
        if self.busy:
            return
        self.busy = True
        self.error = ""
        try:
            result = await asyncio.to_thread(fn)
        except ExplorerError as e:
            self.error = f"**{e}**"
            return
        except Exception as e:
            log.exception("steering failed")
            self.error = f"**Unexpected error** ({type(e).__name__}: {e}). Details are in the server log."
            return
        finally:
            self.busy = False
        done(result)

    # -------------------------------------------------------------------- sweep
    def sweep_request(self) -> SteerSweepRequest:
        if self.vector is None:
            raise ExplorerError("build or load a vector first")
        texts = parse_alphas(self.text_alphas) if self.text_alphas.strip() else ()
        return SteerSweepRequest(self.prompt, self.target, self.vector, alphas=parse_alphas(self.alphas),
                                 positions=self.positions, compare_token=self.compare_token or None,
                                 text_alphas=texts)

    @param.depends("sweep", watch=True)
    def _on_sweep(self) -> None:
        self.start_sweep()

    @param.depends("cancel", watch=True)
    def _on_cancel(self) -> None:
        self._live.cancel()

    def close(self) -> None:
        """Stop a running alpha sweep (the app closes its session)."""
        self._live.cancel()
        self.compare.close()

    def start_sweep(self, background: bool = True) -> None:
        request = self._live.begin(self.sweep_request, self)
        if request is None:
            return
        self.param.update(error="", running=True, sweep_result=None, status="Sweeping α…")
        self._live.start(lambda ctx: steer_sweep(self.session, request, ctx=ctx), name="steer-sweep",
                         background=background)

    def _on_sweep_progress(self, progress, partial) -> None:
        if partial is not None:
            self.sweep_result = partial
        self.status = f"Sweeping α… {progress.done} / {progress.total} ({progress.message})"

    def _on_sweep_finish(self, job) -> None:
        if self._live.failed(job, self, "**The sweep failed:** {}"):
            return
        if job.result is not None:
            self.sweep_result = job.result
            if self.history is not None and job.result.complete:
                self.history.add(job.result, f"steer sweep: {self.prompt[:30]}")
            self.status = f"Sweep done: {job.result.done} of {job.result.total}."

    @param.depends("sweep_result", watch=True)
    def _update_sweep(self) -> None:
        r = self.sweep_result
        self._sweep_pane.object = None if r is None else sc.sweep_chart(r)
        self._texts_pane.object = "" if r is None else sc.texts_html(r)

    # ------------------------------------------------------------------- layout
    def _build_layout(self) -> pn.viewable.Viewable:
        w = pn.widgets
        lists = pn.Row(
            pn.Column(w.TextAreaInput.from_param(self.param.positive, rows=5, width=330, css_classes=["steer-pos"]),
                      self._pos_file),
            pn.Column(w.TextAreaInput.from_param(self.param.negative, rows=5, width=330, css_classes=["steer-neg"]),
                      self._neg_file),
            pn.Column(w.IntInput.from_param(self.param.layer, width=100, css_classes=["steer-layer"]),
                      w.Select.from_param(self.param.method, width=100),
                      w.Button.from_param(self.param.build, color="primary", width=130,
                                          disabled=self.param.busy, css_classes=["steer-build"]),
                      self._save, self._vec_file),
            pn.Column(w.TextInput.from_param(self.param.sae_dir, width=200, css_classes=["steer-sae"],
                                             placeholder="e.g. runs/sae-l12"),
                      w.IntInput.from_param(self.param.sae_feature, width=100, css_classes=["steer-sae-feature"]),
                      w.Button.from_param(self.param.from_feature, width=160, css_classes=["steer-from-feature"])))
        apply_row = pn.Row(
            w.TextInput.from_param(self.param.prompt, width=280, css_classes=["steer-prompt"]),
            w.TextInput.from_param(self.param.target, width=110),
            w.TextInput.from_param(self.param.compare_token, width=150),
            w.FloatInput.from_param(self.param.alpha, width=80),
            w.Select.from_param(self.param.positions, width=90),
            pn.Column(w.Button.from_param(self.param.apply, width=110, disabled=self.param.busy,
                                          css_classes=["steer-apply-button"]),
                      w.Button.from_param(self.param.ablate, width=140, disabled=self.param.busy)))
        sweep_row = pn.Row(
            w.TextInput.from_param(self.param.alphas, width=220, css_classes=["steer-alphas"]),
            w.TextInput.from_param(self.param.text_alphas, width=140),
            w.Button.from_param(self.param.sweep, color="primary", width=110, disabled=self.param.running,
                                css_classes=["steer-sweep-button"]),
            w.Button.from_param(self.param.cancel, width=80, disabled=self.param.running.rx.not_()))
        error = alert(self.param.error, "steer-error")
        status = pn.pane.Markdown(self.param.status, css_classes=["steer-status"])
        return pn.Column(lists, error, status, self._vector_pane, pn.layout.Divider(), apply_row, self._apply_pane,
                         pn.layout.Divider(), sweep_row, pn.Row(self._sweep_pane, self._texts_pane,
                                                                sizing_mode="stretch_width"),
                         pn.layout.Divider(), self.compare,
                         sizing_mode="stretch_width", css_classes=["steering-view"], loading=self.param.busy)

    def __panel__(self) -> pn.viewable.Viewable:
        return self._layout
