"""SAE features in the ablation sweep and in activation patching (explorer.features.sweeps, reached
through ``sweep(kind="features")`` and ``patch(site="features")``), against plain loops: a tiny
random TopK SAE written out here, encoded by hand, and a separate copy of the tiny model run once
per feature (or feature × position) with a PyTorch forward hook on the block's output that edits
the features and keeps the error term."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cli.main import main
from explorer.core.errors import ExplorerError
from explorer.interventions.ablation import SweepRequest, sweep
from explorer.interventions.patching import PatchRequest, patch
from helpers import plain_copy, random_sae_weights, save_model_dir, save_topk_sae, topk_encode

CLEAN, CORRUPT, TARGET, COMPARE = "The capital of France is", "The capital of Italy is", " Paris", " Rome"
LAYER, D, D_SAE, K = 1, 64, 96, 6


def sae_weights(seed: int = 1) -> dict[str, torch.Tensor]:
    return random_sae_weights(D, D_SAE, seed)


def ref_encode(x: torch.Tensor) -> torch.Tensor:
    return topk_encode(sae_weights(), x, K)


def set_features(x: torch.Tensor, values: dict[int, float]) -> torch.Tensor:
    """x + Σ_j (v_j − f_j(x)) W_dec[j]: the features set, the error term kept."""
    w = sae_weights()
    f = ref_encode(x)
    delta = sum((v - f[..., j:j + 1]) * w["W_dec"][j].double() for j, v in values.items())
    return (x.double() + delta).to(x.dtype)


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory):
    return save_topk_sae(tmp_path_factory.mktemp("sae"), sae_weights(), LAYER, K)


@pytest.fixture(scope="module")
def session(tiny_sessions):
    return tiny_sessions["llama"]


@pytest.fixture(scope="module")
def plain(tokenizer, session):
    return plain_copy(tokenizer, session)


def run_plain(plain, ids: torch.Tensor, edit=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(last-position logits, block LAYER's output [T, d]); ``edit(h)`` rewrites that output."""
    seen = {}

    def hook(mod, args, out):
        h = out[0] if isinstance(out, tuple) else out
        seen["h"] = h[0].detach().clone()
        if edit is not None:
            h = edit(h)
        return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h

    handle = plain.model.layers[LAYER].register_forward_hook(hook)
    try:
        with torch.no_grad():
            logits = plain(ids[None]).logits[0, -1].double()
    finally:
        handle.remove()
    return logits, seen["h"]


def ref_metric(session, logits) -> float:
    return float(logits[session.token_id(TARGET)] - logits[session.token_id(COMPARE)])


@pytest.mark.parametrize("method", ["exact", "sequential"])
def test_feature_sweep_equals_a_plain_loop(session, plain, sae_dir, method):
    ids = session.encode(CLEAN)
    base_logits, h = run_plain(plain, ids)
    f = ref_encode(h)                                             # [T, d_sae]
    peak = f.abs().max(0).values
    want_order = [int(j) for j in torch.argsort(peak, descending=True, stable=True)[:5] if peak[j] > 0]
    base = ref_metric(session, base_logits)
    got = sweep(session, SweepRequest(CLEAN, TARGET, kind="features", top_n=5, method=method,
                                      compare_token=COMPARE, sae=str(sae_dir)))
    assert got.complete and got.components == tuple(f"sae:{j}" for j in want_order)
    assert got.baseline_metric == pytest.approx(base, abs=1e-4)
    np.testing.assert_allclose(got.activations, [float(peak[j]) for j in want_order], rtol=1e-4, atol=1e-4)
    for j, effect in zip(want_order, got.effects):
        logits, _ = run_plain(plain, ids, lambda h, j=j: set_features(h, {j: 0.0}))
        assert effect == pytest.approx(ref_metric(session, logits) - base, abs=2e-4), j
    assert np.abs(got.effects).max() > 1e-3          # the features matter on this prompt
    assert got.top(1)[0][0].startswith("sae:")


def test_feature_patching_equals_a_plain_loop(session, plain, sae_dir):
    clean_ids, corrupt_ids = session.encode(CLEAN), session.encode(CORRUPT)
    assert clean_ids.numel() == corrupt_ids.numel()
    clean_logits, h_clean = run_plain(plain, clean_ids)
    corrupt_logits, h_corrupt = run_plain(plain, corrupt_ids)
    f_clean, f_corrupt = ref_encode(h_clean), ref_encode(h_corrupt)
    diff = (f_clean - f_corrupt).abs().sum(0)
    want = [int(j) for j in torch.argsort(diff, descending=True, stable=True)[:3] if diff[j] > 0]
    m_clean, m_corrupt = ref_metric(session, clean_logits), ref_metric(session, corrupt_logits)
    got = patch(session, PatchRequest(CLEAN, CORRUPT, TARGET, site="features", compare_token=COMPARE,
                                      sae=str(sae_dir), top_n=3))
    assert got.complete and got.site == "features" and got.layer_labels == tuple(f"f{j}" for j in want)
    assert got.restored.shape == (len(want), clean_ids.numel())
    assert (got.clean_metric, got.corrupt_metric) == pytest.approx((m_clean, m_corrupt), abs=1e-4)
    for r, j in enumerate(want):
        for p in range(clean_ids.numel()):
            def edit(h, j=j, p=p):
                h = h.clone()
                h[:, p] = set_features(h[:, p], {j: float(f_clean[p, j])})
                return h

            logits, _ = run_plain(plain, corrupt_ids, edit)
            restored = (ref_metric(session, logits) - m_corrupt) / (m_clean - m_corrupt)
            assert got.restored[r, p] == pytest.approx(restored, abs=2e-4), (j, p)
    # Listed features instead of the top ones; the order is kept.
    listed = patch(session, PatchRequest(CLEAN, CORRUPT, TARGET, site="features", compare_token=COMPARE,
                                         sae=str(sae_dir), features=f"{want[1]}, {want[0]}"))
    np.testing.assert_allclose(listed.restored, got.restored[[1, 0]], atol=1e-5)


