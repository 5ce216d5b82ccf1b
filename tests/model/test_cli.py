"""The CLI on the embedded default model: JSON shapes, and one-line errors for bad input."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cli.main import main

pytestmark = pytest.mark.model


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_info_json(capsys, default_model_dir):
    code, out, _ = run_cli(capsys, "info", "--model", str(default_model_dir), "--json")
    assert code == 0
    model = json.loads(out)["model"]
    assert model["path"] == str(default_model_dir)
    assert (model["architecture"], model["n_layers"], model["n_heads"], model["d_model"]) == (
        "LlamaForCausalLM", 30, 9, 576)
    assert model["device"] == "cpu" and model["dtype"] == "float32"
    assert {"name", "path", "architecture", "n_layers", "n_heads", "d_model", "device", "dtype"} <= set(model)


def test_info_default_model_without_flag(capsys, default_model_dir):
    code, out, _ = run_cli(capsys, "info", "--json")
    assert code == 0
    assert json.loads(out)["model"]["name"] == "SmolLM2-135M-Instruct"


def test_lens_json_ends_on_paris(capsys, default_model_dir):
    code, out, _ = run_cli(capsys, "lens", "--model", str(default_model_dir),
                           "--prompt", "The capital of France is", "--top-k", "5", "--json")
    assert code == 0
    data = json.loads(out)
    n_rows, n_pos = 31, len(data["tokens"])
    assert data["tokens"] == ["The", " capital", " of", " France", " is"]
    assert len(data["layer_labels"]) == n_rows and data["layer_labels"][0] == "embed"
    assert len(data["top_tokens"]) == n_rows and len(data["top_tokens"][0]) == n_pos
    assert len(data["top_tokens"][0][0]) == 5 and len(data["top_probs"][-1][-1]) == 5
    assert data["top_tokens"][-1][-1][0] == " Paris"
    assert len(data["kl_to_final"]) == n_rows and len(data["kl_to_final"][0]) == n_pos
    assert data["target"] == " Paris"
    assert data["target_probs"][-1][-1] == pytest.approx(data["top_probs"][-1][-1][0])


def test_lens_explicit_target_and_table(capsys, default_model_dir):
    code, out, _ = run_cli(capsys, "lens", "--model", str(default_model_dir),
                           "--prompt", "The capital of France is", "--target", " London")
    assert code == 0
    assert "target: ' London'" in out
    assert out.count("\n") > 31  # one line per row plus headers
    last = [line for line in out.splitlines() if line.strip().startswith("L29")][0]
    assert "Paris" in last


def test_lens_compare_json(capsys, default_model_dir):
    code, out, _ = run_cli(capsys, "lens", "--model", str(default_model_dir),
                           "--prompt", "The capital of France is",
                           "--compare", "The capital of Germany is Berlin. The capital of France is", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["a"]["target"] == data["b"]["target"] == " Paris"
    assert "divergence_row" in data


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory):
    from transformers import BertConfig, LlamaConfig

    root = tmp_path_factory.mktemp("bad")
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=64).save_pretrained(root / "bert")
    LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=64).save_pretrained(root / "llama-no-weights")
    (root / "empty").mkdir()
    return root


@pytest.mark.parametrize("args, message", [
    (["lens", "--prompt", ""], "empty"),
    (["lens", "--prompt", "word " * 9000], "context"),
    (["lens", "--prompt", "hi", "--target", " Parisian"], "single token"),
    (["info", "--model", "/no/such/model"], "not found"),
    (["info", "--model", "{bad}/empty"], "config.json"),
    (["info", "--model", "{bad}/bert"], "no architecture adapter for model type 'bert'"),
    (["info", "--model", "{bad}/llama-no-weights"], "weights"),
])
def test_bad_input_is_one_line_no_traceback(args, message, bad_models):
    args = [a.replace("{bad}", str(bad_models)) for a in args]
    proc = subprocess.run([sys.executable, "-m", "explorer", *args], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert message in lines[0]
