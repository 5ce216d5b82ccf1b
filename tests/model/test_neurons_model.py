"""The neuron index and a written, scored explanation on the embedded default model.

A few thousand tokens of the default news corpus are indexed with SmolLM2-135M-Instruct; stored
examples are re-run through a separate plain copy of the model with forward pre-hooks; one
neuron (the one whose top examples fire most on " he") is explained and scored end to end by
the same model. The default model is weak: the score is printed as it is, not asserted high.
"""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from cli.main import main
from explorer.neurons.describe import explain_neuron, search, token_pattern
from explorer.neurons.index import IndexRequest, build_index

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def index(default_session, tmp_path_factory):
    t0 = time.monotonic()
    idx = build_index(default_session, IndexRequest(max_tokens=3072, window=64, top_k=20, n_random=20,
                                                    batch_windows=16), out_dir=tmp_path_factory.mktemp("neurons"))
    elapsed = time.monotonic() - t0
    print(f"\nindexed {idx.tokens_done} tokens × 30 layers × 1536 neurons in {elapsed:.1f} s "
          f"({idx.tokens_done / elapsed:.0f} tokens/s)")
    return idx


@pytest.fixture(scope="module")
def plain(default_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(default_model_dir), dtype=torch.float32, local_files_only=True)
    model.config.use_cache = False
    return model.eval()


def test_index_of_the_default_corpus(index):
    assert index.complete and index.tokens_done == 3072
    assert index.n_layers == 30 and index.d_mlp == 1536
    assert index.manifest["corpus"]["path"].endswith("lee_background.cor")
    st = index.stats(15, 100)
    assert 0 < st.frequency < 1 and st.max >= st.quantiles[-1] >= st.quantiles[0] >= st.min


def test_stored_examples_rerun_on_a_plain_copy(index, plain):
    layers = (0, 14, 29)
    acts: dict[int, torch.Tensor] = {}
    hooks = [plain.model.layers[l].mlp.down_proj.register_forward_pre_hook(
        lambda mod, args, l=l: acts.__setitem__(l, args[0].detach())) for l in layers]
    try:
        for layer in layers:
            for neuron in (0, 777, 1535):
                for e in index.top_examples(layer, neuron)[:3] + index.random_examples(layer, neuron)[:2]:
                    with torch.no_grad():
                        plain(torch.from_numpy(e.token_ids)[None])
                    assert float(acts[layer][0, e.position, neuron]) == pytest.approx(e.activation, abs=1e-4)
                    if e.kind == "top":
                        assert float(acts[layer][0, :, neuron].max()) == pytest.approx(e.activation, abs=1e-4)
    finally:
        for h in hooks:
            h.remove()


def test_explain_a_pronoun_neuron_end_to_end(index, default_session, capsys):
    hit = search(index, token=" he")[0]
    pattern = token_pattern(index, hit.layer, hit.neuron)
    assert pattern.tokens[0] == " he"
    t0 = time.monotonic()
    e = explain_neuron(default_session, index=index, layer=hit.layer, neuron=hit.neuron, n_explain=6, n_score_top=4,
                       n_score_random=4, max_new_tokens=24)
    elapsed = time.monotonic() - t0
    with capsys.disabled():
        print(f"\nL{hit.layer} N{hit.neuron}: {pattern.summary}")
        print(f"  explanation ({e.explainer}): responds to {e.explanation!r}")
        print(f"  score {e.score_text} over {e.n_top} top + {e.n_random} random examples "
              f"({e.simulated.size} tokens), {elapsed:.1f} s")
    assert isinstance(e.explanation, str)
    assert e.score is None or -1.0 <= e.score <= 1.0
    assert e.simulated.shape == e.true.shape == (8, 64)
    assert np.all((e.simulated >= 0) & (e.simulated <= 9))


def test_cli_show_reads_the_index_without_the_model(index, capsys):
    code = main(["neurons", "show", "--index", str(index.path), "--layer", "0", "--neuron", "5", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    data = json.loads(out)
    assert len(data["top"]) == 20 and all(len(t["tokens"]) == 64 for t in data["top"])
    assert data["pattern"].startswith("fires on")
