"""The overthinking experiment on the embedded default model (SmolLM2-135M: 30 layers, 9 heads, 3 KV).

Small settings (12 prompts per condition, 6 demonstrations, one random draw) so it runs in
seconds on an idle 2-core machine; the notebook runs the full-size version.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from explorer.analyses.demonstrations import DemoRequest, OverthinkingRequest, overthinking

pytestmark = pytest.mark.model

REQUEST = OverthinkingRequest(DemoRequest(n_prompts=12, n_demos=6, seed=0, batch_size=12), n_ablate=5, n_random=1)


@pytest.fixture(scope="module")
def result(default_session):
    return overthinking(default_session, REQUEST)


def test_the_pipeline_runs_and_its_numbers_are_consistent(result):
    lens = result.lens
    assert result.validate() is None
    assert lens.label_logits.shape == (2, 12, 31, 3)
    assert lens.attn_same.shape == (2, 12, 30, 9)
    for x in (lens.label_logits, lens.attn_same, lens.attn_other, result.ablated_top, result.ablated_random):
        assert np.all(np.isfinite(x))
    for x in (lens.accuracy, lens.calibrated, lens.follows_demonstrations, result.top_accuracy,
              result.random_accuracy):
        assert np.all((0 <= x) & (x <= 1))
    # Attention to the labels is a part of one softmax row.
    total = lens.attn_same + lens.attn_other
    assert np.all(lens.attn_same >= 0) and np.all(lens.attn_other >= 0) and np.all(total <= 1 + 1e-5)
    # The five candidates are the five best scores, and no random head is one of them.
    assert result.top_heads.tolist() == [f"{l}.{h}" for l, h, _ in lens.top_heads(5)]
    assert not set(result.random_heads.ravel()) & set(result.top_heads)
    print(f"\nfinal accuracy correct/permuted {result.clean_accuracy}, critical layer "
          f"{result.critical_layer()}, top heads {result.top_heads.tolist()}, gap {result.clean_gap:.3f} -> "
          f"{result.top_gap:.3f} (top) / {result.random_gaps.tolist()} (random)")


def test_correct_demonstrations_give_above_chance_accuracy(result):
    acc = result.lens.accuracy
    assert acc[0, -1] > 0.5          # chance is 1/3: at least 7 of the 12 queries right
    assert acc[0, -1] > acc[1, -1]   # permuted demonstrations hurt


def test_the_last_row_is_the_models_own_prediction(result, default_session):
    """The padded batch's final row equals a plain, unpadded forward of each prompt."""
    ps = result.lens.prompts
    model = default_session.hf
    with torch.no_grad():
        for cond, i in [(0, 0), (1, 5), (0, int(np.argmin(ps.n_tokens[0])))]:
            ids = default_session.encode(str(ps.prompts[cond, i]))[None]
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1]
            np.testing.assert_allclose(result.lens.label_logits[cond, i, -1], logits[ps.label_ids].numpy(),
                                       atol=2e-4)
