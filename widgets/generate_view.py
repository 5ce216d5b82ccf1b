"""The Generate tab: the model speaks, with and without an intervention, side by side.

Tokens stream onto the page as they are produced (a ``LiveJob``: the generation runs on a worker
thread; its per-token reports are flushed to the page at most every 0.15 s); **Stop** cancels the
job, which the generation honours within one token. With an intervention (ablated components,
the steering vector of the Steering tab, or its direction ablated at every layer, SAE features
ablated or clamped; a feature's decoder direction can also become the steering vector) both arms run
as one batch with the same seed. After a run, click a generated token: its logit-lens column and
the rank of the chosen token per layer, in both arms (where the model "commits").
"""
from __future__ import annotations

import logging

import panel as pn
import param

from explorer.core.errors import ExplorerError
from explorer.core.session import ModelSession
from explorer.interventions.generate import (
    ABLATION_MODES,
    MAX_NEW_TOKENS,
    POSITIONS,
    GenerateRequest,
    GenerateResult,
    Intervention,
    generate,
)
from explorer.interventions.steering import SteeringVector
from explorer.persistence.history import History

from . import steering_charts as sc
from .charts import shorten
from .live import LiveJob
from .parts import alert

log = logging.getLogger(__name__)

TEXT_CSS = """
.gen-text { font-family: ui-monospace, Menlo, Consolas, monospace; white-space: pre-wrap; font-size: 13px;
            border: 1px solid #dde3ea; border-radius: 4px; padding: 6px 8px; min-height: 60px; }
"""


class InterventionForm(pn.viewable.Viewer):
    """What the B arm changes: ablated components, the steering vector (α, layer, positions),
    the vector's direction ablated at every layer, or SAE features ablated / clamped."""

    components = param.String(default="", label="Ablate components",
                              doc="Heads L.H, neurons L:N, attn:L, mlp:L, block:L (comma-separated).")
    mode = param.Selector(default="zero", objects=list(ABLATION_MODES), label="Ablation")
    steer = param.Boolean(default=False, label="Add the steering vector")
    alpha = param.Number(default=4.0, label="α")
    layer = param.Integer(default=None, allow_None=True, label="Layer (empty: the vector's)")
    positions = param.Selector(default="all", objects=list(POSITIONS), label="Steer at")
    ablate_direction = param.Boolean(default=False, label="Ablate the vector's direction (every layer)")
    vector = param.ClassSelector(class_=SteeringVector, default=None, allow_None=True,
                                 doc="Built or loaded in the Steering tab.")
    sae_dir = param.String(default="", label="SAE folder",
                           doc="An SAE in the SAELens layout (cfg.json + sae_weights.safetensors).")
    features = param.String(default="", label="SAE features to ablate / clamp",
                            doc="e.g. '123, 456=5.0': a number ablates the feature, F=V clamps it to V "
                                "(the SAE's error term is kept).")
    steer_feature = param.Integer(default=0, bounds=(0, None), label="Feature")
    use_feature = param.Event(label="Steer by its decoder direction",
                              doc="Make the feature's unit decoder row the steering vector (at the SAE's layer).")
    feature_note = param.String(default="")

    def intervention(self) -> Intervention | None:
        """The intervention these settings describe, or None when they change nothing."""
        uses_vector = self.steer or self.ablate_direction
        if uses_vector and self.vector is None:
            raise ExplorerError("no steering vector yet: build or load one in the Steering tab")
        features = self.features.strip()
        if features and not self.sae_dir.strip():
            raise ExplorerError("SAE features need an SAE folder (cfg.json + sae_weights.safetensors)")
        if not (self.components.strip() or uses_vector or features):
            return None
        v = None if self.vector is None else tuple(self.vector.vector.tolist())
        return Intervention(
            components=self.components, mode=self.mode,
            steer=v if self.steer else None,
            layer=(self.layer if self.layer is not None else self.vector.layer) if self.steer else None,
            alpha=self.alpha, positions=self.positions,
            direction=v if self.ablate_direction else None,
            label="" if self.vector is None or not uses_vector else f"{self.vector.method} L{self.vector.layer}",
            sae=self.sae_dir.strip() if features else "", features=features)

    @param.depends("use_feature", watch=True)
    def _on_use_feature(self) -> None:
        self.feature_vector()

    def feature_vector(self) -> SteeringVector | None:
        """Make feature ``steer_feature``'s unit decoder row the steering vector (None: an error, noted)."""
        from explorer.features.edits import feature_vector
        from explorer.features.saelens_io import load_sae

        try:
            if not self.sae_dir.strip():
                raise ExplorerError("give the SAE folder first")
            vec = feature_vector(load_sae(self.sae_dir.strip()), self.steer_feature)
        except ExplorerError as e:
            self.feature_note = f"**Cannot use the feature:** {e}"
            return None
        self.param.update(vector=vec, steer=True,
                          feature_note=f"Steering vector: feature {self.steer_feature}'s decoder direction")
        return vec

    @param.depends("vector")
    def _vector_note(self) -> str:
        if self.vector is None:
            return "*No steering vector: build one in the Steering tab.*"
        v = self.vector
        return f"Vector: **{v.method}** at L{v.layer}, norm {v.norm:.2f}"

    def __panel__(self) -> pn.viewable.Viewable:
        w = pn.widgets
        return pn.Column(
            pn.Row(w.TextInput.from_param(self.param.components, width=260, css_classes=["gen-components"]),
                   w.Select.from_param(self.param.mode, width=90)),
            pn.Row(w.Checkbox.from_param(self.param.steer, css_classes=["gen-steer"]),
                   w.FloatInput.from_param(self.param.alpha, width=80, css_classes=["gen-alpha"]),
                   w.IntInput.from_param(self.param.layer, width=150),
                   w.Select.from_param(self.param.positions, width=110)),
            w.Checkbox.from_param(self.param.ablate_direction),
            pn.pane.Markdown(self._vector_note, css_classes=["gen-vector-note"]),
            pn.Row(w.TextInput.from_param(self.param.sae_dir, width=260, css_classes=["gen-sae"],
                                          placeholder="e.g. runs/sae-l12"),
                   w.TextInput.from_param(self.param.features, width=200, css_classes=["gen-features"],
                                          placeholder="e.g. 123, 456=5.0")),
            pn.Row(w.IntInput.from_param(self.param.steer_feature, width=100),
                   w.Button.from_param(self.param.use_feature, width=230, margin=(26, 10, 10, 10),
                                       css_classes=["gen-use-feature"])),
            pn.pane.Markdown(self.param.feature_note, css_classes=["gen-feature-note"]),
            css_classes=["gen-intervention"])


