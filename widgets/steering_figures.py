"""Snapshot and export figures of generations and steering results (the Generate and Steering tabs'
charts, from ``steering_charts``), registered in ``widgets.registry``."""
from __future__ import annotations

from explorer.interventions.generate import GenerateResult, Generation
from explorer.interventions.steering import SteeringVector, SteerResult, SteerSweepResult
from explorer.training.steer_compare import SteerCompareResult

from . import steering_charts as sc
from .charts import shorten
from .figures import Figure, div_model


def generate_figures(r: GenerateResult, model: dict) -> list[Figure]:
    out = [(f"Generated after {shorten(r.request.prompt, 60)!r}: {arm.label} ({arm.stop_reason}).",
            sc.token_strip(arm)) for arm in r.arms]
    if any(arm.has_lens for arm in r.arms) and len(r.main.token_ids):
        out.append(("Rank of the first generated token per layer, in each arm.", sc.rank_chart(r, 0)))
    return out


def generation_figures(g: Generation, model: dict) -> list[Figure]:
    return [(f"Generated tokens: {g.label} ({g.stop_reason}).", sc.token_strip(g))]


def steer_figures(r: SteerResult, model: dict) -> list[Figure]:
    return [(f"Steering {shorten(r.request.prompt, 60)!r}.", div_model(sc.apply_html(r), sc.TABLE_CSS))]


def steer_sweep_figures(r: SteerSweepResult, model: dict) -> list[Figure]:
    out = [(f"The metric against α for {shorten(r.request.prompt, 60)!r}.", sc.sweep_chart(r))]
    if r.texts:
        out.append(("Steered continuations.", div_model(sc.texts_html(r), sc.TABLE_CSS)))
    return out


def vector_figures(v: SteeringVector, model: dict) -> list[Figure]:
    return [("A steering vector and the tokens it was read at.", div_model(sc.vector_html(v), sc.TABLE_CSS))]


def compare_figures(r: SteerCompareResult, model: dict) -> list[Figure]:
    what = "the swap run's control and swapped arms" if r.run else "no swap run"
    return [(f"Bias probes and held-out loss under steering at L{r.layer} (against α), the direction ablated, "
             f"and {what}, on the same axes.", sc.compare_chart(r)),
            ("The same numbers, ± 1 SE.", div_model(sc.compare_html(r), sc.TABLE_CSS))]
