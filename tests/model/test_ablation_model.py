"""Ablation, sweeps and patching on the embedded default model: CLI JSON shapes, errors, accuracy."""
from __future__ import annotations

import json

import numpy as np
import pytest

from cli.main import main
from explorer.interventions.ablation import AblationRequest, SweepRequest, ablate, spearman, sweep

pytestmark = pytest.mark.model

PROMPT = "The capital of France is"
SPAIN = "The capital of Spain is"


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def _model(default_model_dir) -> list[str]:
    return ["--model", str(default_model_dir), "--device", "cpu", "--dtype", "float32"]


def test_ablate_heads_json(capsys, default_model_dir):
    code, out, _ = run_cli(capsys, "ablate", *_model(default_model_dir), "--prompt", PROMPT, "--target", " Paris",
                           "--heads", "15.3,20.1", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["type"] == "AblationResult" and data["components"] == ["15.3", "20.1"]
    for key in ("baseline", "ablated"):
        assert {"logit", "prob", "rank"} <= set(data[key])
        assert isinstance(data[key]["rank"], int) and 0 < data[key]["prob"] <= 1
    assert data["baseline"]["rank"] == 1  # the model answers Paris
    assert data["effect"] == pytest.approx(data["ablated"]["logit"] - data["baseline"]["logit"])
    assert data["lens_baseline"] is None  # only with --lens


def test_ablate_blocks_neurons_modes(capsys, default_model_dir):
    code, out, _ = run_cli(capsys, "ablate", *_model(default_model_dir), "--prompt", PROMPT, "--target", " Paris",
                           "--neurons", "10:5", "--blocks", "mlp:0,attn:3", "--mode", "resample",
                           "--second-prompt", SPAIN, "--compare", " Madrid", "--lens", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["components"] == ["mlp:0", "attn:3", "10:5"]
    assert data["ablated"]["logit_diff"] < data["baseline"]["logit_diff"]  # Spain's activations pull to Madrid
    assert len(data["lens_ablated"]["target_probs"]) == 31
    code, out, _ = run_cli(capsys, "ablate", *_model(default_model_dir), "--prompt", PROMPT, "--target", " Paris",
                           "--blocks", "block:29", "--mode", "mean")
    assert code == 0 and "ablated (mean): block:29" in out and "effect:" in out


def test_sweep_heads_json_and_progress(capsys, default_model_dir):
    code, out, err = run_cli(capsys, "ablate", *_model(default_model_dir), "--prompt", PROMPT, "--target", " Paris",
                             "--sweep", "heads", "--json")
    assert code == 0
    data = json.loads(out)
    effects = np.array(data["effects"])
    assert effects.shape == (30, 9) and np.isfinite(effects).all()
    assert len(data["components"]) == 270 and data["components"][9] == "1.0"
    assert "sweep heads" in err and "270/270" in err  # the tqdm bar on stderr


def test_sweep_blocks_json_and_table(capsys, default_model_dir):
    code, out, _ = run_cli(capsys, "ablate", *_model(default_model_dir), "--prompt", PROMPT, "--target", " Paris",
                           "--sweep", "blocks", "--json")
    assert code == 0
    effects = np.array(json.loads(out)["effects"])
    assert effects.shape == (30, 2) and np.isfinite(effects).all()
    code, out, _ = run_cli(capsys, "ablate", *_model(default_model_dir), "--prompt", PROMPT, "--target", " Paris",
                           "--sweep", "neurons", "--top-n", "5", "--method", "attribution")
    assert code == 0 and "largest effects:" in out


def test_patch_json(capsys, default_model_dir):
    code, out, err = run_cli(capsys, "patch", *_model(default_model_dir), "--clean", PROMPT, "--corrupt", SPAIN,
                             "--target", " Paris", "--compare", " Madrid", "--json")
    assert code == 0
    data = json.loads(out)
    restored = np.array(data["restored"])
    assert restored.shape == (30, 5) and data["site"] == "resid"
    assert restored[-1, -1] == pytest.approx(1.0, abs=1e-3)
    # Early layers: the answer lives at the country's position (causal tracing's classic picture).
    assert restored[0, 3] == pytest.approx(1.0, abs=0.05) and abs(restored[0, 4]) < 0.1
    assert data["clean_metric"] > 0 > data["corrupt_metric"]
    assert "patch resid" in err


@pytest.mark.parametrize("args,message", [
    (["ablate", "--prompt", PROMPT, "--target", " Paris", "--heads", "3.x"], "cannot read component '3.x'"),
    (["ablate", "--prompt", PROMPT, "--target", " Paris", "--heads", "3.9"], "head 9 in '3.9' is out of range"),
    (["ablate", "--prompt", PROMPT, "--target", " Paris", "--neurons", "2:99999"], "each MLP has 1536 neurons"),
    (["ablate", "--prompt", PROMPT, "--target", " Paris"], "nothing to ablate"),
    (["ablate", "--prompt", PROMPT, "--target", " Paris", "--heads", "1.1", "--sweep", "heads"], "not both"),
    (["ablate", "--prompt", PROMPT, "--target", " Paris", "--heads", "1.1", "--mode", "resample"],
     "needs --second-prompt"),
    (["ablate", "--prompt", PROMPT, "--target", " Paris", "--heads", "1.1", "--mode", "resample",
      "--second-prompt", "The capital city of Spain is"], "equal token length"),
    (["ablate", "--prompt", PROMPT, "--target", " Parisians", "--heads", "1.1"], "pick a single token"),
    (["patch", "--clean", PROMPT, "--corrupt", "Spain", "--target", " Paris"], "equal token length"),
    (["ablate", "--prompt", "", "--target", " Paris", "--heads", "1.1"], "the prompt is empty"),
])
def test_bad_input_one_line_exit_2(capsys, default_model_dir, args, message):
    code, out, err = run_cli(capsys, *args[:1], *_model(default_model_dir), *args[1:])
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err


def test_exact_sweep_matches_single_ablations_and_attribution_ranks(default_session):
    exact = sweep(default_session, SweepRequest(PROMPT, " Paris", kind="heads"))
    for spec in ("0.4", "14.7", "29.8"):
        layer, head = map(int, spec.split("."))
        single = ablate(default_session, AblationRequest(PROMPT, " Paris", (spec,), lens=False))
        assert exact.effects[layer, head] == pytest.approx(single.effect, abs=2e-4)
    approx = sweep(default_session, SweepRequest(PROMPT, " Paris", kind="heads", method="attribution"))
    rho = spearman(approx.effects, exact.effects)
    print(f"attribution vs exact head sweep on the default model: Spearman {rho:.3f}")
    assert rho > 0.8
