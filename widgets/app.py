"""The app shell: a page template with the model card in the sidebar and one tab per view.

The model (``ModelSession``) is created once per process and shared; each browser session
gets its own views (``create_app`` runs once per session).
"""
from __future__ import annotations

import functools
import html
import io
import logging
from collections.abc import Callable, Sequence

import panel as pn
import param
from panel_material_ui import Page

from explorer.core.session import ModelSession
from explorer.persistence.history import History
from explorer.persistence.snapshot import SnapshotError, model_identity, snapshot_bytes, snapshot_of

from .ablation_view import AblationView
from .export import snapshot_page
from .feature_view import FeatureView
from .generate_view import GenerateView
from .heads_view import HeadsView
from .intervention_view import InterventionView
from .lens_view import LogitLensView
from .live import served_doc
from .model_picker import ModelPicker
from .neuron_view import NeuronView
from .parts import alert, outline_secondary_buttons
from .patchscope_view import PatchscopeView
from .probes_view import ProbesView
from .sae_train_view import SAETrainView
from .snapshot_view import SnapshotView
from .steering_view import SteeringView

log = logging.getLogger(__name__)

TITLE = "Interp Explorer"
ACCENT = "#2c5d8f"


def human_count(n: int) -> str:
    """A parameter count for people: 134515008 -> '134.5 M'."""
    for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return str(n)


def model_card(session: ModelSession) -> str:
    """HTML describing the attached model (what the sidebar shows)."""
    info = session.info()
    heads = f"{info.n_heads}" if info.n_kv_heads == info.n_heads else f"{info.n_heads} ({info.n_kv_heads} KV)"
    rows = [
        ("architecture", info.architecture),
        ("layers", info.n_layers),
        ("heads", heads),
        ("d_model", info.d_model),
        ("parameters", human_count(info.n_params)),
        ("device", info.device),
        ("dtype", info.dtype),
    ]
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return (f'<div class="model-name">{html.escape(info.name)}</div>'
            f'<table class="model-table">{cells}</table>')


MODEL_CARD_CSS = """
.model-name { font-weight: 600; font-size: 15px; margin: 2px 0 8px 0; word-break: break-word; }
.model-table { border-collapse: collapse; width: 100%; font-size: 13px; }
.model-table th { text-align: left; font-weight: normal; color: #666; padding: 3px 8px 3px 0; }
.model-table td { text-align: right; padding: 3px 0; font-variant-numeric: tabular-nums; }
.model-table tr + tr { border-top: 1px solid #e6e6e6; }
"""


# The sidebar's help follows the tab in front (a snapshot tab gets SNAPSHOT_TAB_HELP).
TAB_HELP = {
    "Logit lens": (
        "### Reading the lens\nEach row reads the residual stream after a layer through the final norm and the "
        "unembedding; each cell shows that row's **top-1 token**. Hover a cell for its top-k, entropy and KL to "
        "the final layer. **Click a cell** to track its token across layers. Tick *Compare* to see where a "
        "second prompt changes the answer."),
    "Heads": (
        "### Reading the heads\nEach cell is a head (**L.H**, layer.head, higher layers on top), coloured by its "
        "score: induction and duplicate-token scores come from a repeated random sequence; DLA is the head's "
        "direct push on the target's logit. Pick heads to overlay their attention patterns."),
    "Ablation": (
        "### Ablating\n**Single ablation** removes the listed components together and compares the target's "
        "logit, probability and rank. **Sweep** ablates each head / block / neuron alone; click a bar or cell "
        "to put it in the single-ablation field. **Activation patching** restores clean activations in a "
        "corrupted run, cell by cell. Each section keeps its own inputs."),
    "Neurons": (
        "### Neurons\nOpen or build an index of every MLP neuron's top examples over a corpus, search the "
        "descriptions (or `token: he`), and open a neuron's card (**L:N**, layer:neuron): its examples shaded by "
        "activation, statistics, and its activation on your prompt. *Ablate this neuron* opens the ablation tab."),
    "Pronoun swap": (
        "### Pronoun swap\nPreview how a corpus changes when its pronouns are swapped, then fine-tune two copies "
        "of the model (original and swapped text) and watch the bias metrics move. *Across checkpoints* "
        "compares saved checkpoints on a prompt."),
    "Probes": (
        "### Probes\nA linear probe per layer reads a label (e.g. true/false) from the hidden states; the curve "
        "shows held-out accuracy per layer. *Also CCS* adds the unsupervised contrast-consistent probe."),
    "Patchscope": (
        "### Patchscope\nEach cell patches one block's hidden state at one position into an identity prompt "
        "and shows what the model then says (colour = its probability). Click a cell for its top-k."),
    "Generate": (
        "### Generating\nThe model continues your prompt, token by token, as it produces them (**Stop** ends it "
        "within one token). Give arm **B** an intervention (ablated components, the Steering tab's vector, or "
        "its direction ablated) to see both arms side by side with the same seed. **Click a generated token** "
        "for its logit-lens column and the chosen token's rank per layer."),
    "Steering": (
        "### Steering\nBuild a direction at a layer from two prompt lists (mean of differences, first principal "
        "component, or logistic regression), then add α times it to the residual stream. *Apply* compares the "
        "target's logit with and without it; *Sweep* charts it against α with the steered text."),
    "Train SAE": (
        "### Sparse autoencoders\nTrain a TopK SAE on one layer's residual (or MLP output) over a corpus: FVU, "
        "L0, dead latents and the loss with the reconstruction spliced in fill in live; *Cancel* keeps a "
        "checkpoint, *Resume* continues it. Encode a prompt to see which features fire where."),
    "Features": (
        "### Features\nBrowse an SAE's features as the Neurons tab browses neurons, through the same index: "
        "*Build index* (or *Open*) for the SAE folder, then a feature's **card**: top examples shaded by "
        "activation, its histogram, top inputs (the tokens it fires on; the embedding through its encoder "
        "direction) and the output tokens its decoder direction promotes. Search descriptions (or `token: he`), "
        "ask which features fire on your own text, and compare features with the neurons of the same layer."),
}
SNAPSHOT_TAB_HELP = ("### A saved snapshot\nEvery chart as it was saved, without running the model. "
                     "*Continue from here* loads a result's settings into its live tab.")

