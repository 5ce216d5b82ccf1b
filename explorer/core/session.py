"""The model session: one attached causal LM, its tokenizer, its adapter, and one lock.

Every analysis takes a ``ModelSession``. The model runs one job at a time, whoever asks
(app sessions, notebook, CLI): analyses hold ``session.lock`` while they use the model.
"""
from __future__ import annotations

import hashlib
import json
import threading
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from explorer.core.adapters import Adapter, adapter_for, check_modules
from explorer.core.errors import (
    EmptyPromptError,
    ModelNotFoundError,
    PromptTooLongError,
    TokenError,
    UnsupportedModelError,
)
from explorer.core.modules import submodule
from explorer.core.placement import PlacementError, check_device_map, execution_device, parse_max_memory
from explorer.core.results import Result
from explorer.core.unembed import Unembedding

Remote = bool | str  # False (weights here), True (an NDIF server) or "local" (serialised, run here)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Decoded vocabularies, by (tokenizer id, its length, vocabulary rows): decoding 50-250k tokens
# one by one takes ~0.5 s, paid once per tokenizer (e.g. by sessions built on one tokenizer in a
# notebook or the tests). A weak reference tells a reused id apart.
_VOCAB_STRINGS: dict[tuple[int, int, int], tuple[weakref.ref, np.ndarray]] = {}
_VOCAB_LOCK = threading.Lock()


@dataclass(frozen=True)
class ModelInfo(Result):
    """What the sidebar and ``info`` show about the attached model."""

    name: str
    path: str
    architecture: str
    family: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    d_mlp: int
    vocab_size: int
    context_length: int
    n_params: int
    device: str
    dtype: str
    config_hash: str


def pick_device(device: str = "auto") -> str:
    """Resolve ``auto`` to cuda, then mps, then cpu; check an explicit choice is available."""
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UnsupportedModelError("--device cuda was asked for but no CUDA GPU is available")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UnsupportedModelError("--device mps was asked for but MPS is not available")
    if device not in ("cpu", "cuda", "mps") and not device.startswith("cuda:"):
        raise UnsupportedModelError(f"unknown device '{device}' (use auto, cpu, cuda or mps)")
    return device


def pick_dtype(dtype: str | torch.dtype, device: str) -> torch.dtype:
    """``auto`` is float32 on CPU (exact) and bfloat16 on accelerators (fast, half the memory);
    a name in DTYPES or one of those torch dtypes picks it."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if dtype == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    try:
        return DTYPES[dtype]
    except KeyError:
        raise UnsupportedModelError(f"unknown dtype '{dtype}' (use float32, bfloat16 or float16)") from None


def fast_bfloat16(device: str | torch.device) -> bool:
    """Whether bfloat16 matmuls beat float32 on this device.

    GPUs, and CPUs with bfloat16 matrix units (AMX, AVX512-BF16). Elsewhere CPU bfloat16 is
    emulated: on an AVX2 EPYC the bfloat16 lens measured 6x slower than float32.
    """
    kind = torch.device(device).type
    if kind in ("cuda", "mps"):
        return True
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_model(model: str | None) -> tuple[str, str]:
    """Return (name, local directory) for a model argument: None (default), a directory, or a cached hub id."""
    if model is None or model == "default":
        from explorer.core.defaults import DEFAULT_MODEL_NAME, ensure_default_model

        return DEFAULT_MODEL_NAME, str(ensure_default_model())
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelNotFoundError(f"'{model}' is a directory but has no config.json: not a Hugging Face model")
        return path.resolve().name, str(path.resolve())
    if path.exists():
        raise ModelNotFoundError(f"'{model}' is a file; pass the model's directory (with config.json)")
    if "/" in model and not model.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download

            local = snapshot_download(model, local_files_only=True)
            return model, local
        except Exception:
            pass
    raise ModelNotFoundError(
        f"model '{model}' not found: pass a local model directory or a hub id already in the local cache"
    )


def read_config(model: str | None) -> dict:
    """A model's ``config.json`` as a dict, without loading its weights (or transformers)."""
    name, path = resolve_model(model)
    try:
        data = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UnsupportedModelError(f"cannot read the config of '{name}': {e}") from None
    if not isinstance(data, dict):
        raise UnsupportedModelError(f"the config.json of '{name}' is not a JSON object")
    return data


