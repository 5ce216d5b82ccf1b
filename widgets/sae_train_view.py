"""The "Train SAE" tab: train a TopK or BatchTopK sparse autoencoder (or a transcoder) live, and
encode a prompt with an SAE.

Two parts:
- **Training.** Settings of ``explorer.features.train.TrainConfig`` (layer, site, architecture,
  width, k, tokens, learning rate, batch, corpus; site ``transcoder``: MLP input -> MLP output);
  *Start* runs ``train_sae`` as a job through ``widgets.live.LiveJob`` into the output folder
  (empty: the cache, keyed by model, corpus and settings). Each forward pass's partial result
  reaches the page's loop (throttled) and the four charts (FVU, L0, dead latents, Δ LM loss) are
  refreshed from it. *Cancel* stops after the current pass (checkpointed, the SAE so far saved);
  *Resume* starts the same settings again, which continues from the last checkpoint.
- **Encode.** An SAE folder (SAELens layout; filled in with the last trained one) and a prompt:
  the top features per position as a heatmap (windowed past 32 positions); *Attribute*: the
  features ranked by activation × gradient of a target token's logit, per position.
"""
from __future__ import annotations

import asyncio
import logging

import panel as pn
import param

from explorer.core.errors import ExplorerError
from explorer.core.jobs import CANCELLED, FAILED, Job, JobContext, Progress
from explorer.features.attribution import FeatureAttribution, feature_attribution
from explorer.features.encode import FeatureActivations, encode_prompt
from explorer.features.train import SAETrainResult, TrainConfig, train_sae
from explorer.persistence.history import History

from . import sae_charts as sc
from .live import LiveJob
from .parts import alert

log = logging.getLogger(__name__)


