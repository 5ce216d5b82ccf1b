"""Shared machinery for typed results: frozen dataclasses of numpy arrays and plain values."""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T", bound="Result")


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


def _from_plain(tp: Any, value: Any, dtypes: dict[str, str], name: str) -> Any:
    if value is None:
        return None
    origin = typing.get_origin(tp)
    if tp is np.ndarray:
        return np.asarray(value, dtype=dtypes.get(name))
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if issubclass(tp, Result):
            return tp.from_dict(value)
        hints = typing.get_type_hints(tp)
        return tp(**{k: _from_plain(hints[k], v, {}, k) for k, v in value.items()})
    if origin in (tuple,):
        return tuple(value)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _from_plain(args[0], value, dtypes, name) if len(args) == 1 else value
    return value


RESULT_TYPES: dict[str, type["Result"]] = {}


class Result:
    """Mixin for result dataclasses: ``to_dict()`` gives JSON-ready values, ``from_dict`` reverses it.

    Subclasses list the numpy dtype of each array field in ``_dtypes`` so a round trip
    restores exactly the same arrays. Every subclass is registered by name in ``RESULT_TYPES``
    so snapshots can rebuild it.
    """

    _dtypes: typing.ClassVar[dict[str, str]] = {}

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        RESULT_TYPES[cls.__name__] = cls

    def to_dict(self) -> dict[str, Any]:
        out = {"type": type(self).__name__}
        out.update({f.name: _to_plain(getattr(self, f.name)) for f in dataclasses.fields(self)})
        return out

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        hints = typing.get_type_hints(cls)
        kwargs = {
            f.name: _from_plain(hints[f.name], data[f.name], cls._dtypes, f.name)
            for f in dataclasses.fields(cls)
            if f.name in data
        }
        return cls(**kwargs)
