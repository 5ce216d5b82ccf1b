"""Every example notebook and script runs to the end without an error.

The notebooks show full analyses on the default model; here a few of them run with smaller sizes
(every code path and check of the notebook still runs): QUICK lists each replacement, and a
replacement that no longer matches the notebook fails the test, so a notebook never silently
runs at full size (or with stale settings) in the suite."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))
SCRIPTS = sorted(EXAMPLES.glob("*.py"))

pytestmark = pytest.mark.examples

# notebook -> [(text in a code cell, its replacement for the test run)]
QUICK = {
    # 36 prompts of 9 demonstrations and 3 random draws -> 12 of 6 and 2 (sd needs two).
    "false_demonstrations.ipynb": [
        ("DemoRequest(task=\"topics\", n_prompts=36, n_demos=9, seed=0, batch_size=12)",
         "DemoRequest(task=\"topics\", n_prompts=12, n_demos=6, seed=0, batch_size=12)"),
        ("n_random=3", "n_random=2"),
    ],
    # 6 steps evaluated on the demo's probe set -> 2 steps, smaller batches and probe set (the
    # swap's effect on the default model is checked by tests/model/test_intervene_model.py).
    "pronoun_swap.ipynb": [("InterventionConfig(steps=6, eval_every=6, checkpoint_every=6)",
                            "InterventionConfig(steps=2, eval_every=2, checkpoint_every=2, batch_size=4, "
                            "seq_len=32, eval_templates=2, eval_pairs=8, heldout_windows=4)")],
    # Never an existing run (the real one is 40 steps): the notebook's own short run, 1 step on 1
    # template, 8 pairs, 2 loss windows of 32 tokens, and α = 0, 1 (every cell still runs).
    "steering_vs_swap.ipynb": [
        ('CANDIDATES = [os.environ.get("SWAP_RUN"), "../runs/demo", "runs/demo", str(default_runs_dir() / "demo")]',
         "CANDIDATES = []"),
        ("SHORT = InterventionConfig(steps=SWAP_STEPS, eval_every=SWAP_STEPS, checkpoint_every=SWAP_STEPS)",
         "SHORT = InterventionConfig(steps=1, eval_every=1, checkpoint_every=1, batch_size=4, seq_len=32, "
         "eval_templates=1, eval_pairs=8, heldout_windows=2)"),
        ("ALPHAS = (-2.0, -1.0, 0.0, 1.0, 2.0)", "ALPHAS = (0.0, 1.0)"),
    ],
    # A 1,152-wide SAE on 4,096 tokens, indexes of 1,024 -> 512 wide on 1,024 tokens, indexes of
    # 256 (the card, search, explanation and compare cells still run).
    "features.ipynb": [
        ("SETTINGS = dict(width=1152, k=16, train_tokens=4096, index_tokens=1024, explain=20)",
         "SETTINGS = dict(width=512, k=16, train_tokens=1024, index_tokens=256, explain=3)"),
    ],
}


def quick(nb, name: str):
    """Apply QUICK's replacements to a notebook's code cells; each must match exactly once."""
    for old, new in QUICK.get(name, []):
        cells = [c for c in nb.cells if c.cell_type == "code" and old in c.source]
        assert len(cells) == 1 and cells[0].source.count(old) == 1, f"{name}: {old!r} not found once: update QUICK"
        cells[0].source = cells[0].source.replace(old, new)
    return nb


def test_there_are_examples():
    assert NOTEBOOKS and SCRIPTS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path, default_model_dir):
    import nbformat
    from nbclient import NotebookClient

    nb = quick(nbformat.read(path, as_version=4), path.name)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(EXAMPLES)}}).execute()
    errors = [o for cell in nb.cells for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_script_runs(path, default_model_dir):
    proc = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
