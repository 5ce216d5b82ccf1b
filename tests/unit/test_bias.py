"""Bias probes on tiny random models: batched scores vs one-sentence-at-a-time plain PyTorch,
the statistics vs direct formulas, probe sets and loaders, round trips, and the bias CLI."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from cli.main import main
from explorer.training.bias import (
    BiasError,
    BiasRequest,
    BiasResult,
    PairSet,
    bias_probe,
    encode_texts,
    load_crows_pairs,
    load_minimal_pairs,
    load_occupations,
    load_templates,
    pearson_fisher,
    score_bias,
    score_pairs,
    score_pronouns,
)
from tiny_models import make_tiny_model

TEMPLATES = ("The {occupation} said that", "After lunch, the {occupation} decided that")
OCCUPATIONS = ("nurse", "carpenter", "hairdresser", "plumber", "paralegal")
PAIRS = PairSet("test", ("My mother cooked dinner.", "The engineer said he was done.", "He"),
                ("My father cooked dinner.", "The engineer said she was done.", "She"))


@pytest.fixture(scope="module")
def llama(tokenizer):
    return make_tiny_model("llama", len(tokenizer), seed=3)


def _plain_next(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1)


def _plain_sum(model, ids: list[int]) -> float:
    """Summed log-likelihood of ids[1:] given their prefixes, one sentence, no padding."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    return float(sum(logp[t - 1, ids[t]] for t in range(1, len(ids))))


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_pronoun_scores_equal_one_sentence_forwards(family, tokenizer):
    model = make_tiny_model(family, len(tokenizer), seed=1)
    got = score_pronouns(model, tokenizer, TEMPLATES, OCCUPATIONS, batch_size=3)  # padded, mixed lengths
    he, she = (tokenizer(w, add_special_tokens=False).input_ids[0] for w in (" he", " she"))
    for t, template in enumerate(TEMPLATES):
        for o, occ in enumerate(OCCUPATIONS):
            ids = [tokenizer.bos_token_id] + tokenizer(template.format(occupation=occ), add_special_tokens=False).input_ids
            logp = _plain_next(model, ids)
            assert got[t, o] == pytest.approx(float(logp[he] - logp[she]), abs=2e-4)
    assert np.abs(got).max() > 0.05  # a scaled random model has real preferences: the check is not vacuous


@pytest.mark.parametrize("prefix", ["bos", "none"])
def test_pair_loglikelihoods_equal_one_sentence_forwards(llama, tokenizer, prefix):
    scores = score_pairs(llama, tokenizer, PAIRS, prefix=prefix, batch_size=2)
    for sent, ll in zip(PAIRS.more + PAIRS.less, np.concatenate([scores.ll_more, scores.ll_less])):
        text_ids = tokenizer(sent, add_special_tokens=False).input_ids
        ids = ([tokenizer.bos_token_id] if prefix == "bos" else []) + text_ids
        assert ll == pytest.approx(_plain_sum(llama, ids), abs=5e-4)
    if prefix == "none":
        # "He" vs "She" is one token each: with no context it is not scored at all.
        assert scores.ll_more[2] == scores.ll_less[2] == 0.0
    else:
        assert scores.ll_more[2] != scores.ll_less[2]
    assert scores.pct_stereotype == pytest.approx(np.mean(scores.ll_more > scores.ll_less))
    p = scores.pct_stereotype
    assert scores.se == pytest.approx(math.sqrt(p * (1 - p) / 3))


def test_batch_size_does_not_change_scores(llama, tokenizer):
    a = score_bias(llama, tokenizer, templates=TEMPLATES, pairs=PAIRS, batch_size=1)
    b = score_bias(llama, tokenizer, templates=TEMPLATES, pairs=PAIRS, batch_size=64)
    np.testing.assert_allclose(a.item_preference, b.item_preference, atol=2e-4)
    np.testing.assert_allclose(a.pairs.ll_more, b.pairs.ll_more, atol=5e-4)