# Runs in the browser when the tab in front changes: land at the top of the new tab (the page
# otherwise keeps the old tab's scroll position, far below the new tab's fields).
SCROLL_TOP_JS = """
setTimeout(() => {
  window.scrollTo(0, 0)
  const tall = 0.5 * window.innerHeight  // page-sized scroll boxes only, not a card's example list
  const walk = (root) => {
    for (const el of root.querySelectorAll('*')) {
      if (el.scrollTop > 0 && el.clientHeight >= tall) el.scrollTop = 0
      if (el.shadowRoot) walk(el.shadowRoot)
    }
  }
  walk(document)
}, 50)
"""

# Panel's download links look like plain text in the material page: make them look like buttons
# (white on the accent colour: 7.0:1).
DOWNLOAD_CSS = f"""
.bk-btn {{ background-color: {ACCENT} !important; color: #ffffff !important; border: 1px solid {ACCENT} !important;
          border-radius: 4px; font-weight: 500; }}
.bk-btn:hover {{ filter: brightness(1.15); }}
"""

SNAPSHOT_HELP = ("**Save snapshot** downloads every result of this session (a .zip that reopens here or in a "
                 "notebook); **Export HTML** a standalone page of their charts. **Open snapshot** shows a saved "
                 ".zip in a new tab, without running the model.")


