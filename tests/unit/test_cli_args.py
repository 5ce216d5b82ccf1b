"""The command line's arguments: every flag says what it is for, and a bad argument is reported
(one ``error:`` line, exit 2) before any model loads."""
from __future__ import annotations

import argparse
import json

import pytest

from cli.main import build_parser, main
from explorer.core.errors import ExplorerError


class LoaderCalled(ExplorerError):
    pass


@pytest.fixture
def no_model_load(monkeypatch):
    """Any model load fails the command with a recognisable error (and is recorded)."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise LoaderCalled("a model was loaded")

    monkeypatch.setattr("explorer.core.session.ModelSession.load", refuse)
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", refuse)
    return calls


@pytest.fixture
def model_dir(tmp_path):
    """A model directory with only a config.json (3 layers, 4 heads of 16, MLP 256): no weights."""
    path = tmp_path / "gpt2-config-only"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 3, "n_head": 4,
                                                  "n_embd": 64, "n_inner": 256, "n_positions": 128}))
    return str(path)


def _parsers(parser: argparse.ArgumentParser, prog: str = ""):
    yield prog or parser.prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, f"{prog} {name}".strip())


def test_every_command_has_a_description_and_every_flag_help():
    missing = []
    for name, parser in _parsers(build_parser()):
        if not parser.description:
            missing.append(f"{name}: no description")
        for action in parser._actions:
            if not isinstance(action, argparse._HelpAction) and not action.help:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}: no help")
    assert not missing, "\n".join(missing)


BAD = [
    (["lens", "--prompt", ""], "empty"),
    (["lens", "--prompt", "   "], "empty"),
    (["lens", "--prompt", "hi", "--top-k", "0"], "between 1 and 100"),
    (["lens", "--prompt", "hi", "--top-k", "ten"], "not an integer"),
    (["lens", "--prompt", "hi", "--target", ""], "empty"),
    (["lens", "--prompt", "hi", "--threshold", "-1"], "0 or more"),
    (["lens", "--prompt", "hi", "--bogus"], "unrecognized arguments: --bogus"),
    (["lens"], "required: --prompt"),
    (["heads", "--prompt", "hi", "--pattern", "two.three"], "LAYER.HEAD"),
    (["heads", "--prompt", "hi", "--pattern", "3.0", "--model", "{model}"], "layer 3 does not exist"),
    (["heads", "--prompt", "hi", "--pattern", "1.4", "--model", "{model}"], "head 4 does not exist"),
    (["heads", "--prompt", "hi", "--seq-len", "0"], "at least 1"),
    (["heads", "--prompt", "hi", "--top", "-2"], "at least 1"),
    (["ablate", "--prompt", "hi", "--target", " Paris", "--heads", "3.x"], "cannot read component"),
    (["ablate", "--prompt", "hi", "--target", " Paris", "--heads", "3.0", "--model", "{model}"],
     "layer 3 in '3.0' is out of range"),
    (["ablate", "--prompt", "hi", "--target", " Paris", "--heads", "0.7", "--model", "{model}"],
     "head 7 in '0.7' is out of range"),
    (["ablate", "--prompt", "hi", "--target", " Paris", "--neurons", "1:256", "--model", "{model}"],
     "neuron 256 in '1:256' is out of range"),
    (["ablate", "--prompt", "hi", "--target", " Paris", "--blocks", "mlp:9", "--model", "{model}"],
     "out of range"),
    (["ablate", "--prompt", "hi", "--target", " Paris", "--heads", "0.1", "--mode", "mean",
      "--mean-file", "/no/such/file.txt"], "--mean-file not found"),
    (["ablate", "--prompt", "hi", "--target", " Paris", "--sweep", "neurons", "--top-n", "0"], "at least 1"),
    (["ablate", "--prompt", "hi", "--target", " Paris"], "nothing to ablate"),
    (["ablate", "--prompt", "hi", "--target", " Paris", "--heads", "0.1", "--mode", "resample"],
     "--second-prompt"),
    (["patch", "--clean", "", "--corrupt", "b", "--target", " c"], "empty"),
    (["neurons", "index", "--corpus", "/no/such/corpus.txt"], "corpus not found"),
    (["neurons", "index", "--window", "1"], "between 2"),
    (["neurons", "index", "--max-tokens", "-5"], "0 or more"),
    (["neurons", "show", "--index", "/no/such/index", "--layer", "-1", "--neuron", "0"], "0 or more"),
    (["neurons", "explain", "--index", "/no/such/index", "--layer", "0", "--neuron", "0"], "no neuron index"),
    (["neurons", "search", "--index", "/no/such/index", "--query", "he"], "index directory not found"),
    (["neurons", "import", "/no/such/file.json", "--index", "/tmp"], "file not found"),
    (["bias", "--crows", "/no/such/crows.csv"], "CrowS-Pairs file not found"),
    (["bias", "--templates", "0"], "at least 1"),
    (["intervene", "--out", "{tmp}/run", "--steps", "0"], "at least 1"),
    (["intervene", "--out", "{tmp}/run", "--lr", "0"], "more than 0"),
    (["intervene", "--out", "{tmp}/run", "--train", "some"], "last:N"),
    (["intervene", "--out", "{tmp}/run", "--corpus", "/no/such/corpus"], "corpus not found"),
    (["checkpoints", "--dirs", "/no/such/model"], "model directory not found"),
    (["checkpoints", "--dirs", "{model}", "--prompt", ""], "empty"),
    (["checkpoints", "--dirs", "{model}", "--target", " she"], "--target needs --prompt"),
    (["snapshot", "show", "/no/such/snapshot.zip"], "snapshot file not found"),
    (["serve", "--port", "0"], "between 1 and 65535"),
    (["lens", "--prompt", "hi", "--device-map", "everywhere"], "unknown device map 'everywhere'"),
    (["lens", "--prompt", "hi", "--device-map", "auto", "--max-memory", "cuda:0=20XB"], "is not a size"),
    (["lens", "--prompt", "hi", "--device-map", "auto", "--max-memory", "gpu=20GiB"], "DEVICE=SIZE"),
    (["heads", "--prompt", "hi", "--device-map", "auto", "--max-memory", "cpu=1GB,cpu=2GB"], "names cpu twice"),
    (["lens", "--prompt", "hi", "--max-memory", "cpu=1GiB"], "--max-memory need --device-map"),
    (["serve", "--offload-dir", "{tmp}"], "--offload-dir need --device-map"),
]


@pytest.mark.parametrize("args, message", BAD, ids=[" ".join(a)[:60] for a, _ in BAD])
def test_a_bad_argument_fails_before_the_model_loads(args, message, no_model_load, model_dir, tmp_path, capsys):
    args = [a.replace("{model}", model_dir).replace("{tmp}", str(tmp_path)) for a in args]
    code = main(args)
    out, err = capsys.readouterr()
    assert no_model_load == [], "the model was loaded before the bad argument was reported"
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err


@pytest.mark.parametrize("args", [
    ["lens", "--prompt", "hi", "--model", "{model}"],
    ["heads", "--prompt", "hi", "--pattern", "2.3", "--model", "{model}"],
    ["ablate", "--prompt", "hi", "--target", " Paris", "--heads", "2.3", "--neurons", "0:255", "--model", "{model}"],
    ["lens", "--prompt", "hi", "--model", "{model}", "--device-map", "auto", "--max-memory", "cuda:0=20GiB,cpu=60GiB",
     "--offload-dir", "/tmp/offload"],
])
def test_good_arguments_reach_the_loader(args, no_model_load, model_dir, capsys):
    """The control for the test above: valid arguments pass every check and get to the loader."""
    code = main([a.replace("{model}", model_dir) for a in args])
    assert code == 2 and len(no_model_load) == 1 and "a model was loaded" in capsys.readouterr().err