class GenerateView(pn.viewable.Viewer):
    """Generation of one ModelSession; usable alone: ``GenerateView(session)``."""

    prompt = param.String(default="The capital of France is", label="Prompt")
    max_new_tokens = param.Integer(default=32, bounds=(1, MAX_NEW_TOKENS), label="Max new tokens")
    temperature = param.Number(default=0.0, bounds=(0, None), label="Temperature (0 = greedy)")
    top_p = param.Number(default=1.0, bounds=(0.01, 1.0), label="Top-p")
    seed = param.Integer(default=0, label="Seed")
    stop_strings = param.String(default="", label="Stop strings (one per line)")
    chat = param.Boolean(default=False, label="Chat template")
    compare = param.Boolean(default=True, label="A/B: also without the intervention")
    lens = param.Boolean(default=True, label="Lens per token")
    run = param.Event(label="Generate")
    stop = param.Event(label="Stop")

    result = param.ClassSelector(class_=GenerateResult, default=None, allow_None=True)
    token = param.Integer(default=0, bounds=(0, None), label="Token")
    texts = param.List(default=["", ""], doc="The text streamed so far, per arm.")
    running = param.Boolean(default=False)
    status = param.String(default="Type a prompt and press **Generate**.")
    error = param.String(default="")

    def __init__(self, session: ModelSession, history: History | None = None, **params) -> None:
        has_template = bool(getattr(session.tokenizer, "chat_template", None))
        params.setdefault("chat", has_template)
        super().__init__(**params)
        self.session = session
        self.history = history
        self.form = InterventionForm()
        self._live = LiveJob(self._on_progress, self._on_finish)
        self._arm_titles = [pn.pane.Markdown("**A: plain**"), pn.pane.Markdown("**B: intervened**")]
        self._arm_texts = [pn.pane.HTML("", css_classes=[f"gen-text-{i}"], stylesheets=[TEXT_CSS],
                                        sizing_mode="stretch_width") for i in range(2)]
        self._strips = [pn.pane.Bokeh(None, css_classes=[f"gen-strip-{i}"]) for i in range(2)]
        self._ranks = pn.pane.Bokeh(None, css_classes=["gen-rank-chart"], sizing_mode="stretch_width")
        # A fixed width: sized by its content, the table was laid out over the stretching rank chart.
        self._column = pn.pane.HTML("", css_classes=["gen-lens-column"], stylesheets=[sc.TABLE_CSS], width=440)
        self._layout = self._build_layout()

    # ------------------------------------------------------------------ running
    def request(self) -> GenerateRequest:
        stops = tuple(s for s in self.stop_strings.replace("\\n", "\n").split("\n") if s)
        return GenerateRequest(self.prompt, max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                               top_p=self.top_p, seed=self.seed, stop=stops, chat=self.chat,
                               intervention=self.form.intervention(), compare=self.compare, lens=self.lens)

    @param.depends("run", watch=True)
    def _on_run(self) -> None:
        self.start()

    @param.depends("stop", watch=True)
    def _on_stop(self) -> None:
        self._live.cancel()

    def close(self) -> None:
        """Stop a running generation (the app closes its session)."""
        self._live.cancel()

    def start(self, background: bool = True) -> None:
        """Start a generation (``background=False``: run here, for notebooks and tests)."""
        request = self._live.begin(self.request, self, "**Cannot generate:** {}")
        if request is None:
            return
        self.param.update(error="", texts=["", ""], running=True, result=None,
                          status="Generating… (**Stop** ends it within one token)")
        labels = ["A: plain" if request.intervention is None or request.compare else "—",
                  "B: " + (request.intervention.describe() if request.intervention else "—")]
        for title, label in zip(self._arm_titles, labels):
            title.object = f"**{label}**"
        for strip in self._strips:
            strip.object = None
        self._ranks.object, self._column.object = None, ""
        total = request.max_new_tokens
        arms_b = request.intervention is not None

        def work(ctx):
            texts = ["", ""]

            def on_token(step, pieces):
                slots = ([0, 1] if len(pieces) == 2 else [1 if arms_b else 0])
                for slot, piece in zip(slots, pieces):
                    if piece:
                        texts[slot] += piece
                ctx.report(step + 1, total, partial=list(texts))

            return generate(self.session, request, ctx=ctx, on_token=on_token)

        self._live.start(work, name="generate", background=background)

    def _on_progress(self, progress, partial) -> None:
        if partial is not None:
            self.texts = list(partial)
        self.status = f"Generating… {progress.done} / {progress.total} tokens"

    def _on_finish(self, job) -> None:
        if self._live.failed(job, self, "**Generation failed:** {}"):
            self.status = ""
            return
        result = job.result
        if result is None:
            return
        if self.history is not None:
            self.history.add(result, f"generate: {shorten(result.request.prompt, 30)}")
        main = result.main
        self.param.update(result=result, token=0,
                          status=f"**{result.model}** · {len(main.token_ids)} tokens in {result.seconds:.2f} s "
                                 f"(first after {result.first_token_seconds:.2f} s) · {main.stop_reason}"
                                 + (" · the arms agree" if sc.arms_equal(result) else ""))

    # ------------------------------------------------------------------ display
    @param.depends("texts", watch=True)
    def _update_texts(self) -> None:
        import html

        for pane, text in zip(self._arm_texts, self.texts):
            pane.object = f'<div class="gen-text">{html.escape(text)}</div>'

    @param.depends("result", watch=True)
    def _update_result(self) -> None:
        r = self.result
        if r is None:
            return
        arms = [r.baseline, r.intervened]
        self.texts = [a.text if a is not None else "" for a in arms]
        for strip, arm in zip(self._strips, arms):
            strip.object = None if arm is None else self._strip(arm)
        self._update_token()

    def _strip(self, arm):
        fig = sc.token_strip(arm, self.token)
        source = fig.select_one({"name": sc.TOKEN_SOURCE})
        result = self.result

        def on_tap(attr, old, new) -> None:
            if new and self.result is result:
                self.token = int(source.data["n"][new[0]])

        source.selected.on_change("indices", on_tap)
        return fig

    @param.depends("token", watch=True)
    def _update_token(self) -> None:
        r = self.result
        if r is None or not any(a.has_lens for a in r.arms):
            return
        n = min(self.token, max(len(a.token_ids) for a in r.arms) - 1)
        if n < 0:
            return
        self._ranks.object = sc.rank_chart(r, n)
        self._column.object = sc.lens_column_html(r, n)

    def select_token(self, n: int) -> None:
        """What clicking generated token ``n`` does."""
        self.token = n

    def _build_layout(self) -> pn.viewable.Viewable:
        w = pn.widgets
        prompt = w.TextAreaInput.from_param(self.param.prompt, rows=2, auto_grow=True, max_rows=6,
                                            sizing_mode="stretch_width", css_classes=["gen-prompt"])
        settings = pn.Column(
            pn.Row(w.IntInput.from_param(self.param.max_new_tokens, width=120),
                   w.FloatInput.from_param(self.param.temperature, width=150),
                   w.FloatInput.from_param(self.param.top_p, width=80),
                   w.IntInput.from_param(self.param.seed, width=80)),
            pn.Row(w.TextAreaInput.from_param(self.param.stop_strings, rows=1, width=220),
                   pn.Column(w.Checkbox.from_param(self.param.chat), w.Checkbox.from_param(self.param.compare),
                             w.Checkbox.from_param(self.param.lens))))
        run = w.Button.from_param(self.param.run, color="primary", width=120, disabled=self.param.running,
                                  css_classes=["gen-run"])
        stop = w.Button.from_param(self.param.stop, color="warning", width=90,
                                   disabled=self.param.running.rx.not_(), css_classes=["gen-stop"])
        error = alert(self.param.error, "gen-error")  # readable colours (the theme's are 1.3:1)
        status = pn.pane.Markdown(self.param.status, css_classes=["gen-status"], sizing_mode="stretch_width")
        arms = pn.Row(*[pn.Column(t, x, s, sizing_mode="stretch_width")
                        for t, x, s in zip(self._arm_titles, self._arm_texts, self._strips)],
                      sizing_mode="stretch_width")
        return pn.Column(
            pn.Row(prompt, pn.Column(pn.Row(run, stop)), sizing_mode="stretch_width"),
            pn.Row(settings, pn.Card(self.form, title="Intervention (arm B)", collapsed=False, width=520)),
            error, status, arms,
            pn.Row(self._ranks, self._column, sizing_mode="stretch_width"),
            sizing_mode="stretch_width", css_classes=["generate-view"])

    def __panel__(self) -> pn.viewable.Viewable:
        return self._layout