class ExplorerApp(pn.viewable.Viewer):
    """All views on one model: ``__panel__`` is the tabs (for notebooks), ``template()`` the page."""

    snapshot_error = param.String(default="", doc="Why the last snapshot could not be opened; empty when none.")
    snapshot_status = param.String(default="", doc="What the last snapshot action did (markdown).")
    help = param.String(default=TAB_HELP["Logit lens"], doc="The sidebar's help for the tab in front (markdown).")
    card = param.String(default="", doc="The attached model's card (HTML).")

    def __init__(self, session: ModelSession, **params) -> None:
        super().__init__(**params)
        self.session = session
        self.history = History()  # this browser session's results (the model session is shared)
        self.snapshots: list[SnapshotView] = []  # snapshots opened in this session, one tab each
        self._page: Page | None = None  # the template, once made (its pn.state watchers go on close)
        self.card = model_card(session)
        self._tabs = pn.Tabs(*self._build_views(session), sizing_mode="stretch_width",
                             css_classes=["explorer-tabs"])
        outline_secondary_buttons(self._tabs)
        # Attach another model from the sidebar: the views are rebuilt on it, the history stays.
        self.picker = ModelPicker(self.attach, device=session.device.type)
        self._tabs.param.watch(self._on_tab, "active")
        self._tabs.jscallback(active=SCROLL_TOP_JS)
        self._save = pn.widgets.FileDownload(callback=self.snapshot_file, filename="interp-explorer-snapshot.zip",
                                             label="Save snapshot", css_classes=["save-snapshot"],
                                             stylesheets=[DOWNLOAD_CSS],
                                             sizing_mode="stretch_width")
        self._export = pn.widgets.FileDownload(callback=self.html_file, filename="interp-explorer-snapshot.html",
                                               label="Export HTML", css_classes=["export-html"],
                                               stylesheets=[DOWNLOAD_CSS],
                                               sizing_mode="stretch_width")
        self._open = pn.widgets.FileInput(accept=".zip", css_classes=["open-snapshot"], sizing_mode="stretch_width")
        self._open.param.watch(self._on_upload, "value")
        if served_doc() is not None:
            # A closed browser tab: stop this session's jobs and drop its results (the model stays).
            pn.state.on_session_destroyed(self._on_session_destroyed)

    def _build_views(self, session: ModelSession) -> list[tuple[str, pn.viewable.Viewable]]:
        """One view per tab on ``session``, wired to each other; returns the (name, view) tabs."""
        self.lens = LogitLensView(session, history=self.history)
        self.heads = HeadsView(session, history=self.history)
        self.ablation = AblationView(session, history=self.history)
        self.neurons = NeuronView(session, history=self.history)
        self.swap = InterventionView(session, history=self.history)
        self.generate = GenerateView(session, history=self.history)
        self.steering = SteeringView(session, history=self.history)
        # The Generate tab steers with the Steering tab's current vector.
        self.steering.param.watch(lambda e: setattr(self.generate.form, "vector", e.new), "vector")
        # The Steering tab's swap comparison offers the Pronoun swap tab's current run.
        self.swap.run_part.param.watch(lambda e: setattr(self.steering.compare, "session_run",
                                                         e.new.out_dir if e.new is not None else ""), "result")
        self.sae = SAETrainView(session, history=self.history)
        self.features = FeatureView(session, history=self.history)
        # The last trained SAE's folder is the Features tab's default.
        self.sae.param.watch(lambda e: setattr(self.features, "sae_path", e.new) if not self.features.sae_path
                             else None, "sae_path")
        self.probes = ProbesView(session, history=self.history)
        self.patchscope = PatchscopeView(session, history=self.history)
        # "Ablate this neuron / all hits" in the neuron tab: select them in the ablation tab, show it.
        ablation_tab = 2  # the tabs' order below
        self.neurons.param.watch(lambda e: (self.ablation.select_components(list(e.new)),
                                            setattr(self._tabs, "active", ablation_tab)), "ablate_request")
        return [
            ("Logit lens", self.lens),
            ("Heads", self.heads),
            ("Ablation", self.ablation),
            ("Neurons", self.neurons),
            ("Pronoun swap", self.swap),
            ("Generate", self.generate),
            ("Steering", self.steering),
            ("Probes", self.probes),
            ("Patchscope", self.patchscope),
            ("Train SAE", self.sae),
            ("Features", self.features),
        ]

    def attach(self, session: ModelSession) -> None:
        """Switch this browser session to another model: its jobs stop, every view is rebuilt on
        ``session`` (inputs back to their defaults), snapshot tabs and the history stay, and
        results are labelled by model from now on."""
        old = self.session
        self._stop_views()
        tabs = self._build_views(session)
        snapshot_tabs = list(zip(self._tabs._names, self._tabs.objects))[len(tabs):]
        self.history.switch_model(old.name, session.name)
        self.session = session
        for view in self.snapshots:  # "Continue from here" checks and uses the attached model
            view.attach(session, {"lens": self.lens, "heads": self.heads, "ablation": self.ablation})
        with pn.io.hold():
            self._tabs[:] = tabs + snapshot_tabs
            self._tabs.active = 0
            outline_secondary_buttons(self._tabs)
            self.card = model_card(session)
        self.help = TAB_HELP["Logit lens"]

    def _on_tab(self, event) -> None:
        names = self._tabs._names
        name = names[event.new] if 0 <= event.new < len(names) else ""
        self.help = TAB_HELP.get(name, SNAPSHOT_TAB_HELP if name.startswith("Snapshot") else "")

    # ---------------------------------------------------------------- snapshots
    def snapshot(self):
        """This session's history as a snapshot in memory (with the model's identity)."""
        return snapshot_of(self.history.entries, model_identity(self.session))

    def snapshot_file(self) -> io.BytesIO:
        """The "Save snapshot" download: every result of this session as a snapshot zip."""
        entries = self.history.entries
        data = snapshot_bytes(entries, model_identity(self.session))
        self.snapshot_status = f"Saved {len(entries)} results ({len(data) / 1e6:.1f} MB)."
        return io.BytesIO(data)

    def html_file(self) -> io.BytesIO:
        """The "Export HTML" download: a standalone page with every result's charts."""
        page = snapshot_page(self.snapshot(), title=f"{TITLE} snapshot")
        self.snapshot_status = f"Exported {len(self.history)} results as HTML."
        return io.BytesIO(page.encode("utf-8"))

    def _on_upload(self, event) -> None:
        if event.new:
            self.open_snapshot(event.new, self._open.filename or "snapshot.zip")

    def open_snapshot(self, data, name: str = "snapshot") -> SnapshotView | None:
        """Show a snapshot (a path, bytes or a Snapshot) in a new tab; a bad file is reported, not raised."""
        views = {"lens": self.lens, "heads": self.heads, "ablation": self.ablation}
        try:
            view = SnapshotView(data, session=self.session, views=views, on_continue=self._show_view, name=name)
        except SnapshotError as e:
            self.param.update(snapshot_error=f"**Could not open {html.escape(name)}:** {e}", snapshot_status="")
            return None
        except Exception as e:  # a bug, not the file: tell the user, log the traceback
            log.exception("opening a snapshot failed")
            self.param.update(snapshot_error=f"**Unexpected error** ({type(e).__name__}: {e}).", snapshot_status="")
            return None
        close = pn.widgets.Button(label="Close this snapshot", width=170, css_classes=["close-snapshot"])
        tab = pn.Column(close, view, sizing_mode="stretch_width")
        close.on_click(lambda _event: self.close_snapshot(view, tab))
        self.snapshots.append(view)
        self._tabs.append((f"Snapshot: {name}", tab))
        self._tabs.active = len(self._tabs) - 1
        self.param.update(snapshot_error="", snapshot_status=f"Opened {html.escape(name)}: "
                                                             f"{len(view.snapshot.entries)} results.")
        return view

    def close_snapshot(self, view: SnapshotView, tab: pn.viewable.Viewable) -> None:
        self.snapshots = [v for v in self.snapshots if v is not view]
        self._tabs.objects = [obj for obj in self._tabs.objects if obj is not tab]
        self._tabs.active = 0

    def _show_view(self, kind: str) -> None:
        """Continue from a snapshot: bring the live view's tab to the front."""
        self._tabs.active = {"lens": 0, "heads": 1, "ablation": 2}[kind]

    # ---------------------------------------------------------------- closing
    def close(self) -> None:
        """Stop this session's jobs and drop its results (the shared model session stays)."""
        self._stop_views()
        self.picker.cancel()  # a model still loading is dropped when it ends
        self.history.close()  # a job that ends after this (its partial result) adds nothing
        self.snapshots.clear()
        if self._page is not None:
            drop_state_watchers(self._page)
            self._page = None

    def _stop_views(self) -> None:
        """Stop the views' running jobs (each keeps what its checkpoint holds)."""
        self.ablation.close()
        self.swap.close()  # a running intervention stops after its step, checkpointed
        self.sae.close()   # a running SAE training stops after its forward pass, checkpointed
        self.features.close()  # a feature index build stops after its batch, checkpointed
        self.generate.close()  # a generation stops within one token
        self.steering.close()  # an alpha sweep stops after its current value
        self.neurons.close()  # a running index build keeps its checkpoint

    def _on_session_destroyed(self, session_context) -> None:
        try:
            self.close()
        except Exception:  # never let one session's cleanup break the server's
            log.exception("closing a session's app failed")

    def sidebar(self) -> list[pn.viewable.Viewable]:
        return [
            pn.pane.Markdown("### Model", margin=(0, 10)),
            pn.pane.HTML(self.param.card, css_classes=["model-card"], sizing_mode="stretch_width",
                         stylesheets=[MODEL_CARD_CSS]),
            pn.Card(self.picker, title="Attach another model", collapsed=True, sizing_mode="stretch_width",
                    css_classes=["model-picker-card"], margin=(4, 0)),
            pn.pane.Markdown("### Snapshot", margin=(10, 10, 0, 10)),
            self._save,
            self._export,
            pn.pane.Markdown("Open snapshot (.zip)", margin=(6, 10, 0, 10)),
            self._open,
            alert(self.param.snapshot_error, "snapshot-open-error"),
            pn.pane.Markdown(self.param.snapshot_status, css_classes=["snapshot-status-line"],
                             sizing_mode="stretch_width", margin=(0, 10)),
            pn.pane.Markdown(SNAPSHOT_HELP, css_classes=["snapshot-help"], sizing_mode="stretch_width",
                             styles={"font-size": "12px", "color": "#555"}),
            pn.pane.Markdown(self.param.help, css_classes=["how-to-read", "tab-help"], sizing_mode="stretch_width"),
        ]

    def template(self) -> Page:
        """The full page: header, the model card in the sidebar, the tabs in the main area."""
        # panel-material-ui's Page (a dependency of panel 1.9) bundles its fonts; panel's FAST
        # templates fetch Open Sans from Google, which fails on an offline machine.
        self._page = Page(
            title=TITLE,
            sidebar=self.sidebar(),
            main=[self._tabs],
            sidebar_width=280,
            theme_toggle=False,
            theme_config={"palette": {"primary": {"main": ACCENT}}},
        )
        return self._page

    def __panel__(self) -> pn.viewable.Viewable:
        return self._tabs