def test_bad_feature_sweeps_and_patches(session, sae_dir):
    with pytest.raises(ExplorerError, match="SAE folder"):
        sweep(session, CLEAN, target=TARGET, kind="features")
    with pytest.raises(ExplorerError, match="exact or sequential"):
        sweep(session, CLEAN, target=TARGET, kind="features", sae=str(sae_dir), method="attribution")
    with pytest.raises(ExplorerError, match="mode zero"):
        sweep(session, CLEAN, target=TARGET, kind="features", sae=str(sae_dir), mode="mean")
    with pytest.raises(ExplorerError, match="feature numbers only"):
        patch(session, CLEAN, corrupt=CORRUPT, target=TARGET, site="features", sae=str(sae_dir), features="3=2")
    with pytest.raises(ExplorerError, match="out of range"):
        patch(session, CLEAN, corrupt=CORRUPT, target=TARGET, site="features", sae=str(sae_dir), features="999")
    with pytest.raises(ExplorerError, match="equal token length"):
        patch(session, CLEAN, corrupt="Paris", target=TARGET, site="features", sae=str(sae_dir))


# ================================================================================== CLI
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer, session):
    return save_model_dir(tmp_path_factory.mktemp("tiny-llama-dir"), session.hf, tokenizer)


def test_cli_feature_sweep_and_patch(tiny_dir, sae_dir, session, capsys):
    model = ["--model", str(tiny_dir), "--device", "cpu", "--dtype", "float32"]
    assert main(["ablate", *model, "--prompt", CLEAN, "--target", TARGET, "--compare", COMPARE,
                 "--sweep", "features", "--sae", str(sae_dir), "--top-n", "4", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    want = sweep(session, SweepRequest(CLEAN, TARGET, kind="features", top_n=4, compare_token=COMPARE,
                                       sae=str(sae_dir)))
    assert data["components"] == list(want.components)
    np.testing.assert_allclose(data["effects"], want.effects, atol=1e-4)
    assert main(["patch", *model, "--clean", CLEAN, "--corrupt", CORRUPT, "--target", TARGET, "--compare", COMPARE,
                 "--site", "features", "--sae", str(sae_dir), "--top-n", "2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["site"] == "features" and len(data["layer_labels"]) == 2 and data["layer_labels"][0].startswith("f")
    # Checked before the model loads: one line on stderr.
    for argv in (["ablate", "--prompt", CLEAN, "--target", TARGET, "--sweep", "features"],
                 ["patch", "--clean", CLEAN, "--corrupt", CORRUPT, "--target", TARGET, "--site", "features"],
                 ["ablate", "--prompt", CLEAN, "--target", TARGET, "--sweep", "features", "--sae", "/nope"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and ("--sae" in err or "SAE" in err), err


# ============================================================================ the Ablation tab
def test_ablation_tab_feature_sweep_and_patching(session, sae_dir):
    from widgets.ablation_sweep import AblationSweep
    from widgets.patching_view import PatchingPanel

    part = AblationSweep(session, prompt=CLEAN, target=TARGET, compare_token=COMPARE)
    part.param.update(kind="features", sae_dir=str(sae_dir), top_n=4)
    part.__panel__()
    part.run(background=False)
    r = part.result
    assert r is not None and r.complete and r.request.kind == "features" and r.request.sae == str(sae_dir)
    assert len(r.components) == 4 and part._pane.object is not None
    assert "SAE features" in part._pane.object.title.text
    part.kind = "heads"
    assert part.request().sae is None            # the folder goes only with a feature sweep

    panel = PatchingPanel(session, clean=CLEAN, corrupt=CORRUPT, target=TARGET, compare_token=COMPARE)
    panel.param.update(site="features", sae_dir=str(sae_dir), top_n=2)
    panel.__panel__()
    panel.run(background=False)
    p = panel.result
    assert p is not None and p.complete and p.site == "features" and p.restored.shape[0] == 2
    assert panel._pane.object.yaxis.axis_label == "SAE feature"
    panel.site = "resid"
    assert panel.request().sae is None and panel.request().features == ""
