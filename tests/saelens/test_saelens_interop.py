"""The SAELens layout, checked against the real SAELens (``make test-saelens``).

SAELens (sae-lens 6.54.12) pins transformer-lens < 4, so it lives in its own environment,
``.venv-saelens``; ``saelens_side.py`` runs there (``SAELENS_PYTHON``) and never imports this
project. Both directions are checked on the same random inputs:

- **written here, read by SAELens:** SAEs of every architecture this project saves (standard,
  TopK, JumpReLU, with and without input normalisation, ReLU and JumpReLU transcoders) and SAEs
  *trained* here on a tiny model (TopK, BatchTopK, a BatchTopK transcoder). SAELens's
  ``SAE.load_from_disk`` must open each as the class we claim, and its ``encode`` and
  ``decode(encode(x))`` must equal ours.
- **written by SAELens, read here:** SAELens builds SAEs of its own classes (standard, TopK with
  and without ``rescale_acts_by_decoder_norm``, JumpReLU, both transcoders) with random weights
  and saves them with ``save_model``; ``load_sae`` must open each and encode and decode as
  SAELens does.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from explorer.features.sae import SAEConfig, SparseAutoencoder
from explorer.features.saelens_io import load_sae, save_sae
from explorer.features.train import train_sae
from helpers import corpus_head

SIDE = Path(__file__).with_name("saelens_side.py")
D_IN, D_SAE, D_OUT, K = 16, 40, 12, 5
RESID = {"hook_name": "blocks.2.hook_resid_post"}
TRANSCODER = {"hook_name": "blocks.2.ln2.hook_normalized", "hook_name_out": "blocks.2.hook_mlp_out"}
TRAIN = dict(layer=1, width=48, k=4, max_tokens=4 * 64 * 4, window=64, batch=128, batch_windows=4,
             eval_windows=2, eval_every=2, warmup_steps=2)


@pytest.fixture(scope="module")
def saelens_python() -> str:
    python = os.environ.get("SAELENS_PYTHON", "")
    if not python or not Path(python).exists():
        pytest.fail("SAELENS_PYTHON is not set to the SAELens environment's python: run `make test-saelens`")
    return python


def side(python: str, *args: str) -> list[dict]:
    done = subprocess.run([python, str(SIDE), *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": ""})
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def inputs(d_in: int, seed: int = 7) -> torch.Tensor:
    return torch.randn(9, d_in, generator=torch.Generator().manual_seed(seed)) * 3


def random_sae(arch: str, seed: int, d_out: int | None = None, **cfg) -> SparseAutoencoder:
    g = torch.Generator().manual_seed(seed)
    out = d_out or D_IN
    w = {"W_enc": torch.randn(D_IN, D_SAE, generator=g) * 0.5, "b_enc": torch.randn(D_SAE, generator=g) * 0.1,
         "W_dec": torch.randn(D_SAE, out, generator=g), "b_dec": torch.randn(out, generator=g) * 0.1}
    if arch == "jumprelu":
        w["threshold"] = torch.rand(D_SAE, generator=g) * 0.5
    meta = dict(TRANSCODER if d_out else RESID)
    return SparseAutoencoder(SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture=arch, k=K if arch == "topk" else None,
                                       d_out=d_out, metadata=meta, **cfg), w)


def ours(sae: SparseAutoencoder, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        f = sae.encode(x)
        return f.float(), sae.decode(f, x).float()


def assert_same(sae: SparseAutoencoder, x: torch.Tensor, theirs: dict[str, torch.Tensor], name: str) -> None:
    f, recon = ours(sae, x)
    torch.testing.assert_close(f, theirs["features"], atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: features: {m}")
    torch.testing.assert_close(recon, theirs["recon"], atol=1e-4, rtol=1e-5, msg=lambda m: f"{name}: recon: {m}")
    assert int((f != 0).sum()) > 0, name                       # the comparison is not between zeros


@pytest.fixture(scope="module")
def trained(tiny_sessions, tmp_path_factory) -> dict[str, Path]:
    """SAEs trained here on the tiny Llama (d_model 64): TopK, BatchTopK, a BatchTopK transcoder."""
    root = tmp_path_factory.mktemp("trained")
    corpus = str(corpus_head(root, 20))
    runs = {"trained_topk": dict(architecture="topk", site="resid"),
            "trained_batchtopk": dict(architecture="batchtopk", site="resid"),
            "trained_batchtopk_transcoder": dict(architecture="batchtopk", site="transcoder")}
    for name, settings in runs.items():
        result = train_sae(tiny_sessions["llama"], corpus_path=corpus, out_dir=root / name, **TRAIN, **settings)
        assert result.status == "done", name
    return {name: root / name for name in runs}


# What SAELens must open each as (its class name), for the SAEs written here (random weights).
WRITTEN = {
    "standard": ("StandardSAE", lambda: random_sae("standard", 0)),
    "standard_constant_norm": ("StandardSAE", lambda: random_sae("standard", 1, normalize_activations="constant_norm_rescale")),
    "standard_layer_norm": ("StandardSAE", lambda: random_sae("standard", 2, normalize_activations="layer_norm")),
    "topk": ("TopKSAE", lambda: random_sae("topk", 3)),
    "topk_no_bdec": ("TopKSAE", lambda: random_sae("topk", 4, apply_b_dec_to_input=False)),
    "jumprelu": ("JumpReLUSAE", lambda: random_sae("jumprelu", 5)),
    "transcoder": ("Transcoder", lambda: random_sae("standard", 6, d_out=D_OUT, apply_b_dec_to_input=False)),
    "jumprelu_transcoder": ("JumpReLUTranscoder",
                            lambda: random_sae("jumprelu", 7, d_out=D_OUT, apply_b_dec_to_input=False)),
}
TRAINED = {"trained_topk": "TopKSAE", "trained_batchtopk": "JumpReLUSAE",
           "trained_batchtopk_transcoder": "JumpReLUTranscoder"}


def test_saelens_reads_what_this_project_writes_and_encodes_it_the_same(saelens_python, tmp_path):
    saes: dict[str, SparseAutoencoder] = {}
    for name, (_, make) in WRITTEN.items():
        save_sae(make(), tmp_path / name)
        saes[name] = load_sae(tmp_path / name)
        save_file({"x": inputs(D_IN)}, tmp_path / name / "inputs.safetensors")
    opened = {r["dir"]: r["class"] for r in side(saelens_python, "read", *[str(tmp_path / n) for n in saes])}
    assert opened == {n: c for n, (c, _) in WRITTEN.items()}
    for name, sae in saes.items():
        x = load_file(tmp_path / name / "inputs.safetensors")["x"]
        assert_same(sae, x, load_file(tmp_path / name / "saelens.safetensors"), name)


def test_saelens_reads_the_saes_trained_here_and_encodes_them_the_same(saelens_python, trained):
    """The folders train_sae wrote, as they are: TopK, BatchTopK (saved as JumpReLU) and a BatchTopK
    transcoder (saved as a JumpReLU transcoder)."""
    for folder in trained.values():
        save_file({"x": inputs(load_sae(folder).d_in)}, folder / "inputs.safetensors")
    opened = {r["dir"]: r["class"] for r in side(saelens_python, "read", *map(str, trained.values()))}
    assert opened == TRAINED
    for name, folder in trained.items():
        x = load_file(folder / "inputs.safetensors")["x"]
        assert_same(load_sae(folder), x, load_file(folder / "saelens.safetensors"), name)


def test_this_project_reads_what_saelens_writes_and_encodes_it_the_same(saelens_python, tmp_path):
    save_file({"x": inputs(D_IN)}, tmp_path / "inputs.safetensors")
    made = [r["dir"] for r in side(saelens_python, "write", str(tmp_path))]
    assert set(made) == {"standard", "standard_no_bdec", "topk", "topk_rescaled", "jumprelu", "transcoder",
                         "jumprelu_transcoder"}
    x = load_file(tmp_path / "inputs.safetensors")["x"]
    for name in made:
        sae = load_sae(tmp_path / name)
        assert sae.cfg.is_transcoder == ("transcoder" in name), name
        assert_same(sae, x, load_file(tmp_path / name / "saelens.safetensors"), name)
    raw = json.loads((tmp_path / "topk_rescaled" / "cfg.json").read_text())
    assert raw["rescale_acts_by_decoder_norm"] is True        # the case the fold in load_sae covers


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
