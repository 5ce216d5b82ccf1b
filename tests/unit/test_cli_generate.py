"""``generate`` and ``steer build|apply|sweep`` on the command line: bad arguments fail before any
model loads; on a tiny saved model the JSON output equals the engine's own results."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cli.main import main
from explorer.core.errors import ExplorerError
from explorer.core.session import ModelSession
from explorer.interventions.generate import Intervention, generate
from explorer.interventions.steering import SteeringVector, build_vector, save_vector, steer_apply
from tiny_models import make_tiny_model

POS = ("I love this movie", "What a wonderful day")
NEG = ("I hate this movie", "What a terrible day")
PROMPT = "I think this film is"


class LoaderCalled(ExplorerError):
    pass


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise LoaderCalled("a model was loaded")

    monkeypatch.setattr("explorer.core.session.ModelSession.load", refuse)
    return refuse


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model("llama", len(tokenizer), seed=2).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return ModelSession.load(str(tiny_dir), device="cpu", dtype="float32")


@pytest.fixture
def files(tmp_path):
    pos, neg = tmp_path / "pos.txt", tmp_path / "neg.txt"
    pos.write_text("\n".join(POS) + "\n")
    neg.write_text("\n".join(NEG) + "\n")
    return pos, neg


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _vec(tmp_path, width: int, model: str = "") -> str:
    vec = SteeringVector(model=model, layer=1, method="mean", vector=np.ones(width, np.float32),
                         positive=(), negative=(), positive_tokens=(), negative_tokens=())
    return str(save_vector(vec, tmp_path / f"v{width}{model}.safetensors"))


def test_bad_arguments_fail_before_the_model_loads(tiny_dir, files, tmp_path, capsys, no_model_load):
    pos, neg = files
    short = tmp_path / "short.txt"
    short.write_text("only one\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    wide = _vec(tmp_path, 32)
    good = _vec(tmp_path, 64)
    cases = [
        (["generate", "--prompt", "x", "--top-p", "0"], "--top-p"),
        (["generate", "--prompt", "x", "--temperature", "-1"], "--temperature"),
        (["generate", "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["generate", "--prompt", "", "--model", tiny_dir], "--prompt"),
        (["generate", "--prompt", "x", "--model", tiny_dir, "--layer", "1"], "--layer needs --steer"),
        (["generate", "--prompt", "x", "--model", tiny_dir, "--steer", wide], "32 values"),
        (["generate", "--prompt", "x", "--model", tiny_dir, "--steer", good, "--layer", "3"],
         "--layer 3 does not exist"),
        (["generate", "--prompt", "x", "--model", tiny_dir, "--ablate", "5.1"], "out of range"),
        (["generate", "--prompt", "x", "--model", tiny_dir, "--ab"], "--ab compares"),
        (["generate", "--prompt", "x", "--steer", tmp_path / "missing.safetensors"], "not found"),
        (["steer", "build", "--model", tiny_dir, "--pos", pos, "--neg", short, "--layer", "1", "--out", tmp_path / "o"],
         "as many of each"),
        (["steer", "build", "--model", tiny_dir, "--pos", empty, "--neg", neg, "--layer", "1", "--out", tmp_path / "o"],
         "empty"),
        (["steer", "build", "--model", tiny_dir, "--pos", pos, "--neg", neg, "--layer", "9", "--out", tmp_path / "o"],
         "does not exist"),
        (["steer", "apply", "--model", tiny_dir, "--vector", wide, "--prompt", "x", "--target", " a"], "32 values"),
        (["steer", "apply", "--model", tiny_dir, "--vector", _vec(tmp_path, 64, "other-model"), "--prompt", "x",
          "--target", " a"], "other-model"),
        (["steer", "sweep", "--model", tiny_dir, "--vector", good, "--alphas", "a,b", "--prompt", "x",
          "--target", " a"], "α values"),
    ]
    for argv, message in cases:
        code, out, err = run(capsys, *argv)
        assert code == 2, (argv, err)
        assert message in err and "a model was loaded" not in err, (argv, err)
        assert err.count("\n") == 1 and out == ""


def test_generate_json_equals_the_engine(tiny_dir, tiny, tmp_path, capsys):
    code, out, _ = run(capsys, "generate", "--model", tiny_dir, "--device", "cpu", "--prompt", PROMPT,
                       "--max-new-tokens", "6", "--json")
    data = json.loads(out)
    want = generate(tiny, PROMPT, max_new_tokens=6).baseline
    assert code == 0 and set(data) >= {"text", "tokens", "token_ids"}
    assert data["token_ids"] == want.token_ids.tolist() and data["text"] == want.text
    # Sampling with a seed, and steering with the A/B arms.
    vec = build_vector(tiny, positive=POS, negative=NEG, layer=1)
    path = save_vector(vec, tmp_path / "v.safetensors")
    code, out, _ = run(capsys, "generate", "--model", tiny_dir, "--prompt", PROMPT, "--max-new-tokens", "6",
                       "--temperature", "0.9", "--seed", "4", "--steer", path, "--alpha", "3", "--ab", "--json")
    data = json.loads(out)
    want = generate(tiny, PROMPT, max_new_tokens=6, temperature=0.9, seed=4,
                    intervention=Intervention(steer=vec.vector, layer=1, alpha=3.0))
    assert data["token_ids"] == want.intervened.token_ids.tolist()
    assert data["baseline"]["token_ids"] == want.baseline.token_ids.tolist()


def test_steer_build_apply_sweep(tiny_dir, tiny, files, tmp_path, capsys):
    pos, neg = files
    out_path = tmp_path / "built.safetensors"
    code, out, _ = run(capsys, "steer", "build", "--model", tiny_dir, "--pos", pos, "--neg", neg, "--layer", "1",
                       "--method", "pca", "--out", out_path, "--json")
    info = json.loads(out)
    assert code == 0 and info["layer"] == 1 and info["positive_tokens"] == [" movie", " day"]
    want = build_vector(tiny, positive=POS, negative=NEG, layer=1, method="pca")
    from explorer.interventions.steering import load_vector

    np.testing.assert_allclose(load_vector(out_path).vector, want.vector, atol=1e-6)
    code, out, _ = run(capsys, "steer", "apply", "--model", tiny_dir, "--vector", out_path, "--alpha", "2",
                       "--prompt", PROMPT, "--target", " great", "--json")
    data = json.loads(out)
    ref = steer_apply(tiny, PROMPT, target=" great", vector=want, alpha=2.0)
    assert set(data["baseline"]) >= {"logit", "prob", "rank"} and set(data["steered"]) >= {"logit", "prob", "rank"}
    assert data["steered"]["logit"] == pytest.approx(ref.steered.logit, abs=1e-4)
    assert data["baseline"]["rank"] == ref.baseline.rank
    code, out, _ = run(capsys, "steer", "sweep", "--model", tiny_dir, "--vector", out_path, "--alphas=-2,0,2",
                       "--prompt", PROMPT, "--target", " great", "--json")
    data = json.loads(out)
    assert code == 0 and data["alphas"] == [-2.0, 0.0, 2.0]
    assert data["metric"][2] == pytest.approx(ref.steered.logit, abs=1e-4)
    assert data["metric"][1] == pytest.approx(ref.baseline.logit, abs=1e-4)
    assert torch.isfinite(torch.tensor(data["metric"])).all()