def drop_state_watchers(owner: object) -> int:
    """Remove the watchers ``owner`` put on the process-wide ``pn.state`` (e.g. the Page's busy
    indicator), which would otherwise keep a closed session's whole app alive; returns how many."""
    removed = 0
    for what in pn.state.param.watchers.values():
        for watchers in what.values():
            for w in list(watchers):
                if _watcher_owner(w.fn) is owner:
                    pn.state.param.unwatch(w)
                    removed += 1
    return removed


def _watcher_owner(fn) -> object:
    """The object a watcher's callback belongs to: a bound method's instance, the instance behind
    a ``.param`` method (param's reference syncing: ``Page(busy=pn.state.param.busy)``), or that of
    a function wrapped in a partial."""
    if isinstance(fn, functools.partial):
        fn = fn.keywords.get("function", fn.func)
    target = getattr(fn, "__self__", None)
    if isinstance(target, param.parameterized.Parameters):
        target = target.self
    return target


def create_app(session: ModelSession) -> Page:
    """One browser session's page (call once per session; the model session is shared)."""
    pn.extension(notifications=False)
    return ExplorerApp(session).template()


def websocket_origins(address: str, port: int, allow: Sequence[str] | str | None = None) -> list[str]:
    """Origins allowed to open the app's websocket: only the served address unless told otherwise."""
    if allow:
        return [allow] if isinstance(allow, str) else list(allow)
    origins = [f"{address}:{port}"]
    if address == "127.0.0.1":
        origins.append(f"localhost:{port}")
    return origins


