"""Argument checks that run before any model loads (a model takes seconds; a typo should not).

The ``argparse`` types here reject a bad value while the command line is parsed, with a message
that says what to write instead; ``check_components`` and ``check_head`` compare layer, head and
neuron numbers with the sizes in the model's ``config.json``, read without loading weights.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from explorer.core.components import Geometry, check_component, geometry_from_config, parse_components
from explorer.core.errors import ExplorerError
from explorer.core.placement import PlacementError, check_device_map, parse_max_memory


def _number(kind: Callable, low, what: str) -> Callable[[str], object]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its own messages
    return parse


positive_int = _number(int, 1, "at least 1")
non_negative_int = _number(int, 0, "0 or more")
non_negative_float = _number(float, 0.0, "0 or more")


def positive_float(text: str) -> float:
    value = non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def int_between(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = _number(int, low, f"between {low} and {high}")(text)
        if value > high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high}, got {text}")
        return value

    parse.__name__ = "int"
    return parse


def text(value: str) -> str:
    """A prompt (or query): anything but empty or blank."""
    if not value.strip():
        raise argparse.ArgumentTypeError("the prompt is empty: type some text")
    return value


def token(value: str) -> str:
    """A token as text (kept as given: the leading space of ' Paris' matters) or '#1234'."""
    if value == "":
        raise argparse.ArgumentTypeError("is empty: give a token such as ' Paris' or '#1234'")
    return value


def existing(what: str, kind: str = "any") -> Callable[[str], str]:
    """A path that must exist: ``kind`` "file", "dir" or "any"; ``what`` names it in the message."""
    def parse(value: str) -> str:
        path = Path(value).expanduser()
        if not path.exists():
            raise argparse.ArgumentTypeError(f"{what} not found: {value}")
        if kind == "file" and not path.is_file():
            raise argparse.ArgumentTypeError(f"{value} is a directory; give a {what}")
        if kind == "dir" and not path.is_dir():
            raise argparse.ArgumentTypeError(f"{value} is a file; give a {what}")
        return value

    parse.__name__ = "path"
    return parse


def component_specs(value: str) -> str:
    """Component specs (L.H, L:N, attn:L, mlp:L, block:L), checked for their syntax."""
    try:
        parse_components(value)
    except ExplorerError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def feature_specs(value: str) -> str:
    """SAE feature specs ('123, 456=5.0': a number ablates, F=V clamps), checked for their syntax."""
    from explorer.features.edits import parse_features

    try:
        parse_features(value)
    except ExplorerError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def head_spec(value: str) -> tuple[int, int]:
    """A head as LAYER.HEAD (or L3H5): (layer, head)."""
    from explorer.analyses.heads import parse_head

    try:
        return parse_head(value)
    except ExplorerError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def device_map(value: str) -> str:
    """A --device-map strategy (auto, balanced, balanced_low_0, sequential)."""
    try:
        check_device_map(value)
    except PlacementError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def max_memory(value: str) -> dict:
    """--max-memory: DEVICE=SIZE pairs, e.g. cuda:0=20GiB,cpu=60GiB (bytes per device)."""
    try:
        return parse_max_memory(value)
    except PlacementError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def offload_dir(value: str) -> str:
    """An offload folder: a directory, or a path where one can be made (not a file)."""
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{value} is a file; give a folder for the offloaded weights")
    return str(path)


def check_placement(args) -> None:
    """--max-memory and --offload-dir only mean something with --device-map; --ndif-host only
    with --remote, which places nothing here."""
    if getattr(args, "ndif_host", None) and not getattr(args, "remote", None):
        raise ExplorerError("--ndif-host needs --remote")
    if getattr(args, "remote", None) and getattr(args, "device_map", None):
        raise ExplorerError("--remote loads no weights here: --device-map does not apply")
    if getattr(args, "device_map", None) is None:
        given = [f for f, v in (("--max-memory", getattr(args, "max_memory", None)),
                                ("--offload-dir", getattr(args, "offload_dir", None))) if v]
        if given:
            raise ExplorerError(f"{' and '.join(given)} need --device-map (e.g. --device-map auto)")


# ---------------------------------------------------------------- against the model's sizes
def model_geometry(model: str | None) -> Geometry | None:
    """The model's sizes from its config.json (no weights loaded); None when the config does not
    state them (the load then checks against the model itself)."""
    from explorer.core.session import read_config

    return geometry_from_config(read_config(model))


def check_components(model: str | None, specs: list[str]) -> None:
    """Every component exists in the model (layer, head and neuron numbers in range)."""
    geom = model_geometry(model)
    if geom is not None:
        for c in parse_components(specs):
            check_component(c, geom)


def check_head(model: str | None, layer: int, head: int) -> None:
    from explorer.analyses.heads import check_head as check

    geom = model_geometry(model)
    if geom is not None:
        check(layer, head, geom.n_layers, geom.n_heads)
