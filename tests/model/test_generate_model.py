"""Generation and steering on the embedded default model: greedy equals transformers' generate
(plain prompt and chat template), a sentiment vector moves the target logit difference with α,
and the CLI's JSON."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from cli.main import main
from explorer.interventions.generate import Intervention, generate
from explorer.interventions.steering import build_vector, steer_sweep

pytestmark = pytest.mark.model

POS = ("I love this movie", "What a wonderful day")
NEG = ("I hate this movie", "What a terrible day")


@pytest.fixture(scope="module")
def reference(default_model_dir):
    return AutoModelForCausalLM.from_pretrained(str(default_model_dir), dtype=torch.float32).eval()


@pytest.mark.parametrize("chat", [False, True])
def test_greedy_equals_transformers_generate(default_session, reference, chat):
    got = generate(default_session, "The capital of France is", max_new_tokens=16, chat=chat)
    ids = torch.tensor(got.prompt_ids)[None]
    eos = default_session.tokenizer.eos_token_id
    with torch.no_grad():
        want = reference.generate(ids, attention_mask=torch.ones_like(ids),
                                  generation_config=GenerationConfig(max_new_tokens=16, do_sample=False,
                                                                     eos_token_id=eos, pad_token_id=eos))
    assert got.baseline.token_ids.tolist() == want[0, ids.shape[1]:].tolist()
    if not chat:
        assert got.text.startswith(" Paris")


def test_sentiment_steering_moves_the_logit_difference(default_session):
    vec = build_vector(default_session, positive=POS, negative=NEG, layer=10)
    sweep = steer_sweep(default_session, "I think this film is", target=" great", compare_token=" bad", vector=vec,
                        alphas=(-2.0, 0.0, 2.0))
    assert sweep.metric[0] < sweep.metric[1] < sweep.metric[2]
    both = generate(default_session, "I think this film is", max_new_tokens=8,
                    intervention=Intervention(steer=vec.vector, layer=10, alpha=0.0))
    assert both.baseline.token_ids.tolist() == both.intervened.token_ids.tolist()


def test_cli_generate_json(capsys, default_model_dir):
    code = main(["generate", "--model", str(default_model_dir), "--device", "cpu", "--dtype", "float32",
                 "--prompt", "The capital of France is", "--max-new-tokens", "4", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and data["tokens"][0] == " Paris" and len(data["token_ids"]) == 4
