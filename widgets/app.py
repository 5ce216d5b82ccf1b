"""The app shell: a page template with the model card in the sidebar and one tab per view.

The model (``ModelSession``) is created once per process and shared; each browser session
gets its own views (``create_app`` runs once per session).
"""
from __future__ import annotations

import html
from typing import Callable, Sequence

import panel as pn
from panel_material_ui import Page

from explorer.history import History
from explorer.session import ModelSession

from .ablation_view import AblationView
from .heads_view import HeadsView
from .lens_view import LogitLensView
from .neuron_view import NeuronView

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


HOW_TO_READ = """
### Reading the lens
Each row reads the residual stream after a layer through the final norm and the
unembedding; each cell shows that row's **top-1 token**. Hover a cell for its top-k,
entropy and KL to the final layer. **Click a cell** to track its token across layers.
Tick *Compare* to see where a second prompt changes the answer.
"""


class ExplorerApp(pn.viewable.Viewer):
    """All views on one model: ``__panel__`` is the tabs (for notebooks), ``template()`` the page."""

    def __init__(self, session: ModelSession, **params) -> None:
        super().__init__(**params)
        self.session = session
        self.history = History()  # this browser session's results (the model session is shared)
        self.lens = LogitLensView(session, history=self.history)
        self.heads = HeadsView(session, history=self.history)
        self.ablation = AblationView(session, history=self.history)
        self.neurons = NeuronView(session, history=self.history)
        self._tabs = pn.Tabs(
            ("Logit lens", self.lens),
            ("Heads", self.heads),
            ("Ablation", self.ablation),
            ("Neurons", self.neurons),
            sizing_mode="stretch_width", css_classes=["explorer-tabs"],
        )
        # "Ablate this neuron / all hits" in the neuron tab: select them in the ablation tab, show it.
        ablation_tab = 2  # the tabs' order above
        self.neurons.param.watch(lambda e: (self.ablation.select_components(list(e.new)),
                                            setattr(self._tabs, "active", ablation_tab)), "ablate_request")

    def sidebar(self) -> list[pn.viewable.Viewable]:
        return [
            pn.pane.Markdown("### Model", margin=(0, 10)),
            pn.pane.HTML(model_card(self.session), css_classes=["model-card"], sizing_mode="stretch_width",
                         stylesheets=[MODEL_CARD_CSS]),
            pn.pane.Markdown(HOW_TO_READ, css_classes=["how-to-read"], sizing_mode="stretch_width"),
        ]

    def template(self) -> Page:
        """The full page: header, the model card in the sidebar, the tabs in the main area."""
        # panel-material-ui's Page (a dependency of panel 1.9) bundles its fonts; panel's FAST
        # templates fetch Open Sans from Google, which fails on an offline machine.
        return Page(
            title=TITLE,
            sidebar=self.sidebar(),
            main=[self._tabs],
            sidebar_width=280,
            theme_toggle=False,
            theme_config={"palette": {"primary": {"main": ACCENT}}},
        )

    def __panel__(self) -> pn.viewable.Viewable:
        return self._tabs


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


def serve_app(
    session: ModelSession,
    port: int = 5006,
    address: str = "127.0.0.1",
    allow_websocket_origin: Sequence[str] | str | None = None,
    show: bool = False,
    num_threads: int | None = None,
) -> None:
    """Serve the app at http://{address}:{port}/ and block until interrupted."""
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
    )


__all__ = ["ExplorerApp", "create_app", "serve_app", "websocket_origins", "human_count", "model_card"]