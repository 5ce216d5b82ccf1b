"""Synthetic results of every type that has a chart, at the sizes that used to break the charts:
a prompt as long as the default model's context (8,192 tokens), sweeps over thousands of
components, hundreds of checkpoints. Only the chart builders read them (the engine's own tests
check real results); their numbers are deterministic and internally consistent (rows that sum to
1, ranks from 1), so a chart can be checked against them.

A plain module, not conftest (see tests/tiny_models.py): unit and browser tests import it.
"""
from __future__ import annotations

import numpy as np

from explorer.analyses.heads import (
    DLARequest,
    DLAResult,
    HeadPattern,
    HeadScores,
    HeadsRequest,
)
from explorer.analyses.lens import (
    CompareRequest,
    LensComparison,
    LensRequest,
    LensResult,
)
from explorer.interventions.ablation import (
    AblationRequest,
    AblationResult,
    SweepRequest,
    SweepResult,
    TargetStats,
)
from explorer.interventions.patching import PatchRequest, PatchResult
from explorer.neurons.index import NeuronHistogram, PromptActivation, SelectiveNeurons
from explorer.training.bias import PairScores
from explorer.training.checkpoints import CheckpointComparison
from explorer.training.intervene import ArmMetrics
from explorer.training.swap import SwapAudit

CONTEXT = 8192   # the default model's context length
WORDS = np.array([" the", " capital", " of", " France", " is", " Paris", ",", " and", "\n", " said", " she",
                  " he", " nurse", "ing", " 1", " ."])


def tokens(n: int, seed: int = 0) -> np.ndarray:
    return WORDS[np.random.default_rng(seed).integers(0, len(WORDS), n)]


def prompt_of(toks) -> str:
    return "".join(str(t) for t in toks)


def lens(n: int = CONTEXT, rows: int = 31, k: int = 3, seed: int = 0) -> LensResult:
    """A logit lens over ``n`` positions and ``rows`` rows (embed, L0, ...)."""
    rng = np.random.default_rng(seed)
    toks = tokens(n, seed)
    probs = np.sort(rng.dirichlet(np.ones(k + 1), size=(rows, n)).astype(np.float32)[..., :k], axis=-1)[..., ::-1]
    ids = rng.integers(0, len(WORDS), (rows, n, k))
    target = rng.random((rows, n)).astype(np.float32) * 0.5
    return LensResult(
        request=LensRequest(prompt_of(toks), " Paris", top_k=k), model="synthetic", tokens=toks,
        token_ids=np.arange(n, dtype=np.int64), layer_labels=("embed", *(f"L{i}" for i in range(rows - 1))),
        top_ids=ids.astype(np.int64), top_tokens=WORDS[ids], top_probs=np.ascontiguousarray(probs),
        entropy=rng.random((rows, n)).astype(np.float32) * 5, kl_to_final=rng.random((rows, n)).astype(np.float32),
        target=" Paris", target_id=5, target_probs=target,
        target_ranks=rng.integers(1, 500, (rows, n)).astype(np.int64))


def comparison(n: int = CONTEXT) -> LensComparison:
    a, b = lens(n, seed=1), lens(n - 7, seed=2)
    return LensComparison(request=CompareRequest(a.request.prompt, b.request.prompt, " Paris", top_k=3), a=a, b=b)


def pattern(n: int = CONTEXT, layer: int = 17, head: int = 4) -> HeadPattern:
    """Half of every row on position 0 (the sink), half on the token itself (row 0: all on 0).
    np.zeros maps untouched pages lazily, so an 8,192² pattern costs ~64 MB, not 256."""
    weights = np.zeros((n, n), dtype=np.float32)
    idx = np.arange(n)
    weights[idx, idx] = 0.5
    weights[:, 0] += 0.5
    weights[0, 0] = 1.0
    toks = tokens(n)
    return HeadPattern(model="synthetic", prompt=prompt_of(toks), layer=layer, head=head, tokens=toks,
                       pattern=weights)


