"""The sidebar's model picker: attaching a saved model resets the views to it, keeps the history
(labelled by model), and a model that cannot load leaves the current one attached with a message."""
from __future__ import annotations

import json

import pytest

from explorer import logit_lens
from tiny_models import make_tiny_model
from widgets import ExplorerApp
from widgets.model_picker import ModelPicker, choice_label

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory, tokenizer):
    """A folder with a saved tiny gpt2 (weights and tokenizer), a BERT config, and a config
    without weights; plus a fake HF cache holding the same gpt2 as acme/tiny-gpt2."""
    root = tmp_path_factory.mktemp("picker")
    good = root / "models" / "tiny-saved"
    make_tiny_model("gpt2", len(tokenizer)).save_pretrained(good)
    tokenizer.save_pretrained(good)
    bert = root / "models" / "a-bert"
    bert.mkdir(parents=True)
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    empty = root / "models" / "no-weights"
    empty.mkdir()
    (empty / "config.json").write_text((good / "config.json").read_text())
    hub_snapshot = root / "hub" / "models--acme--tiny-gpt2" / "snapshots" / "rev1"
    make_tiny_model("gpt2", len(tokenizer)).save_pretrained(hub_snapshot)
    tokenizer.save_pretrained(hub_snapshot)
    return root


@pytest.fixture
def app(tiny_sessions, saved_models, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(saved_models / "hub"))
    monkeypatch.setenv("EXPLORER_CACHE", str(tmp_path / "no-project-cache"))
    app = ExplorerApp(tiny_sessions["llama"])
    yield app
    app.close()


def test_the_picker_lists_folder_and_hf_cache_models(app, saved_models):
    picker = app.picker
    assert [c.name for c in picker.choices] == ["acme/tiny-gpt2"]  # the HF cache, from the environment
    picker.folder = str(saved_models / "models")
    picker.param.trigger("rescan")
    names = [c.name for c in picker.choices]
    assert names == ["a-bert", "no-weights", "tiny-saved", "acme/tiny-gpt2"]
    labels = list(picker._select.options)
    assert "acme/tiny-gpt2 (HF cache)" in labels
    assert any(label.startswith("a-bert (folder): no adapter for model type 'bert'") for label in labels)
    assert picker.status == "4 local models found."
    assert picker.selected == str(saved_models / "models" / "no-weights")  # the first supported one


def test_attaching_a_saved_model_resets_the_views_and_keeps_the_history(app, saved_models, tiny_sessions):
    old = app.session
    app.history.add(logit_lens(old, PROMPT, top_k=3), "lens: before")
    app.picker.load(str(saved_models / "models" / "tiny-saved"), background=False)
    new = app.session
    assert new is not old and new.name == "tiny-saved" and new.adapter.family == "gpt2"
    views = (app.lens, app.heads, app.ablation, app.neurons, app.swap, app.generate, app.steering, app.probes,
             app.patchscope, app.sae, app.features)
    assert all(view.session is new for view in views)
    assert app._tabs._names[:11] == ["Logit lens", "Heads", "Ablation", "Neurons", "Pronoun swap", "Generate",
                                     "Steering", "Probes", "Patchscope", "Train SAE", "Features"]
    assert len(app._tabs) == 11
    assert "tiny-saved" in app.card and "GPT2LMHeadModel" in app.card
    assert app.picker.error == "" and app.picker.status.startswith("Attached **tiny-saved**")
    # The history stays; results are labelled by the model that made them.
    assert [e.label for e in app.history.entries] == ["[tiny-llama] lens: before"]
    app.history.add(logit_lens(new, PROMPT, top_k=3), "lens: after")
    assert app.history.entries[-1].label == "[tiny-saved] lens: after"
    # The wiring between views follows the new views.
    app.neurons.ablate_request = ("0:1",)
    assert app._tabs.active == 2


def test_an_hf_cache_model_keeps_its_hub_name(app):
    picker = app.picker
    job = picker.load(picker.selected)  # the list's first entry, loaded in the background
    job.wait(60)
    assert app.session.name == "acme/tiny-gpt2"
    assert "acme/tiny-gpt2" in app.card


@pytest.mark.parametrize("broken, says", [("a-bert", "no architecture adapter for model type 'bert'"),
                                          ("no-weights", "cannot load weights"),
                                          ("missing", "not found")])
def test_a_model_that_cannot_load_leaves_the_current_one(app, saved_models, broken, says):
    old, lens, card = app.session, app.lens, app.card
    app.picker.path = str(saved_models / "models" / broken)
    app.picker.param.trigger("attach_path")
    job = app.picker.live.job
    job.wait(60)
    assert app.session is old and app.lens is lens and app.card == card
    assert app.picker.error.startswith(f"**Could not attach {broken}:**"), app.picker.error
    assert says in app.picker.error and "The current model stays attached." in app.picker.error
    assert not app.picker.loading


def test_the_sidebar_shows_the_picker(app):
    card = next(part for part in app.sidebar() if "model-picker-card" in part.css_classes)
    found = {c for obj in card.select() for c in getattr(obj, "css_classes", [])}
    assert {"model-picker-list", "model-picker-attach", "model-picker-path", "model-picker-error"} <= found


def test_choice_labels(saved_models):
    picker = ModelPicker(lambda session: None, catalog={"hf_cache": saved_models / "none",
                                                        "include_project_cache": False})
    assert picker.choices == () and picker.status == "No local models found."
    picker.folder = str(saved_models / "models" / "tiny-saved")
    picker.param.trigger("rescan")
    assert [choice_label(c) for c in picker.choices] == ["tiny-saved (folder)"]


def test_snapshot_tabs_stay_and_check_the_new_model(app, saved_models):
    app.history.add(logit_lens(app.session, PROMPT, top_k=3), "lens: before")
    view = app.open_snapshot(app.snapshot(), "s")
    assert view is not None and view.can_continue
    app.picker.load(str(saved_models / "models" / "tiny-saved"), background=False)
    assert app._tabs._names[-1] == "Snapshot: s" and len(app._tabs) == 12
    assert view.session is app.session and view.views["lens"] is app.lens
    assert not view.can_continue and "not the one this snapshot was made with" in view.model_warning
