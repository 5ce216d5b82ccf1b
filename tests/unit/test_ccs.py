"""CCS: the loss on constructed values, a planted truth direction found, the sign fixed by labels,
and the logit-lens comparison against a plain transformers computation."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from explorer.analyses.ccs import (
    CCSError,
    CCSResult,
    ccs_losses,
    load_pairs,
    pairs_from_statements,
    run_ccs,
    sign_fixed_accuracy,
    split_pairs,
    train_ccs,
)
from explorer.analyses.probes import standardise


def test_losses_on_constructed_values():
    p_pos = torch.tensor([0.9, 0.2, 0.5])
    p_neg = torch.tensor([0.1, 0.8, 0.5])
    cons, conf = ccs_losses(p_pos, p_neg)
    # consistent and confident pairs: (0.9 − 0.9)², (0.2 − 0.2)², (0.5 − 0.5)² → 0
    assert cons.item() == pytest.approx(0.0, abs=1e-7)
    assert conf.item() == pytest.approx((0.1 ** 2 + 0.2 ** 2 + 0.5 ** 2) / 3)
    cons, conf = ccs_losses(torch.tensor([0.9]), torch.tensor([0.9]))   # both sides "true": inconsistent
    assert cons.item() == pytest.approx(0.8 ** 2) and conf.item() == pytest.approx(0.81)


def planted_pairs(n=160, d=24, seed=0):
    """x⁺ = base + t·v + noise, x⁻ = base − t·v + noise with t = ±1 the truth of the pair."""
    rng = np.random.default_rng(seed)
    v = rng.normal(size=d)
    v /= np.linalg.norm(v)
    t = rng.choice([-1.0, 1.0], size=n)
    base = rng.normal(size=(n, d)) * 2.0
    pos = base + 3.0 * t[:, None] * v + 0.3 * rng.normal(size=(n, d))
    neg = base - 3.0 * t[:, None] * v + 0.3 * rng.normal(size=(n, d))
    return torch.from_numpy(pos), torch.from_numpy(neg), torch.from_numpy((t > 0).astype(np.int64)), v


def test_planted_direction_is_found_and_signed_by_the_dev_labels():
    pos, neg, y, v = planted_pairs()
    tr, te = torch.arange(0, 100), torch.arange(100, 160)
    (xp_tr, xp_te), (_, sp) = standardise(pos[tr][None], pos[te][None])
    (xn_tr, xn_te), _ = standardise(neg[tr][None], neg[te][None])
    _, _, theta, bias = train_ccs(xp_tr, xn_tr, restarts=4, epochs=300, lr=1e-2, weight_decay=0.01, seed=0)
    direction = theta[0] / sp[0, 0].float()                     # back to raw coordinates
    cos = (direction @ torch.from_numpy(v).float()).abs() / direction.norm(dim=-1)
    assert cos.max().item() > 0.75   # a random direction in 24 dimensions: |cos| ≈ 0.2
    cred = lambda xp, xn: 0.5 * (torch.sigmoid(torch.einsum("pnd,pkd->pkn", xp.float(), theta) + bias[..., None])  # noqa: E731
                                 + 1 - torch.sigmoid(torch.einsum("pnd,pkd->pkn", xn.float(), theta) + bias[..., None]))
    acc, flip = sign_fixed_accuracy(cred(xp_tr, xn_tr), y[tr], cred(xp_te, xn_te), y[te])
    best = int(cos[0].argmax()) if cos.dim() > 1 else int(cos.argmax())
    assert acc[0, best].item() >= 0.95
    # the same probe with the dev labels inverted gets the opposite sign: accuracy against those labels
    acc_inv, flip_inv = sign_fixed_accuracy(cred(xp_tr, xn_tr), 1 - y[tr], cred(xp_te, xn_te), 1 - y[te])
    assert acc_inv[0, best].item() == pytest.approx(acc[0, best].item())
    assert bool(flip_inv[0, best]) != bool(flip[0, best])


def test_sign_fixing_on_constructed_credences():
    dev_y = torch.tensor([1, 1, 0, 0])
    test_y = torch.tensor([1, 0, 1])
    anti = torch.tensor([0.2, 0.1, 0.9, 0.8])           # wrong way round on dev: flip
    acc, flip = sign_fixed_accuracy(anti, dev_y, torch.tensor([0.3, 0.6, 0.4]), test_y)
    assert bool(flip) and acc.item() == pytest.approx(1.0)
    acc, flip = sign_fixed_accuracy(1 - anti, dev_y, torch.tensor([0.3, 0.6, 0.4]), test_y)
    assert not bool(flip) and acc.item() == pytest.approx(0.0)


def test_split_keeps_groups_together():
    groups = [f"g{i // 2}" for i in range(20)]
    train, test = split_pairs(20, 0.6, seed=3, groups=groups)
    assert len(set(train) | set(test)) == 20 and not set(train) & set(test)
    sides = {groups[i]: "train" for i in train} | {groups[i]: "test" for i in test}
    assert all(sides[groups[i]] == ("train" if i in train else "test") for i in range(20))
    assert len(train) == 12


def test_run_ccs_on_a_tiny_model_and_its_lens_answer(tiny_sessions, tmp_path):
    s = tiny_sessions["llama"]
    statements = [f"Claim number {i} is {'right' if i % 2 else 'wrong'}." for i in range(16)]
    pairs = pairs_from_statements(statements, [i % 2 == 1 for i in range(16)], "t")
    result = run_ccs(s, pos=pairs.pos, neg=pairs.neg, labels=pairs.labels, restarts=3, epochs=30)
    assert result.validate() is None and result.n_train + result.n_test == 16
    back = CCSResult.from_dict(json.loads(json.dumps(result.to_dict())))
    assert np.array_equal(back.accuracy, result.accuracy) and back.sign_flipped.dtype == bool
    assert ((0 <= result.accuracy) & (result.accuracy <= 1)).all()
    # the lens answer, independently: per text, per row, log p(last token) at the position before it
    train, test = split_pairs(16, 0.6, 0)
    lp = np.empty((2, s.n_layers + 1, 16))
    for side, texts in enumerate((pairs.pos, pairs.neg)):
        for i, text in enumerate(texts):
            ids = s.encode(text)
            with torch.no_grad():
                out = s.hf(ids[None], output_hidden_states=True)
            acts = []
            hook = s.hf_blocks()[-1].register_forward_hook(
                lambda m, a, o, acts=acts: acts.append(o[0] if isinstance(o, tuple) else o))
            with torch.no_grad():
                s.hf(ids[None])
            hook.remove()
            rows = list(out.hidden_states[:-1]) + [acts[0]]
            for r, h in enumerate(rows):
                logits = s.hf.lm_head(s.hf.model.norm(h[0, -2]))
                lp[side, r, i] = torch.log_softmax(logits.double(), -1)[ids[-1]].item()
    y = np.array(pairs.labels)
    expect = ((lp[0][:, test] > lp[1][:, test]) == y[test]).mean(1)
    np.testing.assert_allclose(result.lens_accuracy, expect)


def test_pairs_file_and_errors(tiny_sessions, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"pos": "a Yes", "neg": "a No", "label": 1}\n{"pos": "b Yes", "neg": "b No", "label": "false"}\n')
    pairs = load_pairs(path)
    assert pairs.labels == (1, 0) and pairs.pos == ("a Yes", "b Yes") and pairs.groups is None
    path.write_text('{"pos": "a"}\n')
    with pytest.raises(CCSError, match="pos, neg and label"):
        load_pairs(path)
    s = tiny_sessions["llama"]
    with pytest.raises(CCSError, match="too few"):
        run_ccs(s, pos=("a", "b", "c"), neg=("d", "e", "f"), labels=(1, 0, 1))
    with pytest.raises(CCSError, match="every pair"):
        run_ccs(s, pos=("a", "b"), neg=("d",), labels=(1, 0))
