"""Typed results: frozen dataclasses of numpy arrays and plain values.

Each array field is declared once, with its dimensions and dtype, and everything else is
derived from that declaration: ``from_dict`` restores the dtype, ``validate`` checks the
shapes (a named dimension must have one length across all the fields of a result), and the
snapshot loader relies on both. A tuple field whose length is a dimension of the arrays says
so with ``sized``.

>>> from dataclasses import dataclass
>>> @dataclass(frozen=True, eq=False)
... class Curves(Result, register=False):      # (register=False: an example, not for snapshots)
...     labels: tuple[str, ...] = sized("R")      # one label per row
...     values: np.ndarray = array("R T", "float32")
...     tokens: np.ndarray = array("T", "str")
>>> ok = Curves(("a", "b"), np.zeros((2, 3), np.float32), np.array(["x", "y", "z"]))
>>> ok.validate() is None
True
>>> Curves(("a",), np.zeros((2, 3), np.float32), np.array(["x", "y", "z"])).validate()
'values has shape (2, 3), expected (R=1, T=3)'
>>> Curves.from_dict(ok.to_dict()).values.dtype
dtype('float32')

Dimensions are names (``"R T k"``), literal lengths (``"2 N"``), or ``*`` for any number of
axes of any length. Relations that dimensions cannot state (``counts`` has one more bin than
there are ``edges``) go in a result's ``relations()``.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T", bound="Result")


@dataclass(frozen=True)
class Array:
    """The declaration of an array field: its dimensions and its numpy dtype."""

    dims: tuple[str, ...]
    dtype: str

    def __str__(self) -> str:
        return " ".join(self.dims)


def array(dims: str, dtype: str, **kwargs: Any) -> Any:
    """Declare an array field: ``tokens: np.ndarray = array("T", "str")``; an optional one
    takes ``default=None``."""
    return dataclasses.field(metadata={"array": Array(tuple(dims.split()), dtype)}, **kwargs)


def sized(dim: str, **kwargs: Any) -> Any:
    """Declare a tuple field whose length is the dimension ``dim`` of the arrays."""
    return dataclasses.field(metadata={"sized": dim}, **kwargs)


def _to_plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Result):
        return value.to_dict()
    if dataclasses.is_dataclass(value):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _from_plain(tp: Any, value: Any, dtype: str | None = None) -> Any:
    if value is None:
        return None
    origin = typing.get_origin(tp)
    if tp is np.ndarray:
        return np.asarray(value, dtype=dtype)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if issubclass(tp, Result):
            return tp.from_dict(value)
        hints = typing.get_type_hints(tp)
        return tp(**{k: _from_plain(hints[k], v) for k, v in value.items()})
    if origin in (tuple,):
        return tuple(value)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _from_plain(args[0], value, dtype) if len(args) == 1 else value
    return value


RESULT_TYPES: dict[str, type[Result]] = {}


class Result:
    """Base of result dataclasses: ``to_dict()`` gives JSON-ready values, ``from_dict`` reverses
    it, ``validate()`` names the first inconsistency. Every subclass is registered by name in
    ``RESULT_TYPES`` so that snapshots can rebuild it."""

    def __init_subclass__(cls, register: bool = True, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if register:
            RESULT_TYPES[cls.__name__] = cls

    # ------------------------------------------------------------ declarations
    @classmethod
    def arrays(cls) -> dict[str, Array]:
        """The declared array fields: name -> ``Array``."""
        return {f.name: f.metadata["array"] for f in dataclasses.fields(cls) if "array" in f.metadata}

    @classmethod
    def sized_fields(cls) -> dict[str, str]:
        """The tuple fields whose length is a dimension: name -> dimension."""
        return {f.name: f.metadata["sized"] for f in dataclasses.fields(cls) if "sized" in f.metadata}

    # ------------------------------------------------------------ conversion
    def to_dict(self) -> dict[str, Any]:
        out = {"type": type(self).__name__}
        out.update({f.name: _to_plain(getattr(self, f.name)) for f in dataclasses.fields(self)})
        return out

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        hints = typing.get_type_hints(cls)
        arrays = cls.arrays()
        kwargs = {
            f.name: _from_plain(hints[f.name], data[f.name], arrays[f.name].dtype if f.name in arrays else None)
            for f in dataclasses.fields(cls)
            if f.name in data
        }
        return cls(**kwargs)

    # ------------------------------------------------------------ checking
    def shape_problem(self) -> str | None:
        """The first array (or sized tuple) whose shape disagrees with the declarations, or None."""
        sizes: dict[str, int] = {}
        for name, dim in self.sized_fields().items():
            value = getattr(self, name)
            if value is not None:
                sizes.setdefault(dim, len(value))
                if len(value) != sizes[dim]:
                    return f"{name} has {len(value)} items, expected {dim}={sizes[dim]}"
        for name, spec in self.arrays().items():
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, np.ndarray):
                return f"{name} is not an array"
            if spec.dims == ("*",):
                continue
            if value.ndim != len(spec.dims):
                return f"{name} has {value.ndim} dimensions, expected {len(spec.dims)} ({spec})"
            for dim, length in zip(spec.dims, value.shape):
                if not dim.isdigit():
                    sizes.setdefault(dim, length)
            if value.shape != tuple(int(d) if d.isdigit() else sizes[d] for d in spec.dims):
                expected = ", ".join(d if d.isdigit() else f"{d}={sizes[d]}" for d in spec.dims)
                return f"{name} has shape {value.shape}, expected ({expected})"
        return None

    def relations(self) -> str | None:
        """Relations between fields that the declared dimensions cannot state (override)."""
        return None

    def validate(self) -> str | None:
        """Name the first inconsistency (declared shapes, nested results, ``relations``), or None."""
        if problem := self.shape_problem():
            return problem
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Result) and (problem := value.validate()):
                return f"{f.name}: {problem}"
        return self.relations()
