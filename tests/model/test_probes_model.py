"""Probes, CCS inputs, patchscopes and the bias data sets on the embedded default model, and their CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest

from cli.main import main
from explorer.analyses.lens import LensRequest, logit_lens
from explorer.analyses.patchscope import patchscope
from explorer.analyses.probes import load_builtin, run_probes

pytestmark = pytest.mark.model


def test_city_vs_animal_is_linearly_readable(default_session):
    data = load_builtin("city_animal")
    result = run_probes(default_session, texts=data.texts, labels=data.labels, folds=3, data_name=data.name)
    assert result.complete and len(result.accuracy) == 31
    best = result.best_row
    assert result.accuracy[best] > 0.85
    # the control stays near chance where the probe is best: 4 SE of a fair coin over 120 texts
    assert abs(result.control_accuracy[best] - 0.5) < 4 * np.sqrt(0.25 / 120)


def test_patchscope_last_block_is_the_lens_and_decodes_paris(default_session):
    prompt = "The capital of France is Paris"
    result = patchscope(default_session, prompt, positions=(-1,), top_k=5)
    lens = logit_lens(default_session, LensRequest(prompt, top_k=5))
    assert list(result.top_ids[-1, 0]) == list(lens.top_ids[-1, -1])
    # with the default identity prompt the next token mostly continues its format (" ->"); ending it
    # in "? ->" and patching the "?" reads the repeated token: " Paris" in the early blocks
    repeat = patchscope(default_session, prompt, positions=(-1,), top_k=1,
                        identity="cat -> cat\n1135 -> 1135\nhello -> hello\n? ->", placeholder=-2)
    assert str(repeat.top_tokens[0, 0, 0]) == " Paris" and str(result.top_tokens[0, 0, 0]) == " ->"


def run_cli(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_probe_json(capsys, tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"text": w, "label": "city"} for w in ("Paris", "Rome", "Oslo", "Lima", "Tokyo", "Cairo")]
    rows += [{"text": w, "label": "animal"} for w in ("dog", "cat", "horse", "tiger", "eagle", "shark")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, _ = run_cli(capsys, "probe", "--data", str(path), "--folds", "3", "--json",
                           "--save-vector", str(tmp_path / "v.safetensors"))
    assert code == 0
    data = json.loads(out)
    assert {"layers", "accuracy", "accuracy_se", "control_accuracy", "best_layer"} <= set(data)
    assert len(data["layers"]) == len(data["accuracy"]) == 31 and data["best_layer"] in data["layers"]


def test_cli_patchscope_and_ccs_json(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "patchscope", "--prompt", "The cat sat", "--position", "-1", "--top-k", "3",
                           "--json")
    assert code == 0
    data = json.loads(out)
    assert len(data["layers"]) == 30 and len(data["top_tokens"]) == 30 and len(data["top_probs"][0]) == 3
    path = tmp_path / "p.jsonl"
    facts = [("Paris is in France.", 1), ("Paris is in Spain.", 0), ("Snow is cold.", 1), ("Snow is hot.", 0),
             ("Two plus two is four.", 1), ("Two plus two is five.", 0), ("Fish swim.", 1), ("Fish fly.", 0)]
    path.write_text("".join(json.dumps({"pos": f"{t} Yes", "neg": f"{t} No", "label": y}) + "\n" for t, y in facts))
    code, out, _ = run_cli(capsys, "ccs", "--data", str(path), "--epochs", "20", "--restarts", "2", "--json")
    assert code == 0
    data = json.loads(out)
    assert {"layers", "accuracy", "accuracy_se", "control_accuracy", "best_layer"} <= set(data)


def test_cli_bad_input_fails_before_the_model(capsys, tmp_path):
    code, _, err = run_cli(capsys, "probe", "--data", str(tmp_path / "missing.jsonl"), "--json")
    assert code == 2 and err.startswith("error: data file not found")
    bad = tmp_path / "one.jsonl"
    bad.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "x"}\n')
    code, _, err = run_cli(capsys, "probe", "--data", str(bad))
    assert code == 2 and "two label values" in err
    code, _, err = run_cli(capsys, "ccs", "--data", str(tmp_path / "missing.jsonl"))
    assert code == 2 and "cannot read" in err


def test_cli_bias_dataset_json(capsys):
    code, out, _ = run_cli(capsys, "bias", "--dataset", "crows", "--max-items", "12", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["dataset"] == "crows" and data["metric"] == "pct_stereotype" and data["n"] == 12
    assert 0 <= data["value"] <= 1 and data["se"] > 0
    code, _, err = run_cli(capsys, "bias", "--dataset", "winobias", "--max-items", "0")
    assert code == 2 and "--max-items: must be at least 1" in err