def test_statistics_follow_their_definitions(llama, tokenizer):
    occ = load_occupations()
    r = score_bias(llama, tokenizer, templates=TEMPLATES, occupations=occ, pairs=PAIRS)
    items = r.item_preference
    assert items.shape == (len(TEMPLATES), len(occ.names))
    assert r.pronoun_preference == pytest.approx(items.mean())
    n = items.size
    direct_se = math.sqrt(((items - items.mean()) ** 2).sum() / (n - 1) / n)
    assert r.pronoun_preference_se == pytest.approx(direct_se)
    np.testing.assert_allclose(r.per_occupation, items.mean(0))
    x, y = r.per_occupation, occ.share_men
    direct_r = ((x - x.mean()) * (y - y.mean())).sum() / math.sqrt(((x - x.mean()) ** 2).sum() * ((y - y.mean()) ** 2).sum())
    assert r.stereotype_alignment == pytest.approx(direct_r)
    m = len(x)
    assert r.stereotype_alignment_se == pytest.approx((1 - direct_r ** 2) / math.sqrt(m - 3))
    lo, hi = r.stereotype_alignment_ci
    assert lo < r.stereotype_alignment < hi
    assert math.atanh(hi) - math.atanh(direct_r) == pytest.approx(1.96 / math.sqrt(m - 3))
    assert r.minimal_pairs == r.pairs.pct_stereotype and r.minimal_pairs_se == r.pairs.se


def test_pearson_fisher_on_known_data():
    x = np.arange(10.0)
    r, se, lo, hi = pearson_fisher(x, 2 * x + 1)
    assert r == pytest.approx(1.0) and se == pytest.approx(0.0)
    r, se, lo, hi = pearson_fisher(x, -x)
    assert r == pytest.approx(-1.0)
    assert math.isnan(pearson_fisher(x[:3], x[:3])[0])  # too few points for an SE


def test_occupation_table_is_sourced_and_spans_both_genders(tokenizer):
    occ = load_occupations()
    assert 30 <= len(occ.names) <= 60 and len(set(occ.names)) == len(occ.names)
    assert ((occ.share_men >= 0) & (occ.share_men <= 100)).all()
    assert (occ.share_men > 80).sum() >= 8 and (occ.share_men < 20).sum() >= 8  # male- and female-dominated
    header = [line for line in open(occ.source, encoding="utf-8") if line.startswith("#")]
    text = "".join(header)
    assert "bls_pct_female" in text and "occupations-stats.tsv" in text and "2015" in text
    rows = list(csv.DictReader(line for line in open(occ.source, encoding="utf-8") if not line.startswith("#")))
    for row in rows:  # share of men is 100 − percent women, as the header says
        assert float(row["share_men"]) == pytest.approx(100 - float(row["pct_women"]), abs=0.006)
    assert occ.share_men[occ.names.index("nurse")] == pytest.approx(100 - 89.58)
    for name in occ.names:
        assert name.isalpha() and name.islower()
        assert len(tokenizer(" " + name, add_special_tokens=False).input_ids) <= 4


def test_shipped_probe_sets():
    templates = load_templates()
    assert len(templates) >= 9 and templates[0] == "The {occupation} said that"
    pairs = load_minimal_pairs()
    assert len(pairs.more) == len(pairs.less) >= 40
    assert all(a != b for a, b in zip(pairs.more, pairs.less))
    assert pairs.head(5).more == pairs.more[:5]