def dla(n_layers: int, n_heads: int, toks) -> DLAResult:
    rng = np.random.default_rng(3)
    return DLAResult(
        request=DLARequest(prompt_of(toks), " Paris"), model="synthetic", tokens=toks,
        token_ids=np.arange(len(toks), dtype=np.int64), target=" Paris", target_id=5, logit=3.0, embed=0.1,
        heads=rng.normal(size=(n_layers, n_heads)), attn_bias=np.zeros(n_layers), mlp=rng.normal(size=n_layers),
        final_norm_bias=0.0, unembed_bias=0.0, norm_kind="rmsnorm", norm_scale=1.0)


def head_scores(n_layers: int = 126, n_heads: int = 128, n: int = CONTEXT) -> HeadScores:
    """Head scores of a large model (Llama-3.1-405B's 126 layers × 128 heads) on a long prompt."""
    rng = np.random.default_rng(4)
    toks = tokens(n)
    shares = [rng.random((n_layers, n_heads)).astype(np.float32) for _ in range(4)]
    attribution = dla(n_layers, n_heads, toks)
    return HeadScores(
        request=HeadsRequest(prompt_of(toks), " Paris"), model="synthetic", tokens=toks,
        token_ids=np.arange(n, dtype=np.int64), random_ids=np.arange(48, dtype=np.int64),
        previous_token=shares[0], induction=shares[1], duplicate_token=shares[2], bos=shares[3],
        entropy=(rng.random((n_layers, n_heads)) * 4).astype(np.float32), dla=attribution.heads,
        attribution=attribution)


def ablation(n: int = CONTEXT) -> AblationResult:
    base, abl = lens(n, seed=5), lens(n, seed=6)
    return AblationResult(
        request=AblationRequest(base.request.prompt, " Paris", ("17.4",), top_k=3), model="synthetic",
        components=("17.4",), tokens=base.tokens, token_ids=base.token_ids, target=" Paris", target_id=5,
        compare=None, compare_id=None, baseline=TargetStats(3.0, 0.4, 1), ablated=TargetStats(2.0, 0.2, 3),
        lens_baseline=base, lens_ablated=abl)


def sweep(kind: str = "neurons", n_layers: int = 30, width: int = 9, n_neurons: int = 1536,
          done: int | None = None, n: int = CONTEXT) -> SweepResult:
    """A sweep over heads ([n_layers, width]), blocks ([n_layers, 2]) or ``n_neurons`` neurons;
    ``done`` components finished (the rest NaN), all by default."""
    rng = np.random.default_rng(7)
    if kind == "heads":
        components = tuple(f"{layer}.{h}" for layer in range(n_layers) for h in range(width))
        shape: tuple[int, ...] = (n_layers, width)
    elif kind == "blocks":
        components = tuple(f"{part}:{layer}" for layer in range(n_layers) for part in ("attn", "mlp"))
        shape = (n_layers, 2)
    else:
        components = tuple(f"{i % n_layers}:{(i * 37) % 1536}" for i in range(n_neurons))
        shape = (n_neurons,)
    effects = (rng.normal(size=shape) * rng.random(size=shape) ** 4).astype(np.float32)
    total = len(components)
    done = total if done is None else done
    effects.reshape(-1)[done:] = np.nan
    toks = tokens(n)
    return SweepResult(
        request=SweepRequest(prompt_of(toks), " Paris", kind=kind, top_n=n_neurons), model="synthetic",
        tokens=toks, token_ids=np.arange(n, dtype=np.int64), target=" Paris", target_id=5, compare=None,
        compare_id=None, components=components, effects=effects, baseline_logit=3.0, baseline_prob=0.4,
        baseline_metric=3.0,
        activations=rng.normal(size=total).astype(np.float32) if kind == "neurons" else None,
        done=done, total=total)


def patch(n: int = CONTEXT, n_layers: int = 30, done: int | None = None) -> PatchResult:
    rng = np.random.default_rng(8)
    clean = tokens(n)
    corrupt = clean.copy()
    corrupt[n - 3] = " London"
    restored = rng.normal(size=(n_layers, n)).astype(np.float32)
    done = n_layers * n if done is None else done
    restored.reshape(-1)[done:] = np.nan
    return PatchResult(
        request=PatchRequest(prompt_of(clean), prompt_of(corrupt), " Paris"), model="synthetic",
        clean_tokens=clean, corrupt_tokens=corrupt, target=" Paris", target_id=5, compare=None, compare_id=None,
        site="resid", layer_labels=tuple(f"L{i}" for i in range(n_layers)), clean_metric=3.0, corrupt_metric=1.0,
        patched=(1.0 + 2.0 * restored).astype(np.float32), restored=restored, done=done, total=n_layers * n)


