"""Interp Explorer engine: model attachment, analyses, results. Never imports panel or bokeh.

Every analysis is called the same way, ``fn(session, request=None, /, *, ctx=None, **fields)``:
a request dataclass, or a string for its first field (usually the prompt), or keywords for
its fields (``explorer.core.requests.build_request``); ``ctx`` is the ``JobContext`` of a job
(progress, cancel) or None. Each returns a typed result (``explorer.core.results.Result``).
The examples in their docstrings use ``session = ModelSession.load()`` (the embedded default
model) and are run by the test suite (tests/model/test_docstring_examples.py)::

    from explorer import ModelSession, logit_lens
    session = ModelSession.load()
    logit_lens(session, "The capital of France is").target      # ' Paris'

Names are imported lazily so that light commands (``python -m explorer setup``) start fast.
"""
from __future__ import annotations

import importlib

# Every analysis: name -> module (each takes a session and follows the call convention above).
ANALYSES = {
    "logit_lens": "analyses.lens",
    "compare_prompts": "analyses.lens",
    "attention_patterns": "analyses.heads",
    "head_pattern": "analyses.heads",
    "direct_logit_attribution": "analyses.heads",
    "head_scores": "analyses.heads",
    "demonstration_lens": "analyses.demonstrations",
    "overthinking": "analyses.demonstrations",
    "ablate": "interventions.ablation",
    "sweep": "interventions.ablation",
    "patch": "interventions.patching",
    "build_index": "neurons.index",
    "prompt_activation": "neurons.index",
    "explain_neuron": "neurons.describe",
    "bias_probe": "training.bias",
    "run_intervention": "training.intervene",
    "collect_hidden": "analyses.hidden",
    "run_probes": "analyses.probes",
    "run_ccs": "analyses.ccs",
    "patchscope": "analyses.patchscope",
    "bias_dataset": "training.bias_datasets",
    "generate": "interventions.generate",
    "build_vector": "interventions.steering",
    "steer_apply": "interventions.steering",
    "steer_sweep": "interventions.steering",
    "steering_vs_swap": "training.steer_compare",
    "train_sae": "features.train",
    "encode_prompt": "features.encode",
    "feature_attribution": "features.attribution",
}

_EXPORTS = {
    **ANALYSES,
    # the session, errors, jobs
    "ExplorerError": "core.errors",
    "ModelInfo": "core.session",
    "ModelSession": "core.session",
    "Job": "core.jobs",
    "JobContext": "core.jobs",
    # requests
    "LensRequest": "analyses.lens",
    "CompareRequest": "analyses.lens",
    "AttentionRequest": "analyses.heads",
    "HeadPatternRequest": "analyses.heads",
    "DLARequest": "analyses.heads",
    "HeadsRequest": "analyses.heads",
    "DemoRequest": "analyses.demonstrations",
    "OverthinkingRequest": "analyses.demonstrations",
    "AblationRequest": "interventions.ablation",
    "SweepRequest": "interventions.ablation",
    "PatchRequest": "interventions.patching",
    "IndexRequest": "neurons.index",
    "ActivationRequest": "neurons.index",
    "ExplainRequest": "neurons.describe",
    "BiasRequest": "training.bias",
    "InterventionConfig": "training.intervene",
    "SteerCompareRequest": "training.steer_compare",
    "HiddenRequest": "analyses.hidden",
    "ProbeRequest": "analyses.probes",
    "CCSRequest": "analyses.ccs",
    "PatchscopeRequest": "analyses.patchscope",
    "BiasDatasetRequest": "training.bias_datasets",
    "GenerateRequest": "interventions.generate",
    "Intervention": "interventions.generate",
    "BuildRequest": "interventions.steering",
    "SteerRequest": "interventions.steering",
    "SteerSweepRequest": "interventions.steering",
    "TrainConfig": "features.train",
    "EncodeRequest": "features.encode",
    "AttributionRequest": "features.attribution",
    # results
    "LensResult": "analyses.lens",
    "LensComparison": "analyses.lens",
    "AttentionResult": "analyses.heads",
    "HeadPattern": "analyses.heads",
    "DLAResult": "analyses.heads",
    "HeadScores": "analyses.heads",
    "DemoLensResult": "analyses.demonstrations",
    "OverthinkingResult": "analyses.demonstrations",
    "AblationResult": "interventions.ablation",
    "SweepResult": "interventions.ablation",
    "PatchResult": "interventions.patching",
    "NeuronIndex": "neurons.index",
    "PromptActivation": "neurons.index",
    "Explanation": "neurons.describe",
    "BiasResult": "training.bias",
    "InterventionResult": "training.intervene",
    "HiddenStates": "analyses.hidden",
    "ProbeResult": "analyses.probes",
    "CCSResult": "analyses.ccs",
    "PatchscopeResult": "analyses.patchscope",
    "BiasDatasetResult": "training.bias_datasets",
    "GenerateResult": "interventions.generate",
    "Generation": "interventions.generate",
    "SteeringVector": "interventions.steering",
    "SteerResult": "interventions.steering",
    "SteerSweepResult": "interventions.steering",
    "save_vector": "interventions.steering",
    "load_vector": "interventions.steering",
    "SAETrainResult": "features.train",
    "FeatureActivations": "features.encode",
    "FeatureAttribution": "features.attribution",
    "FeatureCard": "features.card",
    "feature_card": "features.card",
    "SparseAutoencoder": "features.sae",
    "load_sae": "features.saelens_io",
    "save_sae": "features.saelens_io",
    # snapshots
    "load_snapshot": "persistence.snapshot",
    "save_snapshot": "persistence.snapshot",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'explorer' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