def app_factory(session: ModelSession) -> Callable[[], Page]:
    """What ``pn.serve`` calls per browser session."""
    return lambda: create_app(session)


def session_options(unused_session_lifetime_ms: int = 15_000, check_unused_sessions_ms: int = 5_000,
                    max_message_mb: int = 100) -> dict:
    """Bokeh server settings for per-session state.

    A closed tab's session (its views, results and snapshot tabs) is destroyed once it has had
    no connection for ``unused_session_lifetime_ms``, checked every ``check_unused_sessions_ms``
    (bokeh's defaults, 15 s and 17 s, keep a closed tab's state up to ~32 s; here up to 20 s).
    The lifetime also gives a freshly served page time to connect. Uploaded snapshots travel
    over the websocket, hence a message cap above bokeh's 20 MB.
    """
    return {"unused_session_lifetime_milliseconds": unused_session_lifetime_ms,
            "check_unused_sessions_milliseconds": check_unused_sessions_ms,
            "websocket_max_message_size": max_message_mb * 2**20}


def serve_app(
    session: ModelSession,
    port: int = 5006,
    address: str = "127.0.0.1",
    allow_websocket_origin: Sequence[str] | str | None = None,
    show: bool = False,
    num_threads: int | None = None,
    **options,
) -> None:
    """Serve the app at http://{address}:{port}/ and block until interrupted.

    ``options`` override ``session_options()`` (e.g. ``unused_session_lifetime_ms``).
    """
    origins = websocket_origins(address, port, allow_websocket_origin)
    print(f"{TITLE} at http://{address}:{port}", flush=True)
    pn.serve(
        app_factory(session),  # a single callable is served at the root URL "/"
        port=port,
        address=address,
        websocket_origin=origins,
        show=show,
        num_threads=num_threads,
        title=TITLE,
        verbose=False,  # our own line above names the real address, not "localhost"
        **session_options(**options),
    )


__all__ = ["ExplorerApp", "create_app", "serve_app", "session_options", "websocket_origins", "human_count",
           "model_card"]
