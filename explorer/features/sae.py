"""A sparse autoencoder (SAE) in plain torch, computed exactly as SAELens defines its architectures.

Weights follow SAELens's names and shapes: ``W_enc`` [d_in, d_sae], ``b_enc`` [d_sae], ``W_dec``
[d_sae, d_in], ``b_dec`` [d_in], and for JumpReLU ``threshold`` [d_sae]. For an input ``x``:

1. **input normalisation** (``normalize_activations``): ``none`` and ``expected_average_only_in``
   leave ``x`` as it is (SAELens folds the latter's constant into the weights when it loads a
   release; at inference it is the identity); ``constant_norm_rescale`` scales each vector to
   norm √d_in; ``layer_norm`` subtracts the mean and divides by (unbiased std + 1e-5);
2. **b_dec subtraction**: ``x − b_dec`` when ``apply_b_dec_to_input`` (the default), else ``x``;
3. **pre-activations** ``h = x' @ W_enc + b_enc``;
4. **activation**: ``standard`` ReLU(h); ``topk`` the ``k`` largest entries of ``h`` per vector
   through a ReLU, every other entry 0; ``jumprelu`` ReLU(h) where h > threshold, else 0;
5. **decoding** ``f @ W_dec + b_dec``, then the normalisation undone (``constant_norm_rescale``
   and ``layer_norm`` need the input's statistics: ``decode(f, x=...)``).

A **transcoder** (``d_out`` set) reads one site and writes another: here an MLP's input (after
its norm) to that MLP's output. ``W_dec`` is [d_sae, d_out] and ``b_dec`` [d_out], so b_dec is
never subtracted from the input, and only the input normalisations that need no undoing apply
(SAELens's ``transcoder``, ``jumprelu_transcoder``; ``topk_transcoder`` is this app's name for a
TopK one, which SAELens 6 has no class for). ``metadata['hook_name']`` names its input
(``blocks.L.ln2.hook_normalized``), ``metadata['hook_name_out']`` its output (``blocks.L.hook_mlp_out``).

>>> import torch
>>> sae = SparseAutoencoder.init(SAEConfig(d_in=4, d_sae=8, architecture="topk", k=2), seed=0)
>>> f = sae.encode(torch.randn(3, 4))
>>> f.shape, int((f > 0).sum(-1).max()) <= 2
(torch.Size([3, 8]), True)
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from explorer.core.errors import ExplorerError

ARCHITECTURES = ("standard", "topk", "jumprelu")
NORMALIZATIONS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")
SITES = ("resid", "mlp_out")
TRANSCODER = "transcoder"     # a training "site": MLP input (post-norm) -> MLP output
MLP_IN = "mlp_in"             # where a transcoder reads: the MLP module's input
# TransformerLens hook names (what SAELens configs name) for our sites.
_HOOKS = {"resid": "hook_resid_post", "mlp_out": "hook_mlp_out", MLP_IN: "ln2.hook_normalized"}
_HOOK_RE = re.compile(r"^blocks\.(\d+)\.(hook_resid_post|hook_resid_pre|hook_mlp_out|ln2\.hook_normalized|"
                      r"mlp\.hook_in)$")


class SAEError(ExplorerError):
    """An SAE that is malformed, of an unsupported architecture, or does not fit the model."""


def hook_name(layer: int, site: str) -> str:
    """The TransformerLens/SAELens hook name of a site: ``blocks.12.hook_resid_post``."""
    if site not in _HOOKS:
        raise SAEError(f"unknown site {site!r} (use {', '.join(_HOOKS)})")
    return f"blocks.{layer}.{_HOOKS[site]}"


def parse_hook_name(name: str) -> tuple[int, str]:
    """(layer, site) of a SAELens hook name; ``hook_resid_pre`` of block L is the residual output
    of block L − 1. Other hooks (attention ``hook_z``, embeddings) are not supported here.

    >>> parse_hook_name("blocks.12.hook_resid_post"), parse_hook_name("blocks.3.hook_resid_pre")
    ((12, 'resid'), (2, 'resid'))
    >>> parse_hook_name("blocks.4.ln2.hook_normalized")
    (4, 'mlp_in')
    """
    m = _HOOK_RE.match(name or "")
    if not m:
        raise SAEError(f"unsupported SAE hook {name!r}: this app reads SAEs on a block's residual output "
                       "(blocks.L.hook_resid_post, or hook_resid_pre of L ≥ 1) or MLP output (blocks.L.hook_mlp_out), "
                       "and transcoders on an MLP's input (blocks.L.ln2.hook_normalized or blocks.L.mlp.hook_in)")
    layer, hook = int(m.group(1)), m.group(2)
    if hook == "hook_resid_pre":
        if layer == 0:
            raise SAEError("blocks.0.hook_resid_pre is the embedding output, which this app does not read SAEs on")
        return layer - 1, "resid"
    if hook in ("ln2.hook_normalized", "mlp.hook_in"):
        return layer, MLP_IN
    return layer, "resid" if hook == "hook_resid_post" else "mlp_out"


@dataclass(frozen=True)
class SAEConfig:
    """What defines an SAE's computation (see the module docstring), and where it reads.

    ``metadata`` holds SAELens's metadata (``model_name``, ``hook_name``, ...) and ours.
    ``d_out`` is set for a transcoder only (the width it writes).
    """

    d_in: int
    d_sae: int
    architecture: str = "topk"
    k: int | None = None                  # topk only
    apply_b_dec_to_input: bool = True
    normalize_activations: str = "none"
    metadata: dict[str, Any] = field(default_factory=dict, compare=False)
    d_out: int | None = None              # transcoders only

    @property
    def is_transcoder(self) -> bool:
        return self.d_out is not None

    @property
    def out_dim(self) -> int:
        """The width of the reconstruction: ``d_out`` for a transcoder, else ``d_in``."""
        return self.d_out if self.d_out is not None else self.d_in

    def check(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise SAEError(f"unsupported SAE architecture {self.architecture!r} (supported: "
                           f"{', '.join(ARCHITECTURES)})")
        if self.normalize_activations not in NORMALIZATIONS:
            raise SAEError(f"unsupported normalize_activations {self.normalize_activations!r} "
                           f"(supported: {', '.join(NORMALIZATIONS)})")
        if self.d_in < 1 or self.d_sae < 1:
            raise SAEError(f"d_in and d_sae must be ≥ 1, got {self.d_in} and {self.d_sae}")
        if self.architecture == "topk" and not (self.k and 1 <= self.k <= self.d_sae):
            raise SAEError(f"a topk SAE needs 1 ≤ k ≤ d_sae ({self.d_sae}), got k={self.k}")
        if self.is_transcoder:
            if self.d_out < 1:
                raise SAEError(f"a transcoder's d_out must be ≥ 1, got {self.d_out}")
            if self.apply_b_dec_to_input:
                raise SAEError("a transcoder cannot subtract b_dec from its input (b_dec is on the output side)")
            if self.normalize_activations not in ("none", "expected_average_only_in"):
                raise SAEError(f"a transcoder cannot undo normalize_activations={self.normalize_activations!r} "
                               "on another site")

    @property
    def site(self) -> tuple[int, str] | None:
        """(layer, site) from ``metadata['hook_name']``, or None when it names no hook."""
        name = self.metadata.get("hook_name")
        return parse_hook_name(name) if name else None

    @property
    def site_out(self) -> tuple[int, str] | None:
        """Where the reconstruction belongs: a transcoder's ``metadata['hook_name_out']``, else ``site``."""
        if not self.is_transcoder:
            return self.site
        name = self.metadata.get("hook_name_out")
        return parse_hook_name(name) if name else None


