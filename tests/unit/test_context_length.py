"""Prompts up to the model's context length: exactly the limit works in every analysis, one token
more is a clear error (in the engine and in a view), never a crash inside the model."""
from __future__ import annotations

import asyncio

import pytest
from transformers import AutoModelForCausalLM

from explorer.analyses.heads import HeadsRequest, head_scores
from explorer.analyses.lens import CompareRequest, LensRequest, compare_prompts, logit_lens
from explorer.core.errors import ExplorerError, PromptTooLongError
from explorer.core.jobs import Job
from explorer.core.session import ModelSession
from explorer.interventions.ablation import AblationRequest, ablate
from explorer.interventions.patching import PatchRequest, patch
from explorer.neurons.index import prompt_activation
from tiny_models import tiny_config
from widgets.lens_view import LogitLensView

LIMIT = 16


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def short(request, tokenizer):
    """A tiny model whose context is LIMIT tokens (GPT-2's learned positions end there)."""
    config = tiny_config(request.param, len(tokenizer))
    if request.param == "gpt2":
        config.n_positions = LIMIT
    else:
        config.max_position_embeddings = LIMIT
    model = AutoModelForCausalLM.from_config(config).eval()
    return ModelSession(model, tokenizer, name=f"short-{request.param}")


def prompt_of(session: ModelSession, n: int, word: str = "a") -> str:
    text = word + f" {word}" * (n - 1)
    assert session.encode(text).numel() == n if n <= LIMIT else True
    return text


def test_context_length_is_read_from_the_config(short):
    assert short.context_length == LIMIT and short.info().context_length == LIMIT


def test_exactly_the_limit_works_everywhere(short):
    at = prompt_of(short, LIMIT)
    other = prompt_of(short, LIMIT, "b")
    lens = logit_lens(short, LensRequest(at, top_k=2))
    assert lens.n_positions == LIMIT and lens.validate() is None
    assert compare_prompts(short, CompareRequest(at, other, top_k=2)).b.n_positions == LIMIT
    longest = (LIMIT - (short.tokenizer.bos_token_id is not None)) // 2  # BOS + the sequence twice fill it
    scores = head_scores(short, HeadsRequest(at, seq_len=longest))
    assert len(scores.tokens) == LIMIT and len(scores.random_ids) in (LIMIT, LIMIT - 1)
    result = ablate(short, AblationRequest(at, " a", ("1.0",)))
    assert result.lens_ablated.n_positions == LIMIT
    patched = Job(lambda ctx: patch(short, PatchRequest(at, other, " a"), ctx=ctx)).run()
    assert patched.restored.shape[1] == LIMIT
    assert len(prompt_activation(short, at, layer=1, neuron=0).activations) == LIMIT


def test_one_token_more_is_a_clear_error(short):
    over = prompt_of(short, LIMIT) + " a"
    assert len(short.tokenizer(over).input_ids) == LIMIT + 1
    message = f"the prompt is {LIMIT + 1} tokens but the model's context is {LIMIT} tokens: shorten it"
    calls = [
        lambda: logit_lens(short, LensRequest(over)),
        lambda: compare_prompts(short, CompareRequest("a", over)),
        lambda: head_scores(short, HeadsRequest(over, seq_len=2)),
        lambda: ablate(short, AblationRequest(over, " a", ("1.0",))),
        lambda: Job(lambda ctx: patch(short, PatchRequest(over, over, " a"), ctx=ctx)).run(),
        lambda: prompt_activation(short, over, layer=1, neuron=0),
    ]
    for i, call in enumerate(calls):
        with pytest.raises(ExplorerError) as info:  # a job (patching) re-raises its error as ExplorerError
            call()
        assert str(info.value) == message, i
        assert isinstance(info.value, PromptTooLongError) or i == 4


def test_induction_tokens_beyond_the_context_are_a_clear_error(short):
    longest = (LIMIT - (short.tokenizer.bos_token_id is not None)) // 2
    with pytest.raises(ExplorerError) as info:
        head_scores(short, HeadsRequest("a a", seq_len=longest + 1))
    assert "context" in str(info.value) and "sequence length" in str(info.value)


def test_the_view_shows_the_limit(short):
    view = LogitLensView(short, prompt=prompt_of(short, LIMIT))
    asyncio.run(view.compute())
    assert view.error == "" and view.result.n_positions == LIMIT
    view.prompt = view.prompt + " a"
    asyncio.run(view.compute())
    assert f"{LIMIT + 1} tokens but the model's context is {LIMIT} tokens" in view.error
    assert view.result.n_positions == LIMIT  # the previous chart is kept
