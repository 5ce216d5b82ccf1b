"""Architecture adapters: where each model family keeps the parts the analyses need.

Everything else in the engine is written once against this table. Module paths are
dotted paths from the Hugging Face ``*ForCausalLM`` model (module names as in transformers 5).

What differs between families, beyond the names:

- post-norms (Gemma 2/3, OLMo-2): the attention and MLP outputs go through a norm of their own
  (``attn_post_norm``, ``mlp_post_norm``) before they are added to the residual stream. Phi-3's
  and Llama's ``post_attention_layernorm`` is the MLP's *input* norm, not one of these;
- Gemma's RMSNorm multiplies by ``1 + weight`` (``norm_gain_offset`` 1.0), others by ``weight``;
- Gemma 2 soft-caps its final logits, ``cap·tanh(z/cap)``, with ``cap`` read from the config
  attribute ``logit_softcap`` names (the unembedding applies it; see explorer.core.unembed);
- Gemma's embeddings are scaled by √d_model inside its embedding module, so ``resid_in`` (the
  embedding module's output) is already the residual stream entering block 0;
- attention soft-capping, sliding windows and q/k norms happen inside the attention module:
  they change no path here (patterns are read from the attention module's own weights);
- Phi-3's fused ``qkv_proj`` and ``gate_up_proj``: heads are still read at the input of
  ``o_proj`` and neurons at the input of ``down_proj``.
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
    attn_post_norm: str | None = None  # norm of the attention output before the residual add
    mlp_post_norm: str | None = None   # norm of the MLP output before the residual add
    norm_gain_offset: float = 0.0      # RMSNorms scale by (offset + weight): Gemma 1.0
    logit_softcap: str | None = None   # config attribute of the final-logit soft-cap (None: no cap)

    def block_paths(self) -> tuple[str, ...]:
        """Every path relative to a block that this adapter names."""
        optional = (self.attn_post_norm, self.mlp_post_norm)
        return (self.attn, self.attn_out, self.mlp, self.mlp_out) + tuple(p for p in optional if p)


_LLAMA = dict(
    blocks="model.layers", embed="model.embed_tokens", resid_in="model.embed_tokens",
    final_norm="model.norm", unembed="lm_head", attn="self_attn",
    attn_out="self_attn.o_proj", mlp="mlp", mlp_out="mlp.down_proj",
)

_POST_NORMS = dict(attn_post_norm="post_attention_layernorm", mlp_post_norm="post_feedforward_layernorm")
_GEMMA = dict(_LLAMA, **_POST_NORMS, norm_gain_offset=1.0, logit_softcap="final_logit_softcapping")

ADAPTERS: dict[str, Adapter] = {
    # Llama layout: SmolLM2, Llama, Mistral (sliding window), Qwen2, Qwen3 (q/k norms), Phi-3
    # (fused projections, same names for o_proj and down_proj).
    "llama": Adapter(family="llama", **_LLAMA),
    "mistral": Adapter(family="mistral", **_LLAMA),
    "qwen2": Adapter(family="qwen2", **_LLAMA),
    "qwen3": Adapter(family="qwen3", **_LLAMA),
    "phi3": Adapter(family="phi3", **_LLAMA),
    # Post-norm layouts: Gemma 2 and Gemma 3 (text), OLMo-2 (no pre-norms, q/k norms).
    "gemma2": Adapter(family="gemma2", **_GEMMA),
    "gemma3_text": Adapter(family="gemma3_text", **_GEMMA),
    "olmo2": Adapter(family="olmo2", **_LLAMA, **_POST_NORMS),
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


# Model types close to a supported one that still need their own adapter, and why.
_HINTS = {
    "gemma3": "a multimodal Gemma 3 checkpoint (Gemma3ForConditionalGeneration); its text-only "
              "variants (model type 'gemma3_text', e.g. gemma-3-1b) are supported",
    "gemma": "Gemma 1 (no post-norms); Gemma 2 and Gemma 3 text are supported",
}


def adapter_for(model_type: str) -> Adapter:
    """The adapter for a config's ``model_type``, or a clear error naming what is supported."""
    try:
        return ADAPTERS[model_type]
    except KeyError:
        supported = ", ".join(sorted(ADAPTERS))
        hint = f": {_HINTS[model_type]}" if model_type in _HINTS else ""
        raise UnsupportedModelError(
            f"no architecture adapter for model type '{model_type}'{hint} (supported: {supported}); "
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
        for path in adapter.block_paths():
            try:
                block.get_submodule(path)
            except AttributeError:
                missing.append(f"{adapter.blocks}.0.{path}")
    if missing:
        raise UnsupportedModelError(
            f"model does not match the '{adapter.family}' adapter: missing {', '.join(missing)}"
        )