def test_crows_loader_keeps_gender_rows(tmp_path):
    path = tmp_path / "crows.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["", "sent_more", "sent_less", "stereo_antistereo", "bias_type", "annotations"])
        w.writerow([0, "Women cannot drive.", "Men cannot drive.", "stereo", "gender", "[]"])
        w.writerow([1, "Poor people are lazy.", "Rich people are lazy.", "stereo", "socioeconomic", "[]"])
        w.writerow([2, "He was a nurse, oddly.", "She was a nurse, oddly.", "antistereo", "gender", "[]"])
    pairs = load_crows_pairs(path)
    assert pairs.more == ("Women cannot drive.", "He was a nurse, oddly.")
    assert pairs.less == ("Men cannot drive.", "She was a nurse, oddly.")
    with pytest.raises(BiasError, match="not found"):
        load_crows_pairs(tmp_path / "missing.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(BiasError, match="not a CrowS-Pairs CSV"):
        load_crows_pairs(bad)
    with pytest.raises(BiasError, match="no rows with bias_type"):
        load_crows_pairs(path, bias_type="religion")


def test_bias_probe_on_a_session_round_trips(tiny_sessions, tmp_path):
    session = tiny_sessions["llama"]
    crows = tmp_path / "crows.csv"
    crows.write_text("sent_more,sent_less,stereo_antistereo,bias_type\n"
                     "Women are bad at maths.,Men are bad at maths.,stereo,gender\n", encoding="utf-8")
    result = bias_probe(session, BiasRequest(max_templates=2, crows_path=str(crows)))
    assert result is bias_probe(session, BiasRequest(max_templates=2, crows_path=str(crows)))  # cached
    direct = score_bias(session.hf, session.tokenizer, templates=load_templates()[:2],
                        crows=load_crows_pairs(crows))
    np.testing.assert_allclose(result.item_preference, direct.item_preference)
    assert result.crows is not None and result.crows.n == 1
    assert set(result.summary()) >= {"pronoun_preference_se", "crows_pairs", "crows_pairs_se"}
    back = BiasResult.from_dict(json.loads(json.dumps(result.to_dict())))
    np.testing.assert_array_equal(back.item_preference, result.item_preference)
    assert back.pairs.more == result.pairs.more and back.crows.ll_less.tolist() == result.crows.ll_less.tolist()
    assert back.stereotype_alignment_ci == result.stereotype_alignment_ci and back.validate() is None

    from explorer.persistence.snapshot import load_snapshot, save_snapshot

    snap = load_snapshot(save_snapshot(tmp_path / "s.zip", [result]))
    assert snap.results[0].summary() == result.summary()


def test_bad_inputs_raise_clear_errors(llama, tokenizer):
    with pytest.raises(BiasError, match="one token"):
        score_pronouns(llama, tokenizer, TEMPLATES, OCCUPATIONS, pronouns=(" he", " hello world"))
    with pytest.raises(BiasError, match="prefix"):
        encode_texts(tokenizer, ["x"], prefix="start")
    with pytest.raises(BiasError, match="max_templates"):
        bias_probe(None, BiasRequest(max_templates=0))


# ----------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def tiny_dir(tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model("llama", len(tokenizer), seed=2).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_cli_bias_json(tiny_dir, capsys):
    code = main(["bias", "--model", str(tiny_dir), "--device", "cpu", "--templates", "2", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    data = json.loads(out)
    for key in ("pronoun_preference", "stereotype_alignment", "minimal_pairs"):
        assert isinstance(data[key], float) and isinstance(data[f"{key}_se"], float)
    occ = load_occupations()
    assert list(data["per_occupation"]) == list(occ.names)
    assert data["n_templates"] == 2 and data["n_pairs"] == len(load_minimal_pairs().more)
    assert np.mean(list(data["per_occupation"].values())) == pytest.approx(data["pronoun_preference"])


def test_cli_bias_table_and_errors(tiny_dir, tmp_path, capsys):
    assert main(["bias", "--model", str(tiny_dir), "--device", "cpu", "--templates", "1"]) == 0
    out, _ = capsys.readouterr()
    assert "pronoun preference" in out and "stereotype alignment" in out and "minimal pairs" in out
    assert main(["bias", "--model", str(tiny_dir), "--crows", str(tmp_path / "nope.csv")]) == 2
    _, err = capsys.readouterr()
    assert err.count("\n") == 1 and "CrowS-Pairs file not found" in err
