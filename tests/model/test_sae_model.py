"""A small TopK SAE trained briefly on the embedded default model (layer 12 residual), then used.

Figures are printed, not asserted tight: a few thousand tokens make a poor SAE, but its FVU must
fall and beat the mean (FVU < 1), its spliced-in reconstruction must leave a finite Δ LM loss,
and its stored weights must encode a prompt exactly as a plain reimplementation does.
"""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from explorer.features.encode import encode_prompt
from explorer.features.harvest import activations
from explorer.features.saelens_io import load_sae
from explorer.features.train import train_sae

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def trained(default_session, tmp_path_factory):
    t0 = time.monotonic()
    run = train_sae(default_session, layer=12, site="resid", width=1152, k=32, max_tokens=6144, window=64,
                    batch=512, batch_windows=16, eval_windows=4, eval_every=3, lr=1e-3,
                    out_dir=tmp_path_factory.mktemp("sae"))
    print(f"\nSAE L12 resid, width 1152, k 32: {run.tokens} tokens in {time.monotonic() - t0:.1f} s; "
          f"FVU {run.fvu:.3f}, L0 {run.l0:.1f}, dead {run.dead_fraction:.1%}, Δ loss {run.delta_loss:+.3f} nats "
          f"(clean {run.clean_loss:.3f}); train FVU {np.round(run.log_fvu, 3).tolist()}")
    return run


def test_a_small_sae_trains_on_the_default_model(trained):
    assert trained.status == "done" and trained.tokens == 6144
    assert trained.log_fvu[-1] < trained.log_fvu[0]
    assert trained.fvu < 1.0 and trained.eval_fvu[-1] < trained.eval_fvu[0]
    assert trained.l0 == 32
    assert np.isfinite(trained.delta_loss) and trained.delta_loss > -0.05


def test_its_features_encode_a_prompt_as_the_plain_definition(trained, default_session):
    result = encode_prompt(default_session, "The capital of France is", sae=trained.out_dir, top_k=5)
    assert result.tokens.tolist() == ["The", " capital", " of", " France", " is"]
    sae = load_sae(trained.out_dir)
    x = activations(default_session, default_session.encode(result.prompt)[None], 12, "resid")[0].float()
    w = {k: v.double() for k, v in sae.weights().items()}
    h = (x.double() - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    for t in range(len(result.tokens)):
        top = torch.argsort(h[t], descending=True)[:5]
        assert result.features[t].tolist() == top.tolist()
        np.testing.assert_allclose(result.activations[t], h[t, top].clamp(min=0).numpy(), rtol=1e-4, atol=1e-5)
