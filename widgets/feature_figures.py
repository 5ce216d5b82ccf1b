"""Snapshot and export figures of sparse-autoencoder results (the Train SAE tab's charts, from
``sae_charts``), registered in ``widgets.registry``."""
from __future__ import annotations

from explorer.features.attribution import FeatureAttribution
from explorer.features.encode import FeatureActivations
from explorer.features.train import SAETrainResult

from . import sae_charts as fc
from .charts import quote_token, shorten
from .figures import Figure


def sae_run_figures(r: SAETrainResult, model: dict) -> list[Figure]:
    return [(f"SAE training (layer {r.layer} {r.site}, width {r.width}, k {r.k}): {fc.METRICS[m][0].lower()}.", fig)
            for m, fig in fc.training_charts(r).items()]


def sae_feature_figures(r: FeatureActivations, model: dict) -> list[Figure]:
    return [(f"Top SAE features per position of {shorten(r.prompt, 60)!r}.", fc.features_heatmap(r))]


def sae_attribution_figures(r: FeatureAttribution, model: dict) -> list[Figure]:
    return [(f"SAE features by activation × gradient of {quote_token(r.target)} after {shorten(r.prompt, 60)!r}.",
             fc.attribution_heatmap(r))]
