"""Remote models: every trace runs on an NDIF server; no weights are loaded here.

``ModelSession.load(model, remote=True)`` builds the model's skeleton on the ``meta`` device
(nnsight's undispatched ``TransformersModel``) and its tokenizer, and the session's ``trace``
passes ``remote=`` to nnsight: the server runs the block and returns only what it saved.
``remote="local"`` serialises each trace exactly as for a server and runs the deserialised block
here (nnsight's local simulation, with this project's modules hidden as on a server): the tests
run every remote path that way.

What runs where:

- the lens, attention patterns, head scores and DLA, one ablation, sweeps and activation
  patching are traces (sweeps and patching send many edited runs per request, one invoke each,
  see ``explorer.interventions.edits.REMOTE_BATCH``);
- the readout (the final norm and W_U, plus each layer's small attention post-norm and output
  bias) is fetched once at load, by one trace, so the lens reduces its rows here as it does for
  a local model (vocabulary × d_model values: 28 MB for the default model, 1-2 GB for a
  128k-vocabulary 8-70B model in bfloat16);
- work that runs plain forward passes with torch hooks, gradients or training (the neuron index,
  SAE training, the swap arms, generation, probes, the attribution sweep, ...) is refused with
  one line naming it: the meta model's forward raises ``RemoteUnsupportedError`` whatever asked.
"""
from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING, Any

import nnsight
import torch

from explorer.core.errors import ExplorerError, ModelNotFoundError, UnsupportedModelError

if TYPE_CHECKING:
    from explorer.core.session import ModelSession

LOCAL_HOST = "local"


class RemoteUnsupportedError(ExplorerError):
    """Work that needs the model's weights here, asked of a remote (NDIF) model."""

    def __init__(self, what: str) -> None:
        super().__init__(f"{what} cannot run on a remote (NDIF) model: it runs the model here; "
                         "load the model without --remote for it")


class RemoteServerError(ExplorerError):
    """The NDIF server could not be reached or did not run the model."""


def remote_target(remote: bool | str, ndif_host: str | None = None) -> bool | str:
    """What nnsight's ``trace(remote=...)`` gets: "local", a server URL, or True (``NDIF_HOST``
    or nnsight's configured server).

    >>> remote_target("local"), remote_target(True, "http://127.0.0.1:5001"), remote_target(True)
    ('local', 'http://127.0.0.1:5001', True)
    """
    if remote == LOCAL_HOST:
        return LOCAL_HOST
    if remote is not True:
        raise UnsupportedModelError(f"remote must be True or 'local', got {remote!r}")
    host = ndif_host or os.environ.get("NDIF_HOST")
    if host:
        if not host.startswith(("http://", "https://")):
            raise UnsupportedModelError(f"the NDIF host must be a URL (http://... or https://...), got {host!r}")
        return host.rstrip("/")
    return True


def server_url(session: ModelSession) -> str:
    """The NDIF server a remote session's traces go to."""
    if isinstance(session.remote, str) and session.remote != LOCAL_HOST:
        return session.remote
    from nnsight import CONFIG

    return CONFIG.API.HOST


def remote_label(session: ModelSession) -> str:
    """How ``info`` shows where a remote session's model runs."""
    if session.remote == LOCAL_HOST:
        return "remote (serialised, run locally)"
    return f"remote (NDIF at {server_url(session)})"


def _model_key(model: str | None, name: str, path: str) -> str:
    """The id the server knows the model by: a hub id as given, else the local directory (a
    self-hosted server that serves the same directory; nnsight's id lookup is seeded with it
    so it never asks the hub)."""
    if model not in (None, "default") and name == model and "/" in model and not os.path.isdir(model):
        return model
    from nnsight.modeling import huggingface

    huggingface._ID_CACHE.setdefault(path, path)
    return path