def _config_hash(config) -> str:
    text = json.dumps(config.to_dict(), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class ModelSession:
    """A causal LM attached through nnsight, with the adapter, tokenizer, lock and result cache."""

    def __init__(self, model, tokenizer, *, name: str, path: str = "", cache_size: int = 64,
                 remote: Remote = False, lm=None) -> None:
        """``remote`` (with ``lm``, the undispatched nnsight model whose meta skeleton ``model``
        is): traces run on an NDIF server (True) or serialised as for one and run here ("local");
        see ``explorer.core.remote``. ``ModelSession.load(..., remote=...)`` builds these."""
        from nnsight.modeling.transformers import TransformersModel

        model_type = getattr(model.config, "model_type", "?")
        self.adapter: Adapter = adapter_for(model_type)
        check_modules(self.adapter, model)
        model.eval()
        model.config.use_cache = False  # analysis never needs the KV cache; it costs memory
        for p in model.parameters():
            p.requires_grad_(False)
        self.hf = model
        self.tokenizer = tokenizer
        self.name = name
        self.path = path
        self.remote: Remote = remote
        if lm is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # nnsight's own chatter on wrap is not the user's concern
                lm = TransformersModel(model, tokenizer=tokenizer)
        self.lm = lm
        self.lock = threading.RLock()
        self._cache: OrderedDict[Hashable, Any] = OrderedDict()
        self._cache_size = cache_size
        self._cache_lock = threading.Lock()
        self._vocab_strings: np.ndarray | None = None
        # Residual stream → logits, in one place (see explorer.core.unembed).
        self.unembedding = Unembedding.of(model, self.adapter, lock=self.lock)

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(
        cls,
        model: str | None = None,
        *,
        device: str = "auto",
        dtype: str | torch.dtype = "auto",
        trust_remote_code: bool = False,
        device_map: str | dict | None = None,
        max_memory: str | dict | None = None,
        offload_dir: str | Path | None = None,
        remote: Remote = False,
        ndif_host: str | None = None,
    ) -> ModelSession:
        """Attach a model: None (the embedded default), a local directory, or a cached hub id.

        ``device_map`` ("auto", "balanced", "sequential", or an explicit {module: device} map)
        shards a model too big for one device with accelerate: blocks go to the GPUs, then the
        CPU, then ``offload_dir`` on disk, within ``max_memory`` ("cuda:0=20GiB,cpu=60GiB" or
        accelerate's dict). ``device`` then only picks the ``auto`` dtype.

        ``remote=True`` loads no weights: the model's skeleton and tokenizer only, and every trace
        runs on an NDIF server (``ndif_host``, else ``NDIF_HOST``; key from ``NDIF_API_KEY``).
        ``remote="local"`` serialises each trace exactly as for a server and runs it here (a
        check that an analysis is remote-safe). See ``explorer.core.remote``.
        """
        if remote:
            from explorer.core.remote import load_remote

            return load_remote(cls, model, remote=remote, ndif_host=ndif_host, dtype=dtype,
                               trust_remote_code=trust_remote_code)
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        try:
            check_device_map(device_map)
            if isinstance(max_memory, str):
                max_memory = parse_max_memory(max_memory)
        except PlacementError as e:
            raise UnsupportedModelError(str(e)) from None
        if device_map is None and (max_memory or offload_dir):
            raise UnsupportedModelError("--max-memory and --offload-dir need --device-map (e.g. auto)")
        name, path = resolve_model(model)
        try:
            config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
        except Exception as e:  # malformed config, remote code refused, ...
            raise UnsupportedModelError(f"cannot read the config of '{name}': {str(e).splitlines()[0]}") from None
        adapter_for(getattr(config, "model_type", "?"))  # fail before loading weights
        dev = pick_device(device)
        torch_dtype = pick_dtype(dtype, dev)
        placement: dict[str, Any] = {}
        if device_map is not None:  # sharded by accelerate, so never moved as a whole below
            placement = {"device_map": device_map, "max_memory": max_memory,
                         "offload_folder": None if offload_dir is None else str(offload_dir)}
        try:
            hf = AutoModelForCausalLM.from_pretrained(
                path, dtype=torch_dtype, local_files_only=True, trust_remote_code=trust_remote_code, **placement
            )
        except ValueError as e:
            if device_map is not None and "offload" in str(e):
                raise UnsupportedModelError(
                    f"'{name}' does not fit in the memory allowed (--max-memory): give --offload-dir DIR "
                    "for the rest") from None
            raise UnsupportedModelError(
                f"'{name}' is not a causal language model ({str(e).splitlines()[0]})"
            ) from None
        except OSError as e:
            raise ModelNotFoundError(f"cannot load weights of '{name}': {str(e).splitlines()[0]}") from None
        if device_map is None:
            hf.to(dev)
        elif next(iter(getattr(hf, "hf_device_map", {"": ""}).values())) == "disk":
            raise UnsupportedModelError(  # transformers' own pipeline cannot start from the disk
                f"with this --max-memory even the first module of '{name}' (its embeddings) is offloaded to disk: "
                "allow more memory on a GPU or the CPU")
        try:
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
        except Exception as e:
            raise ModelNotFoundError(f"'{name}' has no usable tokenizer: {str(e).splitlines()[0]}") from None
        return cls(hf, tok, name=name, path=path)

    # ------------------------------------------------------------------ tracing
    def trace(self, *args, **kwargs):
        """``self.lm.trace``, run where the session's model lives (remotely for a remote session).

        Inside the block reference envoys, tensors and plain values only, never the session (a
        remote trace ships the block's variables to the server; the session holds locks)."""
        if self.remote:
            return self.lm.trace(*args, remote=self.remote, **kwargs)
        return self.lm.trace(*args, **kwargs)

    def require_local(self, what: str) -> None:
        """Refuse work that needs the weights here when the model is remote (one clear line)."""
        if self.remote:
            from explorer.core.remote import RemoteUnsupportedError

            raise RemoteUnsupportedError(what)

    @property
    def traced_model(self) -> torch.nn.Module:
        """The torch model the traces run (for a remote="local" session the local copy nnsight
        loaded, not the meta skeleton ``hf``; for a remote one the skeleton)."""
        return self.lm._module if self.remote else self.hf

    # --------------------------------------------------------------------- info
    @property
    def device(self) -> torch.device:
        """Where inputs go: the embedding's device (its execution device when sharded or offloaded;
        every other module moves what it gets to its own, see ``explorer.core.placement``).
        A remote session's inputs and results are on the CPU."""
        if self.remote:
            return torch.device("cpu")
        return execution_device(self.hf.get_submodule(self.adapter.embed))

    @property
    def device_map(self) -> dict[str, str] | None:
        """accelerate's module → device map when the model is sharded or offloaded, else None."""
        placed = getattr(self.hf, "hf_device_map", None)
        if not placed or len(set(placed.values())) < 2:
            return None
        return {k: f"cuda:{v}" if isinstance(v, int) else str(v) for k, v in placed.items()}  # GPUs: ints

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf.parameters()).dtype

    @property
    def n_layers(self) -> int:
        return len(self.hf_blocks())

    @property
    def context_length(self) -> int:
        cfg = self.hf.config
        for key in ("max_position_embeddings", "n_positions", "n_ctx"):
            value = getattr(cfg, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return 2048

    def info(self) -> ModelInfo:
        cfg = self.hf.config
        n_heads = cfg.num_attention_heads
        d_model = cfg.hidden_size
        d_head = getattr(cfg, "head_dim", None) or d_model // n_heads
        d_mlp = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * d_model
        return ModelInfo(
            name=self.name,
            path=self.path,
            architecture=(cfg.architectures or [type(self.hf).__name__])[0],
            family=self.adapter.family,
            n_layers=self.n_layers,
            n_heads=n_heads,
            n_kv_heads=getattr(cfg, "num_key_value_heads", None) or n_heads,
            d_model=d_model,
            d_head=d_head,
            d_mlp=d_mlp,
            vocab_size=self.unembed_weight().shape[0],
            context_length=self.context_length,
            n_params=sum(p.numel() for p in self.hf.parameters()),
            device=self._device_text(),
            dtype=str(self.dtype).removeprefix("torch."),
            config_hash=_config_hash(cfg),
        )

    def _device_text(self) -> str:
        if self.remote:
            from explorer.core.remote import remote_label

            return remote_label(self)
        placed = self.device_map
        if placed is None:
            return str(self.device)
        counts: dict[str, int] = {}
        for dev in placed.values():
            counts[dev] = counts.get(dev, 0) + 1
        return "sharded: " + ", ".join(f"{dev} ({n} modules)" for dev, n in counts.items())

    # ------------------------------------------------------------------ modules
    def module(self, path: str):
        """The nnsight envoy at a dotted path (for use inside a trace)."""
        return submodule(self.lm, path)

    def blocks(self):
        return self.module(self.adapter.blocks)

    def hf_blocks(self) -> torch.nn.ModuleList:
        """The blocks as the model's own torch modules (for plain hooks and calls, outside a trace)."""
        return self.hf.get_submodule(self.adapter.blocks)

    def logits(self, hidden: torch.Tensor, **kwargs) -> torch.Tensor:
        """Float32 logits of residual-stream vectors (final norm, W_U, bias): see
        ``Unembedding.logits`` for ``tokens``, ``dtype``, ``out`` and ``normed``."""
        return self.unembedding.logits(hidden, **kwargs)

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's final norm of residual-stream vectors (outside a trace)."""
        return self.unembedding.norm(hidden)

    def unembed_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The unembedding matrix [vocab, d_model], optionally cast once and kept (e.g. bfloat16)."""
        return self.unembedding.weight(dtype)

    def unembed_bias(self) -> torch.Tensor | None:
        return self.unembedding.bias()

    # ---------------------------------------------------------------- tokenising
    def encode(self, prompt: str) -> torch.Tensor:
        """Token ids [T] of a prompt, checked: not empty, within the model's context."""
        if prompt is None or not prompt.strip():
            raise EmptyPromptError()
        ids = self.tokenizer(prompt, return_tensors="pt").input_ids[0]
        if ids.numel() == 0:
            raise EmptyPromptError()
        if ids.numel() > self.context_length:
            raise PromptTooLongError(ids.numel(), self.context_length)
        return ids

    def vocab_strings(self) -> np.ndarray:
        """Every token id decoded on its own, as a read-only numpy string array (built once per
        tokenizer and vocabulary size: sessions sharing a tokenizer share it)."""
        if self._vocab_strings is None:
            n = self.unembed_weight().shape[0]
            key = (id(self.tokenizer), len(self.tokenizer), n)
            with _VOCAB_LOCK:
                cached = _VOCAB_STRINGS.get(key)
            if cached is None or cached[0]() is not self.tokenizer:
                size = min(n, len(self.tokenizer))
                texts = self.tokenizer.batch_decode([[i] for i in range(size)])
                texts += [f"<id {i}>" for i in range(size, n)]  # padded vocab rows no token maps to
                strings = np.array(texts, dtype=str)
                strings.flags.writeable = False
                with _VOCAB_LOCK:
                    _VOCAB_STRINGS[key] = (weakref.ref(self.tokenizer), strings)
                    for k in [k for k, (ref, _) in _VOCAB_STRINGS.items() if ref() is None]:
                        del _VOCAB_STRINGS[k]  # tokenizers gone: their id may be reused
                cached = _VOCAB_STRINGS[key]
            self._vocab_strings = cached[1]
        return self._vocab_strings

    def decode_each(self, ids) -> np.ndarray:
        """Decode token ids one by one (same shape as ``ids``)."""
        return self.vocab_strings()[np.asarray(ids)]

    def token_id(self, token: str) -> int:
        """Resolve a target token given as text (e.g. ' Paris') or as '#1234' to its id."""
        if token is None or token == "":
            raise TokenError("the target token is empty: type a token such as ' Paris'")
        if token.startswith("#") and token[1:].isdigit():
            tid = int(token[1:])
            if tid >= len(self.vocab_strings()):
                raise TokenError(f"token id {tid} is outside the vocabulary")
            return tid
        ids = self.tokenizer(token, add_special_tokens=False).input_ids
        if len(ids) == 1:
            return ids[0]
        hits = np.flatnonzero(self.vocab_strings() == token)
        if len(hits):
            return int(hits[0])
        pieces = " + ".join(repr(str(t)) for t in self.decode_each(ids))
        raise TokenError(
            f"target {token!r} is {len(ids)} tokens ({pieces}); pick a single token, e.g. {pieces.split(' + ')[0]}"
        )

    # -------------------------------------------------------------------- cache
    def cached(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        """Return a cached result for ``key`` or compute and keep it (LRU)."""
        with self._cache_lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        value = compute()
        with self._cache_lock:
            self._cache[key] = value
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return value

    def peek(self, key: Hashable) -> Any:
        """The cached value for ``key``, or None, without computing anything."""
        with self._cache_lock:
            return self._cache.get(key)

    def put(self, key: Hashable, value: Any) -> Any:
        """Cache a value computed elsewhere (e.g. a by-product of another analysis)."""
        return self.cached(key, lambda: value)

    def clear_cache(self) -> None:
        with self._cache_lock:
            self._cache.clear()
