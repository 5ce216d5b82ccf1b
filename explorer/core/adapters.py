"""Architecture adapters: where each model family keeps the parts the analyses need.

Everything else in the engine is written once against this table. Module paths are
dotted paths from the Hugging Face ``*ForCausalLM`` model.
"""
from __future__ import annotations

from dataclasses import dataclass

from explorer.core.errors import UnsupportedModelError


@dataclass(frozen=True)
class Adapter:
    family: str
    blocks: str          # the ModuleList of transformer blocks
    embed: str           # token embedding (its weight is the input vocabulary)
    resid_in: str        # module whose output is the residual stream entering block 0
    final_norm: str      # norm applied to the last block's output before unembedding
    unembed: str         # the unembedding (a Linear: weight [vocab, d_model])
    attn: str            # attention, relative to a block
    attn_out: str        # attention output projection, relative to a block (input = head concat)
    mlp: str             # MLP, relative to a block
    mlp_out: str         # MLP down/out projection, relative to a block (input = neurons)


_LLAMA = dict(
    blocks="model.layers", embed="model.embed_tokens", resid_in="model.embed_tokens",
    final_norm="model.norm", unembed="lm_head", attn="self_attn",
    attn_out="self_attn.o_proj", mlp="mlp", mlp_out="mlp.down_proj",
)

ADAPTERS: dict[str, Adapter] = {
    # Llama family: SmolLM2, Llama, Mistral, Qwen2 share one layout.
    "llama": Adapter(family="llama", **_LLAMA),
    "mistral": Adapter(family="mistral", **_LLAMA),
    "qwen2": Adapter(family="qwen2", **_LLAMA),
    "gpt2": Adapter(
        family="gpt2", blocks="transformer.h", embed="transformer.wte",
        resid_in="transformer.drop",  # token + position embeddings, after dropout
        final_norm="transformer.ln_f", unembed="lm_head", attn="attn",
        attn_out="attn.c_proj", mlp="mlp", mlp_out="mlp.c_proj",
    ),
    "gpt_neox": Adapter(
        family="gpt_neox", blocks="gpt_neox.layers", embed="gpt_neox.embed_in",
        resid_in="gpt_neox.emb_dropout", final_norm="gpt_neox.final_layer_norm",
        unembed="lm_head", attn="attention", attn_out="attention.dense",
        mlp="mlp", mlp_out="mlp.dense_4h_to_h",
    ),
}


def adapter_for(model_type: str) -> Adapter:
    """The adapter for a config's ``model_type``, or a clear error naming what is supported."""
    try:
        return ADAPTERS[model_type]
    except KeyError:
        supported = ", ".join(sorted(ADAPTERS))
        raise UnsupportedModelError(
            f"no architecture adapter for model type '{model_type}' (supported: {supported}); "
            "add one to explorer/core/adapters.py naming its blocks, final norm and unembedding"
        ) from None


def check_modules(adapter: Adapter, model) -> None:
    """Fail early, naming every adapter path the loaded model lacks."""
    missing = []
    for path in (adapter.blocks, adapter.embed, adapter.resid_in, adapter.final_norm, adapter.unembed):
        try:
            model.get_submodule(path)
        except AttributeError:
            missing.append(path)
    if not missing:
        block = model.get_submodule(adapter.blocks)[0]
        for path in (adapter.attn, adapter.attn_out, adapter.mlp, adapter.mlp_out):
            try:
                block.get_submodule(path)
            except AttributeError:
                missing.append(f"{adapter.blocks}.0.{path}")
    if missing:
        raise UnsupportedModelError(
            f"model does not match the '{adapter.family}' adapter: missing {', '.join(missing)}"
        )