def load_remote(cls: type[ModelSession], model: str | None, *, remote: bool | str, ndif_host: str | None,
                dtype: str | torch.dtype, trust_remote_code: bool) -> ModelSession:
    """A session on a remote model (see the module docstring): skeleton, tokenizer, readout."""
    from nnsight.modeling.transformers import TransformersModel
    from transformers import AutoConfig, AutoTokenizer

    from explorer.core.adapters import adapter_for
    from explorer.core.session import pick_dtype, resolve_model

    target = remote_target(remote, ndif_host)
    name, path = resolve_model(model)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise UnsupportedModelError(f"cannot read the config of '{name}': {str(e).splitlines()[0]}") from None
    adapter_for(getattr(config, "model_type", "?"))
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ModelNotFoundError(f"'{name}' has no usable tokenizer: {str(e).splitlines()[0]}") from None
    key = _model_key(model, name, path)
    if target != LOCAL_HOST:
        from nnsight import CONFIG

        CONFIG.APP.REMOTE_LOGGING = False  # nnsight's job status lines would go to stdout (--json)
    kwargs: dict[str, Any] = {"dtype": pick_dtype(dtype, "cpu")}
    if trust_remote_code:
        kwargs["trust_remote_code"] = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm = TransformersModel(key, tokenizer=tok, task="text-generation", dispatch=False, **kwargs)
    meta = lm._module
    if target == LOCAL_HOST:
        lm.dispatch()  # the simulated server's copy, loaded now (nnsight would on the first trace)
    else:
        # A trace without ``remote=`` would make nnsight load the weights here: refuse instead.
        object.__setattr__(lm, "dispatch", _refuse_dispatch)
    session = cls(meta, tok, name=name, path=path, remote=target, lm=lm)
    guard_meta_forward(meta)
    try:
        fetch_readout(session)
    except Exception as e:  # unreachable server, model not served, refused key, ...
        where = "the local simulation" if target == LOCAL_HOST else f"the NDIF server at {server_url(session)}"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise RemoteServerError(f"{where} could not run '{name}' ({type(e).__name__}: {first})") from None
    return session


def _refuse_dispatch() -> None:
    raise RemoteUnsupportedError("this analysis (a trace run here, which would load the weights here)")


def guard_meta_forward(meta: torch.nn.Module) -> None:
    """Make a plain forward of the skeleton (torch hooks, ``session.hf(...)``) fail with one line."""
    def refuse(module, args, kwargs):
        raise RemoteUnsupportedError("this analysis (a plain forward pass with torch hooks)")

    meta.register_forward_pre_hook(refuse, with_kwargs=True)


def readout_modules(session: ModelSession) -> list[str]:
    """Dotted paths of the small modules whose parameters a remote session holds here: the final
    norm and unembedding (for the lens and logits), and per layer the attention post-norm and the
    attention output projection's bias where the family has them (for DLA)."""
    a = session.adapter
    paths = [a.final_norm, a.unembed]
    for layer in range(session.n_layers):
        if a.attn_post_norm:
            paths.append(f"{a.blocks}.{layer}.{a.attn_post_norm}")
    return paths


def fetch_readout(session: ModelSession) -> None:
    """One trace fetches the readout's parameters and puts them in the skeleton's modules."""
    from explorer.core.modules import submodule

    wanted: list[tuple[torch.nn.Module, str, Any]] = []
    for path in readout_modules(session):
        module = session.hf.get_submodule(path)
        for pname, _ in module.named_parameters(recurse=False):
            wanted.append((module, pname, submodule(session.lm, path)))
    a = session.adapter
    for layer in range(session.n_layers):
        proj = session.hf.get_submodule(f"{a.blocks}.{layer}.{a.attn_out}")
        if getattr(proj, "bias", None) is not None:
            wanted.append((proj, "bias", submodule(session.lm, f"{a.blocks}.{layer}.{a.attn_out}")))
    envoys = [env for _, _, env in wanted]
    names = [pname for _, pname, _ in wanted]
    got: list = []
    ids = torch.tensor([[session.tokenizer.bos_token_id or 0]])
    with torch.no_grad(), session.lock:
        with session.trace(ids, logits_to_keep=1):
            nnsight.save(got)
            for env, pname in zip(envoys, names):
                got.append(getattr(env, pname).save())
    # Tied weights (W_U is often the embedding matrix) stay one parameter: every owner gets it.
    owners: dict[int, list[tuple[torch.nn.Module, str]]] = {}
    for module in session.hf.modules():
        for pname, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), []).append((module, pname))
    for (module, pname, _), value in zip(wanted, got):
        param = torch.nn.Parameter(value.detach().to("cpu"), requires_grad=False)
        for owner, oname in owners[id(getattr(module, pname))]:
            setattr(owner, oname, param)