def prompt_activation(n: int = CONTEXT) -> PromptActivation:
    toks = tokens(n)
    acts = np.sin(np.arange(n) / 7.0).astype(np.float32)
    return PromptActivation(prompt=prompt_of(toks), layer=3, neuron=5, token_ids=np.arange(n, dtype=np.int64),
                            tokens=toks, activations=acts)


def selective(n_layers: int = 126, per_layer: int = 10) -> SelectiveNeurons:
    rng = np.random.default_rng(9)
    m = n_layers * per_layer
    return SelectiveNeurons(
        n_per_layer=per_layer, tokens=100_000, layers=np.repeat(np.arange(n_layers), per_layer).astype(np.int64),
        neurons=rng.integers(0, 1536, m).astype(np.int64), selectivity=rng.random(m) * 30, max=rng.random(m) * 5,
        mean=rng.random(m), std=rng.random(m) + 0.1, frequency=rng.random(m), top_token=tokens(m))


def histogram() -> NeuronHistogram:
    edges = np.concatenate([-np.logspace(3, -3, 97), np.logspace(-3, 3, 97)])
    counts = np.random.default_rng(10).integers(0, 1000, len(edges) + 1).astype(np.int64)
    return NeuronHistogram(layer=3, neuron=5, counts=counts, edges=edges, sampled_tokens=int(counts.sum()), stride=8)


def checkpoints(n: int = 600, rows: int = 127) -> CheckpointComparison:
    """Hundreds of checkpoints of a deep model (lens rows embed, L0 … L125)."""
    rng = np.random.default_rng(11)
    metrics = {m: rng.normal(size=n) for m in ("pronoun_preference", "stereotype_alignment", "minimal_pairs")}
    return CheckpointComparison(
        labels=tuple(f"{'control' if i % 2 else 'swapped'}/step-{i:06d}" for i in range(n)),
        paths=tuple(f"/runs/{i}" for i in range(n)), steps=np.arange(n, dtype=np.int64) * 10, occupations=("nurse",),
        **metrics, **{f"{m}_se": np.abs(v) / 10 for m, v in metrics.items()},
        per_occupation=rng.normal(size=(n, 1)), prompt="The nurse said that " * 40, target=" she",
        target_ids=np.full(n, 5, dtype=np.int64), layer_labels=("embed", *(f"L{i}" for i in range(rows - 1))),
        target_probs=rng.random((n, rows)).astype(np.float32))


def arm(evaluations: int = 2000, steps: int = 20_000) -> ArmMetrics:
    rng = np.random.default_rng(12)
    e = np.arange(evaluations)
    values = {k: rng.normal(size=evaluations) for k in (
        "loss", "train_loss", "pronoun_preference", "pronoun_preference_se", "stereotype_alignment",
        "stereotype_alignment_se", "minimal_pairs", "minimal_pairs_se")}
    return ArmMetrics(arm="control", step=(e * 10).astype(np.int64), **values,
                      tokens_seen=(e * 1000).astype(np.int64), seconds=e * 1.0, eval_seconds=np.ones(evaluations),
                      train_steps=np.arange(steps, dtype=np.int64), train_losses=rng.random(steps), checkpoints=())


def pairs(n: int = 3000) -> PairScores:
    rng = np.random.default_rng(13)
    return PairScores(name="many pairs", more=tuple(f"more {i}" for i in range(n)),
                      less=tuple(f"less {i}" for i in range(n)), ll_more=rng.normal(size=n) - 30,
                      ll_less=rng.normal(size=n) - 30, pct_stereotype=0.5, se=0.01)


def audit(n_pairs: int = 400) -> SwapAudit:
    return SwapAudit(direction="m2f", n_documents=1_000_000, n_changed_documents=654_321,
                     pairs=tuple(f"w{i}→v{i}" for i in range(n_pairs)),
                     counts=np.arange(n_pairs, 0, -1, dtype=np.int64) * 1000, tokens_before=10**9,
                     tokens_after=10**9 + 5, samples=("…said [he→she] would…",))
