"""The swap takes effect on the embedded default model (SmolLM2-135M) trained on the news corpus.

The full demo (``python -m explorer intervene``: 40 steps, evaluations every 10) takes minutes;
this is a shorter real run with the demo's settings otherwise (last 4 blocks, batch 8 × 64
tokens, lr 3e-4, the reduced probe set). What it must show: the swapped arm's pronoun
preference has moved toward " she" relative to the control by more than two standard errors,
while the held-out loss stays sane. It also prints all three metrics of both arms.
"""
from __future__ import annotations

import math

import pytest

from explorer.training.bias import BiasRequest, bias_probe
from explorer.training.intervene import InterventionConfig, read_jsonl, run_intervention

pytestmark = pytest.mark.model

STEPS = 6


@pytest.fixture(scope="module")
def short_run(default_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("swap-run")
    config = InterventionConfig(steps=STEPS, eval_every=STEPS, checkpoint_every=STEPS, device="cpu")
    return out, run_intervention(default_session, config, out_dir=out)


def test_the_swap_moves_the_pronoun_prior_toward_she(short_run):
    out, result = short_run
    c, s = result.control, result.swapped
    assert c.step.tolist() == s.step.tolist() == [0, STEPS]
    for arm in (c, s):
        print(f"{arm.arm:>8}: pronoun preference {arm.pronoun_preference[0]:+.3f} → {arm.pronoun_preference[-1]:+.3f} "
              f"(± {arm.pronoun_preference_se[-1]:.3f}), stereotype alignment {arm.stereotype_alignment[0]:+.3f} → "
              f"{arm.stereotype_alignment[-1]:+.3f}, minimal pairs {arm.minimal_pairs[0]:.3f} → "
              f"{arm.minimal_pairs[-1]:.3f}, held-out loss {arm.loss[0]:.3f} → {arm.loss[-1]:.3f}")
    effect = result.effect()
    print(f"swapped − control: {effect['difference']:+.3f} ± {effect['se']:.3f} ({effect['z']:+.1f} SE)")
    assert effect["difference"] < -2 * effect["se"]          # the swap took effect
    assert s.pronoun_preference[-1] < s.pronoun_preference[0]  # and the swapped arm itself moved toward " she"
    for arm in (c, s):  # training did not wreck the model
        assert math.isfinite(arm.loss[-1]) and arm.loss[-1] < arm.loss[0] + 0.5
    a = result.audit
    assert a.count("he→she") > 50
    assert abs(a.tokens_after - a.tokens_before) < 0.002 * a.tokens_before  # the arms' windows barely drift


def test_the_checkpoint_is_the_trained_model(short_run, default_session):
    from explorer.core.session import ModelSession

    out, result = short_run
    ckpt = result.swapped.checkpoints[-1]
    session = ModelSession.load(ckpt, device="cpu", dtype="float32")
    probe = bias_probe(session, BiasRequest(max_templates=3))
    assert probe.pronoun_preference == pytest.approx(result.swapped.pronoun_preference[-1], abs=1e-4)
    # The starting model (the attached session) is untouched by the run.
    start = bias_probe(default_session, BiasRequest(max_templates=3))
    assert start.pronoun_preference == pytest.approx(read_jsonl(out / "control" / "metrics.jsonl")[0]["pronoun_preference"],
                                                     abs=1e-4)
