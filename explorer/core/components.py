"""Model components that ablation and patching act on, parsed from short text specs.

Spec syntax (layers, heads and neurons count from 0)::

    L.H      attention head H of block L          e.g. 3.1
    L:N      MLP neuron N of block L              e.g. 5:1024
    attn:L   block L's whole attention output     e.g. attn:3
    mlp:L    block L's whole MLP output           e.g. mlp:3
    block:L  block L's whole contribution         e.g. block:3 (its output := its input)

Several specs are separated by commas or whitespace. Where each one acts:

- a head at the attention output projection's input slice ``[H*d_head:(H+1)*d_head]``
  (the per-head concatenation, before the projection and its bias);
- a neuron at the MLP down/out projection's input column ``N``;
- ``attn``/``mlp`` at the output of the block's attention / MLP module;
- ``block`` on the block's output, relative to its input (output = input + contribution).

In families that norm the attention and MLP outputs before adding them (Gemma 2/3, OLMo-2),
``attn``/``mlp`` act before that post-norm: a zeroed output stays zero through it (an RMSNorm
of zero is zero), a replaced one is normed as the model would norm it.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from explorer.core.errors import ExplorerError
from explorer.core.modules import in_features

KINDS = ("head", "neuron", "attn", "mlp", "block")
SYNTAX = "use L.H for a head, L:N for a neuron, or attn:L, mlp:L, block:L (e.g. 3.1, 5:1024, mlp:2)"

_HEAD = re.compile(r"^(\d+)\.(\d+)$")
_NEURON = re.compile(r"^(\d+):(\d+)$")
_WHOLE = re.compile(r"^(attn|mlp|block):(\d+)$", re.IGNORECASE)


class ComponentError(ExplorerError):
    """A component spec that does not parse or does not exist in the attached model."""


@dataclass(frozen=True, order=True)
class Component:
    """One ablatable part: ``kind`` in KINDS, its ``layer``, and the head/neuron ``index``."""

    layer: int
    kind: str
    index: int | None = None

    @property
    def spec(self) -> str:
        """The canonical text form (parses back to this component)."""
        if self.kind == "head":
            return f"{self.layer}.{self.index}"
        if self.kind == "neuron":
            return f"{self.layer}:{self.index}"
        return f"{self.kind}:{self.layer}"

    def __str__(self) -> str:
        return self.spec


@dataclass(frozen=True)
class Geometry:
    """The sizes component specs are checked against, read from the model's own modules."""

    n_layers: int
    n_heads: int
    d_head: int
    d_mlp: int
    d_model: int

    @property
    def head_width(self) -> int:
        """Width of the per-head concatenation (the attention output projection's input)."""
        return self.n_heads * self.d_head


def geometry(session) -> Geometry:
    """Layers, heads, head size and MLP width of a session's model."""
    cfg = session.hf.config
    block = session.hf_blocks()[0]
    n_heads = int(cfg.num_attention_heads)
    width = in_features(block.get_submodule(session.adapter.attn_out))
    if width % n_heads:
        raise ComponentError(
            f"the attention output projection takes {width} features, not a multiple of {n_heads} heads")
    return Geometry(
        n_layers=session.n_layers,
        n_heads=n_heads,
        d_head=width // n_heads,
        d_mlp=in_features(block.get_submodule(session.adapter.mlp_out)),
        d_model=int(cfg.hidden_size),
    )


def _first_key(config: dict, *keys: str) -> int | None:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def geometry_from_config(config: dict) -> Geometry | None:
    """The sizes a model's ``config.json`` states (read without loading any weights), or None
    when it does not state them all. Used to check arguments before a model loads; the loaded
    model's own modules (``geometry``) have the last word."""
    n_layers = _first_key(config, "num_hidden_layers", "n_layer", "num_layers")
    n_heads = _first_key(config, "num_attention_heads", "n_head")
    d_model = _first_key(config, "hidden_size", "n_embd", "d_model")
    if None in (n_layers, n_heads, d_model):
        return None
    d_head = _first_key(config, "head_dim") or d_model // n_heads
    d_mlp = _first_key(config, "intermediate_size", "n_inner", "ffn_dim") or 4 * d_model
    return Geometry(n_layers=n_layers, n_heads=n_heads, d_head=d_head, d_mlp=d_mlp, d_model=d_model)


def parse_component(spec: str) -> Component:
    """Parse one spec (see the module docstring); raise ComponentError naming the bad text."""
    text = spec.strip()
    if m := _HEAD.match(text):
        return Component(int(m[1]), "head", int(m[2]))
    if m := _NEURON.match(text):
        return Component(int(m[1]), "neuron", int(m[2]))
    if m := _WHOLE.match(text):
        return Component(int(m[2]), m[1].lower())
    raise ComponentError(f"cannot read component {spec!r}: {SYNTAX}")


def split_specs(specs: str | Iterable[str]) -> list[str]:
    """Split a comma/whitespace separated string (or each string of a list) into single specs."""
    items = [specs] if isinstance(specs, str) else list(specs)
    out: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise ComponentError(f"component specs must be text, got {type(item).__name__}")
        out.extend(p for p in re.split(r"[,\s]+", item) if p)
    return out


def check_component(c: Component, geom: Geometry) -> None:
    """Raise ComponentError if a component does not exist in a model of this geometry."""
    if not 0 <= c.layer < geom.n_layers:
        raise ComponentError(
            f"layer {c.layer} in {c.spec!r} is out of range: the model has {geom.n_layers} layers "
            f"(0-{geom.n_layers - 1})")
    if c.kind == "head" and not 0 <= c.index < geom.n_heads:
        raise ComponentError(
            f"head {c.index} in {c.spec!r} is out of range: each layer has {geom.n_heads} heads "
            f"(0-{geom.n_heads - 1})")
    if c.kind == "neuron" and not 0 <= c.index < geom.d_mlp:
        raise ComponentError(
            f"neuron {c.index} in {c.spec!r} is out of range: each MLP has {geom.d_mlp} neurons "
            f"(0-{geom.d_mlp - 1})")


def parse_components(specs: str | Sequence[str], geom: Geometry | None = None) -> tuple[Component, ...]:
    """Parse specs into components in execution order (layer, then kind), without duplicates.

    With ``geom`` every component is also checked against the model's sizes.
    """
    parts = split_specs(specs)
    if not parts:
        raise ComponentError(f"no components given: {SYNTAX}")
    comps = {parse_component(p) for p in parts}
    if geom is not None:
        for c in sorted(comps, key=sort_key):
            check_component(c, geom)
    return tuple(sorted(comps, key=sort_key))


def sort_key(c: Component) -> tuple[int, int, int]:
    """Execution order: by layer, then heads, neurons... as the block runs them (attn before mlp)."""
    order = {"head": 0, "attn": 1, "neuron": 2, "mlp": 3, "block": 4}[c.kind]
    return (c.layer, order, -1 if c.index is None else c.index)


def components_for(session, specs: str | Sequence[str]) -> tuple[Component, ...]:
    """Parse and check specs against a session's model."""
    return parse_components(specs, geometry(session))
