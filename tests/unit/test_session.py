"""ModelSession: resolving and loading models, the errors users see, info, tokenising and the cache."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from explorer.analyses.lens import LensRequest, logit_lens
from explorer.core.errors import (
    EmptyPromptError,
    ExplorerError,
    ModelNotFoundError,
    PromptTooLongError,
    TokenError,
    UnsupportedModelError,
)
from explorer.core.session import ModelInfo, ModelSession, pick_device, pick_dtype
from tiny_models import FAMILIES, make_tiny_model

# What the tiny configs in conftest.py declare, written out independently of the engine:
# (n_heads, n_kv_heads, d_mlp); every family has 3 layers, d_model 64, head size 16, context 256.
TINY_SHAPES = {
    "llama": (4, 2, 128), "mistral": (4, 2, 128), "qwen2": (4, 2, 128),
    "gpt2": (4, 4, 256),      # GPT-2: no GQA; n_inner None means 4 * d_model
    "gpt_neox": (4, 4, 128),
    "qwen3": (4, 2, 128), "phi3": (4, 2, 128), "olmo2": (4, 2, 128),
    "gemma2": (4, 2, 128), "gemma3_text": (4, 2, 128),
}
D_HEADS = {"gemma2": 24, "gemma3_text": 8, "qwen3": 32}  # heads not d_model / n_heads wide; others 16
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "gpt2": "GPT2LMHeadModel", "gpt_neox": "GPTNeoXForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "phi3": "Phi3ForCausalLM", "olmo2": "Olmo2ForCausalLM", "gemma2": "Gemma2ForCausalLM",
                 "gemma3_text": "Gemma3ForCausalLM"}


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory, tokenizer):
    """A tiny Llama saved like any Hugging Face model directory: weights, config, tokenizer."""
    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    model = make_tiny_model("llama", len(tokenizer), seed=3)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# ------------------------------------------------------------------------------- resolving
def test_unknown_path_is_model_not_found(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not found"):
        ModelSession.load(str(tmp_path / "no-such-model"))


def test_uncached_hub_id_is_model_not_found():
    with pytest.raises(ModelNotFoundError, match="hub id"):
        ModelSession.load("no-such-org/no-such-model-xyz")


def test_directory_without_config_is_an_error(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(ModelNotFoundError, match="config.json"):
        ModelSession.load(str(tmp_path))


def test_a_file_is_not_a_model(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\0" * 16)
    with pytest.raises(ModelNotFoundError, match="directory"):
        ModelSession.load(str(path))


def test_malformed_config_is_an_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UnsupportedModelError, match="config"):
        ModelSession.load(str(tmp_path))


def test_config_without_weights_is_model_not_found(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4).save_pretrained(tmp_path)
    with pytest.raises(ModelNotFoundError, match="weights"):
        ModelSession.load(str(tmp_path), device="cpu")


def test_model_without_tokenizer_is_an_error(tmp_path):
    make_tiny_model("llama", 512).save_pretrained(tmp_path)
    with pytest.raises(ModelNotFoundError, match="tokenizer"):
        ModelSession.load(str(tmp_path), device="cpu")


def _bert_config():
    from transformers import BertConfig

    return BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)


def _t5_config():
    from transformers import T5Config

    return T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2)


def _opt_config():
    from transformers import OPTConfig

    return OPTConfig(hidden_size=32, word_embed_proj_dim=32, num_hidden_layers=1, ffn_dim=64, num_attention_heads=2)


@pytest.mark.parametrize("make_config, model_type", [(_bert_config, "bert"), (_t5_config, "t5"), (_opt_config, "opt")])
def test_unsupported_architecture_names_the_model_type(tmp_path, make_config, model_type):
    make_config().save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError) as info:
        ModelSession.load(str(tmp_path), device="cpu")
    message = str(info.value)
    assert f"'{model_type}'" in message
    assert all(family in message for family in FAMILIES)  # and says what is supported


def test_unsupported_architecture_with_weights_fails_before_loading_them(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, OPTForCausalLM

    OPTForCausalLM(_opt_config()).save_pretrained(tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded for an unsupported model")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    with pytest.raises(UnsupportedModelError, match="'opt'"):
        ModelSession.load(str(tmp_path), device="cpu")


# --------------------------------------------------------------------------------- loading
def test_load_a_saved_model_directory(saved_llama, tokenizer):
    session = ModelSession.load(str(saved_llama), device="cpu", dtype="float32")
    info = session.info()
    assert isinstance(info, ModelInfo)
    assert info.name == "tiny-llama" and info.path == str(saved_llama.resolve())
    assert info.architecture == "LlamaForCausalLM" and info.family == "llama"
    assert (info.n_layers, info.n_heads, info.n_kv_heads) == (3, 4, 2)
    assert (info.d_model, info.d_head, info.d_mlp) == (64, 16, 128)
    assert info.vocab_size == len(tokenizer) and info.context_length == 256
    assert info.device == "cpu" and info.dtype == "float32"
    assert len(info.config_hash) == 16

    # Loaded weights are exactly the saved ones (and the session serves them).
    reference = make_tiny_model("llama", len(tokenizer), seed=3)
    assert info.n_params == sum(p.numel() for p in reference.parameters())
    loaded = session.hf.state_dict()
    for name, value in reference.state_dict().items():
        assert torch.equal(loaded[name], value), name
    # The loaded tokenizer is the saved one.
    prompt = "The capital of France is"
    assert session.encode(prompt).tolist() == tokenizer(prompt).input_ids
    result = logit_lens(session, LensRequest(prompt, target=" Paris"))
    assert result.model == "tiny-llama" and result.top_ids.shape == (4, 5, 10)


def test_load_in_bfloat16(saved_llama):
    session = ModelSession.load(str(saved_llama), device="cpu", dtype="bfloat16")
    assert session.dtype == torch.bfloat16 and session.info().dtype == "bfloat16"
    result = logit_lens(session, LensRequest("The capital of France is", target=" Paris"))
    assert np.isfinite(result.top_probs).all() and np.isfinite(result.kl_to_final).all()


def test_session_prepares_the_model_for_analysis(saved_llama):
    session = ModelSession.load(str(saved_llama), device="cpu")
    assert session.dtype == torch.float32  # auto on CPU
    assert not session.hf.training
    assert session.hf.config.use_cache is False
    assert not any(p.requires_grad for p in session.hf.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_info_of_each_family(tiny_sessions, tokenizer, family):
    info = tiny_sessions[family].info()
    n_heads, n_kv, d_mlp = TINY_SHAPES[family]
    assert info.family == family and info.architecture == ARCHITECTURES[family]
    assert (info.n_layers, info.n_heads, info.n_kv_heads) == (3, n_heads, n_kv)
    assert (info.d_model, info.d_head, info.d_mlp) == (64, D_HEADS.get(family, 16), d_mlp)
    assert info.vocab_size == len(tokenizer) and info.context_length == 256
    assert info.n_params == sum(p.numel() for p in make_tiny_model(family, len(tokenizer)).parameters())
    assert info.name == f"tiny-{family}" and info.device == "cpu" and info.dtype == "float32"
    assert tiny_sessions[family].n_layers == 3


def test_config_hash_tells_configs_apart(tiny_sessions):
    hashes = {family: session.info().config_hash for family, session in tiny_sessions.items()}
    assert len(set(hashes.values())) == len(FAMILIES)
    assert tiny_sessions["llama"].info().config_hash == hashes["llama"]  # stable


# ----------------------------------------------------------------------- device and dtype
def test_pick_device_and_dtype():
    assert pick_device("cpu") == "cpu"
    assert pick_device("auto") in ("cpu", "cuda", "mps")
    if not torch.cuda.is_available():
        assert pick_device("auto") != "cuda"
        with pytest.raises(UnsupportedModelError, match="CUDA"):
            pick_device("cuda")
    with pytest.raises(UnsupportedModelError, match="unknown device"):
        pick_device("tpu")
    assert pick_dtype("auto", "cpu") == torch.float32
    assert pick_dtype("auto", "cuda") == torch.bfloat16
    assert pick_dtype("bfloat16", "cpu") == torch.bfloat16
    assert pick_dtype("float16", "cpu") == torch.float16
    with pytest.raises(UnsupportedModelError, match="dtype"):
        pick_dtype("int8", "cpu")


def test_bad_device_or_dtype_on_load(saved_llama):
    with pytest.raises(UnsupportedModelError):
        ModelSession.load(str(saved_llama), device="tpu")
    with pytest.raises(UnsupportedModelError):
        ModelSession.load(str(saved_llama), device="cpu", dtype="float8")


# ------------------------------------------------------------------------------ tokenising
def test_encode(tiny_sessions, tokenizer):
    session = tiny_sessions["gpt2"]
    prompt = "When Mary and John went to the store"
    ids = session.encode(prompt)
    assert ids.dtype == torch.int64 and ids.tolist() == tokenizer(prompt).input_ids
    for empty in ("", "  ", "\n"):
        with pytest.raises(EmptyPromptError):
            session.encode(empty)
    with pytest.raises(PromptTooLongError, match="257 tokens.*256"):
        session.encode("hi" + " hi" * 256)
    assert len(session.encode("hi" + " hi" * 255)) == 256


def test_token_id(tiny_sessions, tokenizer):
    session = tiny_sessions["llama"]
    assert session.token_id(" Paris") == tokenizer(" Paris", add_special_tokens=False).input_ids[0]
    assert session.token_id("#0") == 0 and session.token_id("#49151") == 49151
    for bad in ("", "#49152", " antidisestablishmentarianism"):
        with pytest.raises(TokenError):
            session.token_id(bad)
    # A token whose text is in the vocabulary resolves to it even if re-tokenising it would split it.
    special = tokenizer.convert_ids_to_tokens(0)
    assert session.token_id(special) == 0


def test_vocab_strings_and_decode_each(tiny_sessions, tokenizer):
    session = tiny_sessions["llama"]
    strings = session.vocab_strings()
    assert strings.shape == (len(tokenizer),) and strings.dtype.kind == "U"
    assert session.vocab_strings() is strings  # built once
    for i in (0, 1, 504, 7042, 49151):
        assert strings[i] == tokenizer.decode([i])
    grid = np.array([[504, 7042], [1, 2]])
    decoded = session.decode_each(grid)
    assert decoded.shape == (2, 2) and decoded[0, 1] == " Paris"


def test_unembedding_weight_and_cast(tiny_sessions):
    session = tiny_sessions["qwen2"]
    weight = session.unembed_weight()
    assert weight is session.hf.lm_head.weight
    bf16 = session.unembed_weight(torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and torch.equal(bf16, weight.to(torch.bfloat16))
    assert session.unembed_weight(torch.bfloat16) is bf16  # cast once, then kept
    assert session.unembed_weight(torch.float32) is weight
    assert session.unembed_bias() is None


def test_final_norm_is_the_models(tiny_sessions):
    session = tiny_sessions["gpt_neox"]
    x = torch.randn(2, 3, 64)
    with torch.no_grad():
        torch.testing.assert_close(session.final_norm(x), torch.nn.functional.layer_norm(
            x, (64,), session.hf.gpt_neox.final_layer_norm.weight, session.hf.gpt_neox.final_layer_norm.bias,
            session.hf.config.layer_norm_eps))


# ---------------------------------------------------------------------------------- cache
def test_cache_is_an_lru(tokenizer):
    session = ModelSession(make_tiny_model("llama", len(tokenizer)), tokenizer, name="lru", cache_size=2)
    calls: list[str] = []

    def compute(key):
        def run():
            calls.append(key)
            return object()
        return run

    a = session.cached("a", compute("a"))
    assert session.cached("a", compute("a")) is a and calls == ["a"]
    b = session.cached("b", compute("b"))
    assert session.cached("a", compute("a")) is a  # a is now the most recent
    session.cached("c", compute("c"))               # evicts b, the least recent
    assert session.cached("a", compute("a")) is a
    assert session.cached("b", compute("b")) is not b
    assert calls == ["a", "b", "c", "b"]
    session.clear_cache()
    assert session.cached("a", compute("a")) is not a


def test_failed_computations_are_not_cached(tiny_sessions):
    session = tiny_sessions["llama"]
    attempts = []

    def failing():
        attempts.append(1)
        raise ExplorerError("boom")

    for _ in range(2):
        with pytest.raises(ExplorerError):
            session.cached(("failing-key",), failing)
    assert len(attempts) == 2


def test_lock_is_reentrant_and_serialises(tiny_sessions):
    session = tiny_sessions["llama"]
    with session.lock:
        with session.lock:  # an analysis calling another while holding it
            pass
    # While one thread holds the lock, an analysis elsewhere waits for it.
    done = threading.Event()
    with session.lock:
        worker = threading.Thread(target=lambda: (logit_lens(session, LensRequest("lock test")), done.set()))
        worker.start()
        assert not done.wait(0.3)
    worker.join(30)
    assert done.is_set()


def test_fast_bfloat16_reads_the_cpu_flags(monkeypatch):
    import builtins
    import io

    from explorer.core.session import fast_bfloat16

    real_open = builtins.open

    def fake(flags):
        def opener(path, *a, **k):
            if path == "/proc/cpuinfo":
                return io.StringIO(f"processor : 0\nflags : fpu sse {flags}\n")
            return real_open(path, *a, **k)
        return opener

    monkeypatch.setattr(builtins, "open", fake("avx2 fma"))
    assert not fast_bfloat16("cpu")
    monkeypatch.setattr(builtins, "open", fake("avx512f amx_bf16 amx_tile"))
    assert fast_bfloat16("cpu")
    assert fast_bfloat16("cuda")