class SAETrainView(pn.viewable.Viewer):
    """Train an SAE on one site of the session's model; encode prompts with it."""

    # ---- training settings
    layer = param.Integer(default=12, bounds=(0, None), label="Layer")
    site = param.Selector(default="resid", objects=["resid", "mlp_out", "transcoder"], label="Site",
                          doc="resid: the block's output (residual stream); mlp_out: its MLP's output; "
                              "transcoder: from the MLP's input (after its norm) to its output.")
    architecture = param.Selector(default="topk", objects=["topk", "batchtopk"], label="Architecture",
                                  doc="topk: k latents per token; batchtopk: k·B across a batch of B tokens "
                                      "(saved as a JumpReLU with the threshold estimated in training).")
    width = param.Integer(default=4608, bounds=(1, None), label="Width (latents)")
    k = param.Integer(default=32, bounds=(1, None), label="k (active latents)")
    max_tokens = param.Integer(default=2_000_000, bounds=(1, None), label="Training tokens")
    lr = param.Number(default=0.0, bounds=(0, None), label="Learning rate (0: auto)")
    batch = param.Integer(default=1024, bounds=(1, None), label="Batch (vectors per step)")
    corpus = param.String(default="", label="Corpus (empty: news corpus; 'large': SOTU + Moby-Dick)")
    out_dir = param.String(default="", label="Output folder (empty: the cache)")
    start = param.Event(label="Start")
    cancel = param.Event(label="Cancel")
    resume = param.Event(label="Resume")
    # ---- run state
    result = param.ClassSelector(class_=SAETrainResult, default=None, allow_None=True)
    running = param.Boolean(default=False)
    status = param.String(default="Choose settings and press **Start**.")
    error = param.String(default="")
    # ---- encode
    sae_path = param.String(default="", label="SAE folder (SAELens layout)")
    prompt = param.String(default="The capital of France is", label="Prompt")
    top_k = param.Integer(default=8, bounds=(1, 64), label="Features per position")
    run_encode = param.Event(label="Encode")
    features = param.ClassSelector(class_=FeatureActivations, default=None, allow_None=True)
    encode_error = param.String(default="")
    encode_busy = param.Boolean(default=False)
    # ---- attribution
    attr_target = param.String(default="", label="Target token (empty: the model's top-1)")
    run_attribute = param.Event(label="Attribute")
    attribution = param.ClassSelector(class_=FeatureAttribution, default=None, allow_None=True)

    def __init__(self, session, history: History | None = None, background: bool = True,
                 base_config: TrainConfig | None = None, **params) -> None:
        super().__init__(**params)
        self.session = session
        self.history = history
        self.background = background   # False: jobs run on the caller's thread (notebooks, tests)
        self.base_config = base_config or TrainConfig()   # settings not shown (window, eval cadence, ...)
        self._job = LiveJob(self._on_progress, self._on_finish)
        self._figures = sc.training_charts()
        self._chart_panes = {m: pn.pane.Bokeh(fig, css_classes=[sc.chart_name(m)], margin=(5, 10))
                             for m, fig in self._figures.items()}
        self._heatmap = pn.pane.Bokeh(None, css_classes=["sae-heatmap"], margin=(5, 10))
        self._attribution = pn.pane.Bokeh(None, css_classes=["sae-attribution"], margin=(5, 10))
        self._bar = pn.indicators.Progress(value=0, max=1, width=260, margin=(14, 10, 4, 10),
                                           css_classes=["sae-progress"])
        self._layout = self._build()

    # ============================================================ training
    def config(self) -> TrainConfig:
        """The run's settings: the view's fields over ``base_config`` (checked)."""
        from dataclasses import replace

        config = replace(self.base_config, layer=self.layer, site=self.site, architecture=self.architecture,
                         width=self.width, k=self.k,
                         max_tokens=self.max_tokens, lr=float(self.lr) or None, batch=self.batch,
                         corpus_path=self.corpus.strip() or None)
        config.check(self.session.n_layers)
        return config

    @param.depends("start", watch=True)
    def _on_start(self) -> None:
        self.start_run()

    @param.depends("resume", watch=True)
    def _on_resume(self) -> None:
        self.start_run()

    @param.depends("cancel", watch=True)
    def _on_cancel(self) -> None:
        self._job.cancel()

    def start_run(self) -> Job | None:
        """Start (or resume: same settings, same folder) a training run; errors are shown."""
        if self._job.running:
            return None
        try:
            config = self.config()
        except ExplorerError as e:
            self.error = f"**Bad settings:** {e}"
            return None
        out = self.out_dir.strip() or None
        self.param.update(error="", running=True, status="Starting: loading the corpus and the held-out windows…")

        def work(ctx: JobContext) -> SAETrainResult:
            return train_sae(self.session, config, ctx=ctx, out_dir=out)

        return self._job.start(work, name="sae-train", background=self.background)

    def cancel_run(self) -> None:
        self._job.cancel()

    def close(self) -> None:
        """Stop a running job (it checkpoints after its current pass)."""
        self._job.cancel()

    def _on_progress(self, progress: Progress, partial) -> None:
        _set_bar(self._bar, progress.done, progress.total)
        if isinstance(partial, SAETrainResult):
            self.result = partial
            self._refresh_charts(partial)
            fvu = f"{partial.log_fvu[-1]:.3f}" if len(partial.log_fvu) else "…"
            self.status = (f"Training: {progress.done:,} / {progress.total:,} tokens ({progress.message}); "
                           f"training FVU {fvu}")

    def _on_finish(self, job: Job) -> None:
        self.running = False
        if job.status == FAILED:
            self.error = f"**Training failed:** {job.error}"
            self.status = "Failed."
            return
        result = job.result
        if not isinstance(result, SAETrainResult):
            return
        self.result = result
        self._refresh_charts(result)
        self.sae_path = result.out_dir
        verb = "Cancelled (press Resume to continue)" if job.status == CANCELLED else "Done"
        fmt = lambda v, f: "–" if v is None else format(v, f)  # noqa: E731
        self.status = (f"{verb}: {result.tokens:,} tokens; held-out FVU {fmt(result.fvu, '.3f')}, "
                       f"L0 {fmt(result.l0, '.1f')}, dead {fmt(result.dead_fraction, '.1%')}, "
                       f"Δ loss {fmt(result.delta_loss, '+.3f')} nats. Saved to `{result.out_dir}`.")
        if self.history is not None:
            arch = result.settings.get("architecture", "topk")
            kind = "" if arch == "topk" else f" {arch}"
            self.history.add(result, f"SAE L{result.layer} {result.site}{kind} ×{result.width} k{result.k}")

    def _refresh_charts(self, result: SAETrainResult) -> None:
        data = sc.training_data(result)
        for metric, fig in self._figures.items():
            for (m, line), values in data.items():
                if m != metric:
                    continue
                for src in fig.select({"name": sc.source_name(m, line)}):
                    src.data = values
        for pane in self._chart_panes.values():
            _push(pane)

    # ============================================================ encode and attribute
    @param.depends("run_encode", watch=True)
    async def _on_encode(self) -> None:
        await self.encode()

    async def encode(self) -> FeatureActivations | None:
        """Encode the prompt with the SAE folder; errors are shown, the last heatmap kept."""
        if self.encode_busy:
            return None
        self.encode_busy = True
        try:
            result = await asyncio.to_thread(encode_prompt, self.session, self.prompt, sae=self.sae_path.strip(),
                                             top_k=self.top_k)
        except ExplorerError as e:
            self.encode_error = f"**Could not encode:** {e}"
            return None
        except Exception as e:
            log.exception("encoding a prompt with an SAE failed")
            self.encode_error = f"**Unexpected error** ({type(e).__name__}: {e})."
            return None
        finally:
            self.encode_busy = False
        self.encode_error = ""
        self.features = result
        self._heatmap.object = sc.features_heatmap(result)
        if self.history is not None:
            self.history.add(result, f"SAE features: {self.prompt[:40]}")
        return result

    @param.depends("run_attribute", watch=True)
    async def _on_attribute(self) -> None:
        await self.attribute()

    async def attribute(self) -> FeatureAttribution | None:
        """Attribute the target's logit at the prompt's last position to the SAE's features."""
        if self.encode_busy:
            return None
        self.encode_busy = True
        try:
            result = await asyncio.to_thread(feature_attribution, self.session, self.prompt,
                                             sae=self.sae_path.strip(), target=self.attr_target or None,
                                             top_n=self.top_k)
        except ExplorerError as e:
            self.encode_error = f"**Could not attribute:** {e}"
            return None
        except Exception as e:
            log.exception("SAE feature attribution failed")
            self.encode_error = f"**Unexpected error** ({type(e).__name__}: {e})."
            return None
        finally:
            self.encode_busy = False
        self.encode_error = ""
        self.attribution = result
        self._attribution.object = sc.attribution_heatmap(result)
        if self.history is not None:
            self.history.add(result, f"SAE attribution of {result.target!r}: {self.prompt[:40]}")
        return result

    # ============================================================ layout
    def _build(self) -> pn.viewable.Viewable:
        p = self.param
        settings = pn.Column(
            pn.Row(pn.widgets.IntInput.from_param(p.layer, width=90), pn.widgets.Select.from_param(p.site, width=110),
                   pn.widgets.Select.from_param(p.architecture, width=120, css_classes=["sae-architecture"]),
                   pn.widgets.IntInput.from_param(p.width, width=120), pn.widgets.IntInput.from_param(p.k, width=90)),
            pn.Row(pn.widgets.IntInput.from_param(p.max_tokens, width=140),
                   pn.widgets.FloatInput.from_param(p.lr, width=150),
                   pn.widgets.IntInput.from_param(p.batch, width=150)),
            pn.widgets.TextInput.from_param(p.corpus, sizing_mode="stretch_width"),
            pn.widgets.TextInput.from_param(p.out_dir, sizing_mode="stretch_width"),
            pn.Row(pn.widgets.Button.from_param(p.start, color="primary", css_classes=["sae-start"]),
                   pn.widgets.Button.from_param(p.cancel, css_classes=["sae-cancel"]),
                   pn.widgets.Button.from_param(p.resume, css_classes=["sae-resume"]), self._bar),
            pn.pane.Markdown(p.status, css_classes=["sae-status"]),
            alert(p.error, "sae-error"),  # readable colours (the theme's are 1.3:1)
            sizing_mode="stretch_width")
        charts = pn.GridBox(*self._chart_panes.values(), ncols=2)
        encode = pn.Column(
            pn.pane.Markdown("### Encode a prompt"),
            pn.Row(pn.widgets.TextInput.from_param(p.sae_path, sizing_mode="stretch_width"),
                   pn.widgets.IntInput.from_param(p.top_k, width=150)),
            pn.widgets.TextAreaInput.from_param(p.prompt, sizing_mode="stretch_width", height=70),
            pn.Row(pn.widgets.Button.from_param(p.run_encode, color="primary", css_classes=["sae-encode"]),
                   pn.widgets.TextInput.from_param(p.attr_target, width=260),
                   pn.widgets.Button.from_param(p.run_attribute, css_classes=["sae-attribute"])),
            alert(p.encode_error, "sae-encode-error"),
            self._heatmap, self._attribution, sizing_mode="stretch_width")
        note = pn.pane.Markdown(
            "A TopK or BatchTopK sparse autoencoder, or a transcoder (MLP input to MLP output), trained here "
            "(own implementation, SAELens file layout). The full-size "
            "run (layer 12 residual, width 4,608, k 32, 2M tokens of the 'large' corpus) is hours on 2 busy CPU "
            "cores: `python -m explorer sae train --layer 12 --width 4608 --k 32 --max-tokens 2000000 "
            "--corpus large --out DIR`.", css_classes=["sae-note"])
        return pn.Column(note, settings, charts, encode, sizing_mode="stretch_width")

    def __panel__(self) -> pn.viewable.Viewable:
        return self._layout


def _set_bar(bar: pn.indicators.Progress, done: int, total: int) -> None:
    total = max(1, total)
    done = min(max(0, done), total)
    if total >= bar.max:
        bar.max, bar.value = total, done
    else:
        bar.value, bar.max = done, total


def _push(pane: pn.pane.Bokeh) -> None:
    """Without a served document, in-place Bokeh changes reach a notebook only when pushed."""
    from .live import served_doc

    if served_doc() is None and pane.object is not None:
        try:
            pn.io.push_notebook(pane)
        except Exception:  # no notebook comm (plain Python, tests)
            pass


