"""False demonstrations (the overthinking experiment) on tiny random models, against plain PyTorch.

The references never go through the engine: each runs a separate copy of the tiny model
(same seed, identical weights, asserted) one prompt at a time, unpadded, with ordinary forward
hooks, the final norm and the unembedding applied by hand; attention comes from
``output_attentions`` of an eager copy; ablation is a forward pre-hook that zeroes the head's
slice of the output projection's input. Module paths are written out here per family rather
than read from ``explorer.core.adapters``. GPT-2 (absolute positions) checks that the left-padded
batch keeps each prompt at its own positions; Llama (GQA: 4 heads, 2 KV heads) that the
attention is per query head.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from explorer.analyses.demonstrations import (
    DemoLensResult,
    DemonstrationError,
    DemoRequest,
    OverthinkingRequest,
    OverthinkingResult,
    PromptSet,
    ablated_label_logits,
    build_prompts,
    calibrated_accuracy,
    critical_row,
    demonstration_lens,
    derangement,
    label_accuracy,
    label_token_ids,
    load_task,
    overthinking,
    random_head_sets,
    task_from_dict,
)
from tiny_models import make_tiny_model

FAMILIES = ("llama", "gpt2")
PATHS = {  # embeddings output, blocks, final norm, attention output projection (per block)
    "llama": ("model.embed_tokens", "model.layers", "model.norm", "self_attn.o_proj"),
    "gpt2": ("transformer.drop", "transformer.h", "transformer.ln_f", "attn.c_proj"),
}
# 7 prompts per condition in batches of 4: odd sizes, and batches mixing conditions and lengths.
REQUEST = DemoRequest(n_prompts=7, n_demos=6, seed=3, batch_size=4)
TOL = 2e-4


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def pairs(tokenizer, tiny_sessions):
    """family -> (engine session, plain eager copy with identical weights)."""
    out = {}
    for family in FAMILIES:
        plain = make_tiny_model(family, len(tokenizer))
        assert _same_weights(tiny_sessions[family].hf, plain)
        plain.set_attn_implementation("eager")
        plain.config.use_cache = False
        out[family] = (tiny_sessions[family], plain)
    return out


def _reference(plain, family: str, tokenizer, prompt: str, label_ids, zero=(), last_only=False):
    """(label logits [R, C] at the last position, attentions [L, H, T] from the last position)."""
    embed, blocks, norm, o_proj = PATHS[family]
    rows, handles = [], []
    grab = lambda m, a, out: rows.append((out[0] if isinstance(out, tuple) else out)[0, -1])  # noqa: E731
    handles.append(plain.get_submodule(embed).register_forward_hook(grab))
    for block in plain.get_submodule(blocks):
        handles.append(block.register_forward_hook(grab))
    d_head = plain.config.hidden_size // plain.config.num_attention_heads
    for layer, head in zero:
        def pre(mod, args, head=head):
            x = args[0].clone()
            if last_only:
                x[:, -1, head * d_head:(head + 1) * d_head] = 0
            else:
                x[..., head * d_head:(head + 1) * d_head] = 0
            return (x,) + args[1:]
        handles.append(plain.get_submodule(blocks)[layer].get_submodule(o_proj).register_forward_pre_hook(pre))
    ids = torch.tensor([tokenizer(prompt).input_ids])
    try:
        with torch.no_grad():
            out = plain(ids, output_attentions=True)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        normed = plain.get_submodule(norm)(torch.stack(rows))
        logits = normed @ plain.lm_head.weight[torch.as_tensor(label_ids)].t()
    # The last row is the model's own output.
    np.testing.assert_allclose(logits[-1].numpy(), out.logits[0, -1, label_ids].numpy(), atol=TOL)
    att = torch.stack([a[0, :, -1] for a in out.attentions])
    return logits.numpy(), att.numpy()


# ------------------------------------------------------------------------------ task, prompts
def test_the_task_file_and_its_labels_are_single_tokens(tokenizer):
    task = load_task("topics")
    assert task.labels == ("sport", "food", "weather")
    assert np.bincount(task.classes).tolist() == [30, 30, 30]
    assert len(set(task.texts)) == 90
    ids = label_token_ids(tokenizer, task.labels)
    for label, tid in zip(task.labels, ids):
        assert tokenizer(" " + label, add_special_tokens=False).input_ids == [tid]
    assert task.query_template == "Input: {text}\nLabel:"


@pytest.mark.parametrize("data, message", [
    ({"labels": ["a", "b"], "items": []}, "template"),
    ({"labels": ["sport", "food"], "template": "X: {text} Y: {label}", "items": [{"text": "t", "label": "golf"}]},
     "not in the task"),
    ({"labels": ["sport"], "template": "X: {text} Y: {label}", "items": []}, "two distinct"),
    ({"labels": ["sport", "food"], "template": "X: {text} Y:{label}", "items": []}, "space"),
    ({"labels": ["sport", "food"], "template": "X: {text} {other} Y: {label}", "items": []}, "exactly"),
])
def test_bad_task_files_are_refused(data, message):
    with pytest.raises(DemonstrationError, match=message):
        task_from_dict(data)


def test_multi_token_labels_and_unknown_tasks_are_refused(tokenizer):
    with pytest.raises(DemonstrationError, match="single tokens"):
        label_token_ids(tokenizer, ["sport", "photosynthesising"])
    with pytest.raises(DemonstrationError, match="topics"):
        load_task("no-such-task")


def test_derangements_have_no_fixed_point():
    for n in range(2, 7):
        for seed in range(20):
            perm = derangement(n, seed)
            assert sorted(perm.tolist()) == list(range(n))
            assert not np.any(perm == np.arange(n))
            assert np.array_equal(perm, derangement(n, seed))
    assert len({tuple(derangement(4, s)) for s in range(20)}) > 1
    with pytest.raises(DemonstrationError):
        derangement(1, 0)


def test_prompts_are_balanced_paired_and_show_the_permuted_labels(tokenizer):
    task = load_task("topics")
    ps = build_prompts(tokenizer, DemoRequest(n_prompts=12, n_demos=9, seed=5))
    assert np.bincount(ps.query_class, minlength=3).tolist() == [4, 4, 4]
    assert len(set(ps.query_index.tolist())) == 12
    assert not np.any(ps.permutation == np.arange(3))
    for i in range(12):
        assert ps.query_index[i] not in ps.demo_index[i]
        assert np.bincount(ps.demo_class[i], minlength=3).tolist() == [3, 3, 3]
        assert len(set(ps.demo_class[i].tolist())) == 3 and len(set(ps.demo_index[i].tolist())) == 9
        for cond in range(2):
            prompt = str(ps.prompts[cond, i])
            assert prompt.endswith(f"Input: {task.texts[ps.query_index[i]]}\nLabel:")
            ids = tokenizer(prompt).input_ids
            assert len(ids) == ps.n_tokens[cond, i]
            shown = ps.demo_class[i] if cond == 0 else ps.permutation[ps.demo_class[i]]
            assert np.array_equal(ps.shown_class(cond)[i], shown)
            # Each recorded position holds the shown label's token, after "Label:".
            for pos, c in zip(ps.label_positions[cond, i], shown):
                assert ids[pos] == ps.label_ids[c]
                assert tokenizer.decode(ids[pos - 2:pos]) == "Label:"
            # The demonstrations' texts appear in order, with the shown label.
            expected = "".join(f"Input: {task.texts[j]}\nLabel: {task.labels[c]}\n\n"
                               for j, c in zip(ps.demo_index[i], shown))
            assert prompt.startswith(expected)
        # The two conditions differ only in the label words.
        assert ps.prompts[0, i] != ps.prompts[1, i]
        strip = lambda p: [line for line in str(p).split("\n") if not line.startswith("Label:")]  # noqa: E731
        assert strip(ps.prompts[0, i]) == strip(ps.prompts[1, i])
    again = build_prompts(tokenizer, DemoRequest(n_prompts=12, n_demos=9, seed=5))
    assert np.array_equal(again.prompts, ps.prompts)
    other = build_prompts(tokenizer, DemoRequest(n_prompts=12, n_demos=9, seed=6))
    assert not np.array_equal(other.prompts, ps.prompts)


@pytest.mark.parametrize("request_, message", [
    (DemoRequest(n_demos=4), "multiple"),
    (DemoRequest(n_demos=0), "multiple"),
    (DemoRequest(n_prompts=0), "at least 1"),
    (DemoRequest(n_prompts=91), "too few"),
    (DemoRequest(n_demos=90), "too few"),
    (DemoRequest(batch_size=0), "batch size"),
])
def test_bad_prompt_settings_are_refused(tokenizer, request_, message):
    with pytest.raises(DemonstrationError, match=message):
        build_prompts(tokenizer, request_)


# ------------------------------------------------------------------------------------ metrics
def test_label_accuracy_and_calibrated_accuracy_by_hand():
    # 4 prompts, 1 row, 2 labels: true classes 0, 0, 1, 1.
    truth = np.array([0, 0, 1, 1])
    logits = np.array([[[2.0, 0.0]], [[0.0, 1.0]], [[0.0, 3.0]], [[1.0, 0.5]]])
    assert label_accuracy(logits, truth).tolist() == [0.5]
    # p0 = sigmoid(z0 - z1): .881, .269, .047, .622; median thresholds: p0 .4455, p1 .5545.
    # prompt 0: p0 .881 > .4455 -> 1; prompt 1: .269 < -> 0; prompt 2: p1 .953 > .5545 -> 1;
    # prompt 3: p1 .378 < -> 0.
    assert calibrated_accuracy(logits, truth).tolist() == [0.5]
    # Identical rows (the embeddings at the same last token): every prompt ties -> chance 1/C.
    same = np.zeros((6, 2, 3))
    truth3 = np.array([0, 1, 2, 0, 1, 2])
    np.testing.assert_allclose(calibrated_accuracy(same, truth3), [1 / 3, 1 / 3])
    assert label_accuracy(same, truth3).tolist() == [1 / 3, 1 / 3]  # argmax ties go to label 0
    # A label bias (label 0 always largest) gives top-1 = its share, calibration removes it.
    biased = np.array([[[5.0, 1.0, 0.0]], [[5.0, 2.0, 0.0]], [[5.0, 0.0, 1.5]]])
    assert label_accuracy(biased, np.array([0, 1, 2])).tolist() == [1 / 3]
    assert calibrated_accuracy(biased, np.array([0, 1, 2]))[0] > 1 / 3


def test_critical_row_definition():
    correct = np.array([.3, .3, .6, .8, .9, .9])
    assert critical_row(correct, np.array([.3, .3, .6, .5, .4, .3]), 0.1) == 3
    # Dipping back within the margin moves it later.
    assert critical_row(correct, np.array([.3, .1, .6, .5, .85, .3]), 0.1) == 5
    # Below from the start.
    assert critical_row(correct, correct - 0.2, 0.1) == 0
    # Never (or not at the end): None.
    assert critical_row(correct, correct, 0.1) is None
    assert critical_row(correct, np.array([.0, .0, .0, .0, .0, .9]), 0.1) is None


def test_random_head_sets_exclude_the_candidates_and_are_seeded():
    sets = random_head_sets(3, 4, ["0.1", "2.3"], 5, 4, seed=1)
    assert sets.shape == (4, 5)
    for row in sets:
        assert len(set(row)) == 5 and not {"0.1", "2.3"} & set(row)
    assert np.array_equal(sets, random_head_sets(3, 4, ["0.1", "2.3"], 5, 4, seed=1))
    assert not np.array_equal(sets, random_head_sets(3, 4, ["0.1", "2.3"], 5, 4, seed=2))
    with pytest.raises(DemonstrationError):
        random_head_sets(3, 4, [], 13, 1, seed=0)


# ------------------------------------------------------------------------ engine vs reference
@pytest.mark.parametrize("family", FAMILIES)
def test_lens_accuracy_and_label_attention_equal_plain_pytorch(pairs, tokenizer, family):
    session, plain = pairs[family]
    result = demonstration_lens(session, REQUEST)
    ps = result.prompts
    assert len(set(ps.n_tokens.ravel().tolist())) > 1  # the batches really are padded
    assert result.validate() is None
    L, H = session.n_layers, 4
    assert result.label_logits.shape == (2, 7, L + 1, 3)
    assert result.attn_same.shape == result.attn_other.shape == (2, 7, L, H)
    ref_logits = np.empty((2, 7, L + 1, 3))
    ref_same = np.empty((2, 7, L, H))
    ref_other = np.empty((2, 7, L, H))
    for cond in range(2):
        for i in range(7):
            logits, att = _reference(plain, family, tokenizer, str(ps.prompts[cond, i]), ps.label_ids)
            ref_logits[cond, i] = logits
            same = [p for p, c in zip(ps.label_positions[cond, i], ps.demo_class[i]) if c == ps.query_class[i]]
            other = [p for p, c in zip(ps.label_positions[cond, i], ps.demo_class[i]) if c != ps.query_class[i]]
            assert len(same) == 2 and len(other) == 4
            ref_same[cond, i] = att[..., same].sum(-1)
            ref_other[cond, i] = att[..., other].sum(-1)
    np.testing.assert_allclose(result.label_logits, ref_logits, atol=TOL, rtol=1e-5)
    np.testing.assert_allclose(result.attn_same, ref_same, atol=1e-5)
    np.testing.assert_allclose(result.attn_other, ref_other, atol=1e-5)
    truth = ps.query_class
    ref_acc = (ref_logits.argmax(-1) == truth[None, :, None]).mean(1)
    np.testing.assert_array_equal(result.accuracy, ref_acc)
    np.testing.assert_allclose(result.gap, ref_acc[0] - ref_acc[1])
    # The false-induction score: same − other / (C − 1), mean over the permuted prompts.
    np.testing.assert_allclose(result.head_scores(), (ref_same[1] - ref_other[1] / 2).mean(0), atol=1e-5)
    top = result.top_heads(3)
    ref_scores = (ref_same[1] - ref_other[1] / 2).mean(0)
    best = np.argsort(-ref_scores.ravel())[:3]
    assert [(l, h) for l, h, _ in top] == [(int(i) // H, int(i) % H) for i in best]
    assert result.follows_demonstrations.shape == (L + 1,)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("positions", ["all", "last"])
def test_ablated_accuracy_equals_a_zeroing_pre_hook(pairs, tokenizer, family, positions):
    session, plain = pairs[family]
    ps = build_prompts(tokenizer, REQUEST)
    heads = [(0, 1), (1, 3), (2, 0)]
    got = ablated_label_logits(session, ps, [f"{l}.{h}" for l, h in heads], positions=positions, batch_size=5)
    assert got.shape == (2, 7, 3)
    for cond in range(2):
        for i in range(7):
            ref, _ = _reference(plain, family, tokenizer, str(ps.prompts[cond, i]), ps.label_ids, zero=heads,
                                last_only=positions == "last")
            np.testing.assert_allclose(got[cond, i], ref[-1], atol=TOL, rtol=1e-5)
    clean, _ = _reference(plain, family, tokenizer, str(ps.prompts[0, 0]), ps.label_ids)
    assert np.abs(got[0, 0] - clean[-1]).max() > 1e-3  # the ablation did something


def test_the_experiment_end_to_end_and_its_round_trip(pairs):
    session, _ = pairs["llama"]
    request = OverthinkingRequest(REQUEST, margin=0.1, n_ablate=3, n_random=2, seed=4)
    result = overthinking(session, request)
    assert result.validate() is None
    assert result.top_heads.tolist() == [f"{l}.{h}" for l, h, _ in result.lens.top_heads(3)]
    assert result.random_heads.shape == (2, 3)
    assert not set(result.random_heads.ravel()) & set(result.top_heads)
    # Ablation numbers are the ablation function's, on the same prompts.
    again = ablated_label_logits(session, result.lens.prompts, list(result.top_heads))
    np.testing.assert_allclose(result.ablated_top, again, atol=1e-6)
    truth = result.lens.prompts.query_class
    top_acc = (result.ablated_top.argmax(-1) == truth).mean(-1)
    np.testing.assert_array_equal(result.top_accuracy, top_acc)
    assert result.top_gap == pytest.approx(top_acc[0] - top_acc[1])
    assert result.clean_gap == pytest.approx(result.lens.gap[-1])
    if result.clean_gap:
        assert result.gap_reduction(result.top_gap) == pytest.approx(1 - result.top_gap / result.clean_gap)
    assert result.random_gaps.shape == (2,)
    for x in (result.clean_accuracy, result.top_accuracy, result.random_accuracy, result.lens.calibrated):
        assert np.all((0 <= x) & (x <= 1))
    # Round trip through JSON.
    back = OverthinkingResult.from_dict(json.loads(json.dumps(result.to_dict())))
    assert back.request == request
    assert back.lens.request == REQUEST
    for name in ("top_heads", "random_heads", "ablated_top", "ablated_random"):
        a, b = getattr(result, name), getattr(back, name)
        assert a.dtype == b.dtype and np.array_equal(a, b), name
    for name in ("label_logits", "attn_same", "attn_other"):
        assert np.array_equal(getattr(result.lens, name), getattr(back.lens, name))
    for name in PromptSet.__dataclass_fields__:
        a, b = getattr(result.lens.prompts, name), getattr(back.lens.prompts, name)
        assert (np.array_equal(a, b) and a.dtype == b.dtype) if isinstance(a, np.ndarray) else a == b, name
    assert back.lens.layer_labels == result.lens.layer_labels
    assert back.critical_layer() == result.critical_layer()
    lens_back = DemoLensResult.from_dict(json.loads(json.dumps(result.lens.to_dict())))
    np.testing.assert_array_equal(lens_back.accuracy, result.lens.accuracy)
    # Cached: the same request answers without the model.
    assert overthinking(session, request) is result


def test_progress_reports_cover_every_batch(pairs):
    session, _ = pairs["llama"]
    seen = []

    class Ctx:
        cancelled = False

        def report(self, done, total, partial=None, message=""):
            seen.append((done, total, message))

    request = OverthinkingRequest(DemoRequest(n_prompts=4, n_demos=3, seed=9, batch_size=3), n_ablate=2, n_random=1)
    overthinking(session, request, ctx=Ctx())
    total = 8 * 3  # 2 conditions × 4 prompts, for the lens, the top heads and one random draw
    assert seen[-1][:2] == (total, total)
    assert all(t == total for _, t, _ in seen)
    assert [d for d, _, _ in seen] == sorted(d for d, _, _ in seen)
    assert {m for _, _, m in seen} == {"lens", "ablation"}


@pytest.mark.parametrize("heads, positions, message", [
    (["mlp:1"], "all", "only heads"),
    (["0.9"], "all", "out of range"),
    (["0.1"], "middle", "positions"),
    ([], "all", "no heads"),
])
def test_bad_ablations_are_refused(pairs, tokenizer, heads, positions, message):
    session, _ = pairs["llama"]
    ps = build_prompts(tokenizer, DemoRequest(n_prompts=3, n_demos=3))
    with pytest.raises(Exception, match=message) as info:
        ablated_label_logits(session, ps, heads, positions=positions)
    from explorer.core.errors import ExplorerError
    assert isinstance(info.value, ExplorerError)


def test_a_task_of_ones_own_with_two_classes(pairs, tokenizer):
    session, _ = pairs["llama"]
    task = task_from_dict({
        "name": "mine", "labels": ["yes", "no"], "template": "Q: {text}\nA: {label}\n",
        "items": [{"text": f"statement {i}", "label": "yes" if i % 2 else "no"} for i in range(8)],
    })
    result = demonstration_lens(session, DemoRequest(n_prompts=4, n_demos=2, batch_size=8), task=task)
    ps = result.prompts
    assert ps.task == "mine" and ps.permutation.tolist() == [1, 0]
    assert str(ps.prompts[1, 0]).endswith(f"Q: {task.texts[ps.query_index[0]]}\nA:")
    assert result.validate() is None and result.label_logits.shape == (2, 4, 4, 2)
    # With two classes "other" is one class: the score is same − other.
    np.testing.assert_allclose(result.head_scores(), (result.attn_same[1] - result.attn_other[1]).mean(0))


def test_cancelling_stops_before_the_next_batch(pairs):
    session, _ = pairs["llama"]

    class Cancelled:
        cancelled = True

        def report(self, *args, **kwargs):
            raise AssertionError("no batch should run")

    from explorer.analyses.demonstrations import Cancelled as CancelledError
    with pytest.raises(CancelledError):
        overthinking(session, OverthinkingRequest(DemoRequest(n_prompts=3, n_demos=3, seed=11)), ctx=Cancelled())
    assert session.peek(("demo-lens", DemoRequest(n_prompts=3, n_demos=3, seed=11))) is None  # nothing cached