class SparseAutoencoder(torch.nn.Module):
    """An SAE's weights and its encode/decode (see the module docstring)."""

    def __init__(self, cfg: SAEConfig, weights: dict[str, torch.Tensor]) -> None:
        super().__init__()
        cfg.check()
        self.cfg = cfg
        shapes = {"W_enc": (cfg.d_in, cfg.d_sae), "b_enc": (cfg.d_sae,), "W_dec": (cfg.d_sae, cfg.out_dim),
                  "b_dec": (cfg.out_dim,)}
        if cfg.architecture == "jumprelu":
            shapes["threshold"] = (cfg.d_sae,)
        for name, shape in shapes.items():
            if name not in weights:
                raise SAEError(f"the {cfg.architecture} SAE's weights lack {name}")
            w = weights[name]
            if tuple(w.shape) != shape:
                raise SAEError(f"{name} has shape {tuple(w.shape)}, expected {shape} "
                               f"(d_in={cfg.d_in}, d_sae={cfg.d_sae}" + (f", d_out={cfg.d_out})" if cfg.d_out else ")"))
            self.register_parameter(name, torch.nn.Parameter(w.detach().clone().float(), requires_grad=False))

    # ------------------------------------------------------------------ creation
    @classmethod
    def init(cls, cfg: SAEConfig, seed: int = 0, device: str | torch.device = "cpu") -> SparseAutoencoder:
        """A fresh SAE for training: unit-norm random decoder rows, encoder = decoder transposed,
        zero biases (and zero thresholds). A transcoder with d_out ≠ d_in gets its own random
        encoder columns of unit norm."""
        g = torch.Generator().manual_seed(seed)
        w_dec = torch.randn(cfg.d_sae, cfg.out_dim, generator=g)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        if cfg.out_dim == cfg.d_in:
            w_enc = w_dec.t().contiguous()
        else:
            w_enc = torch.randn(cfg.d_in, cfg.d_sae, generator=g)
            w_enc /= w_enc.norm(dim=0, keepdim=True)
        weights = {"W_enc": w_enc, "b_enc": torch.zeros(cfg.d_sae), "W_dec": w_dec,
                   "b_dec": torch.zeros(cfg.out_dim)}
        if cfg.architecture == "jumprelu":
            weights["threshold"] = torch.zeros(cfg.d_sae)
        return cls(cfg, weights).to(device)

    def weights(self) -> dict[str, torch.Tensor]:
        """The weights by their SAELens names (detached)."""
        return {name: p.detach() for name, p in self.named_parameters()}

    def with_config(self, **changes: Any) -> SparseAutoencoder:
        """A copy with some config fields changed (same weights)."""
        return SparseAutoencoder(replace(self.cfg, **changes), {k: v.cpu() for k, v in self.weights().items()}
                                 ).to(self.W_enc.device)

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    # ------------------------------------------------------------------ compute
    def _norm_in(self, x: torch.Tensor) -> torch.Tensor:
        mode = self.cfg.normalize_activations
        if mode == "constant_norm_rescale":
            return x * (self.d_in ** 0.5 / x.norm(dim=-1, keepdim=True))
        if mode == "layer_norm":
            mu = x.mean(dim=-1, keepdim=True)
            xc = x - mu
            return xc / (xc.std(dim=-1, keepdim=True) + 1e-5)
        return x

    def _norm_out(self, y: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor:
        mode = self.cfg.normalize_activations
        if self.cfg.is_transcoder or mode not in ("constant_norm_rescale", "layer_norm"):
            return y
        if x is None:
            raise SAEError(f"decoding an SAE with normalize_activations={mode!r} needs its input (decode(f, x=...))")
        x = x.float()
        if mode == "constant_norm_rescale":
            return y / (self.d_in ** 0.5 / x.norm(dim=-1, keepdim=True))
        mu = x.mean(dim=-1, keepdim=True)
        return y * (x - mu).std(dim=-1, keepdim=True) + mu

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """``h = norm(x) − b_dec·[apply_b_dec_to_input]) @ W_enc + b_enc``, float32, [..., d_sae]."""
        x = self._norm_in(x.float())
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def activate(self, h: torch.Tensor) -> torch.Tensor:
        """The architecture's activation of pre-activations ``h``."""
        arch = self.cfg.architecture
        if arch == "standard":
            return torch.relu(h)
        if arch == "jumprelu":
            return torch.relu(h) * (h > self.threshold).to(h.dtype)
        top = h.topk(self.cfg.k, dim=-1)
        return torch.zeros_like(h).scatter_(-1, top.indices, torch.relu(top.values))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations [..., d_sae] of inputs [..., d_in]."""
        return self.activate(self.pre_activations(x))

    def decode(self, f: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """The reconstruction [..., d_in] of feature activations ``f`` (``x``: the encoded input,
        needed only to undo a per-vector input normalisation)."""
        return self._norm_out(f.float() @ self.W_dec + self.b_dec, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction of ``x`` (encode, then decode), float32 (a transcoder's: its output site's)."""
        return self.decode(self.encode(x), x)
