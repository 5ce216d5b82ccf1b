"""Run with the SAELens environment's Python (``.venv-saelens``): SAELens's own side of the
interoperability check in ``test_saelens_interop.py``. Nothing here imports this project.

``read DIR...``: each DIR holds an SAE in the SAELens layout (written by this project) and
``inputs.safetensors`` (``x``); SAELens opens it (``SAE.load_from_disk``) and writes
``saelens.safetensors`` there: its ``encode(x)`` and ``decode(encode(x))``, and a JSON line naming
the class it chose.

``write DIR``: for each architecture below SAELens builds an SAE of its own class with seeded
random weights, saves it with ``save_model`` into DIR/<name>, and writes the same two outputs
for the inputs in DIR/inputs.safetensors.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from sae_lens import SAE
from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
from sae_lens.saes.sae import SAEMetadata
from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig
from sae_lens.saes.transcoder import (
    JumpReLUTranscoder,
    JumpReLUTranscoderConfig,
    Transcoder,
    TranscoderConfig,
)
from safetensors.torch import load_file, save_file

D_IN, D_SAE, K = 16, 40, 5
def resid_meta() -> SAEMetadata:
    return SAEMetadata(hook_name="blocks.2.hook_resid_post")


def transcoder_meta() -> SAEMetadata:
    return SAEMetadata(hook_name="blocks.2.ln2.hook_normalized", hook_name_out="blocks.2.hook_mlp_out")


def outputs(sae, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        f = sae.encode(x)
        return {"features": f.float().contiguous(), "recon": sae.decode(f).float().contiguous()}


def read(dirs: list[str]) -> None:
    for d in map(Path, dirs):
        sae = SAE.load_from_disk(d, device="cpu")
        x = load_file(d / "inputs.safetensors")["x"]
        save_file(outputs(sae, x), d / "saelens.safetensors")
        print(json.dumps({"dir": d.name, "class": type(sae).__name__}))


def randomise(sae, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name == "threshold":
                p.copy_(torch.rand(p.shape, generator=g) * 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.1 if name.startswith("b_") else 1.0))


def write(root: str) -> None:
    root = Path(root)
    x = load_file(root / "inputs.safetensors")["x"]
    makers = {
        "standard": lambda: StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, metadata=resid_meta())),
        "standard_no_bdec": lambda: StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, apply_b_dec_to_input=False,
                                                                  metadata=resid_meta())),
        "topk": lambda: TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, metadata=resid_meta())),
        "topk_rescaled": lambda: TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, rescale_acts_by_decoder_norm=True,
                                                       metadata=resid_meta())),
        "jumprelu": lambda: JumpReLUSAE(JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE, metadata=resid_meta())),
        "transcoder": lambda: Transcoder(TranscoderConfig(d_in=D_IN, d_sae=D_SAE, d_out=12, apply_b_dec_to_input=False,
                                                          metadata=transcoder_meta())),
        "jumprelu_transcoder": lambda: JumpReLUTranscoder(JumpReLUTranscoderConfig(
            d_in=D_IN, d_sae=D_SAE, d_out=12, apply_b_dec_to_input=False, metadata=transcoder_meta())),
    }
    for i, (name, make) in enumerate(makers.items()):
        sae = make()
        randomise(sae, i)
        sae.save_model(root / name)
        save_file(outputs(sae, x), root / name / "saelens.safetensors")
        print(json.dumps({"dir": name, "class": type(sae).__name__}))


if __name__ == "__main__":
    {"read": lambda: read(sys.argv[2:]), "write": lambda: write(sys.argv[2])}[sys.argv[1]]()
