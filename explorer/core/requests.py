"""The one call convention of every analysis: ``fn(session, request=None, /, *, ctx=None, **fields)``.

An analysis takes its request as a frozen dataclass, or its fields as keywords, or both (the
keywords then replace the request's fields); a plain string stands for the request's first
field (usually the prompt). ``ctx`` is the ``JobContext`` of a job (progress, cancel) or None.

>>> from dataclasses import dataclass
>>> @dataclass(frozen=True)
... class Greeting:
...     prompt: str
...     top_k: int = 10
>>> build_request(Greeting, None, {"prompt": "hi"})
Greeting(prompt='hi', top_k=10)
>>> build_request(Greeting, "hi", {"top_k": 3})
Greeting(prompt='hi', top_k=3)
>>> build_request(Greeting, Greeting("hi"), {"top_k": 5})
Greeting(prompt='hi', top_k=5)
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

from explorer.core.errors import ExplorerError

R = TypeVar("R")


class RequestError(ExplorerError):
    """An analysis was called with fields its request does not have, or without required ones."""


def build_request(cls: type[R], request: R | str | None, fields: Mapping[str, Any]) -> R:
    """The request an analysis runs: ``request`` (a ``cls``, a string for its first field, or
    None) with ``fields`` applied on top. Unknown or missing fields are a ``RequestError``."""
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(fields) - set(names))
    if unknown:
        raise RequestError(f"{cls.__name__} has no field {', '.join(map(repr, unknown))} "
                           f"(its fields: {', '.join(names)})")
    if isinstance(request, cls):
        return dataclasses.replace(request, **fields) if fields else request
    if isinstance(request, str):
        if names[0] in fields:
            raise RequestError(f"{names[0]!r} given twice: as the text argument and as a keyword")
        fields = {names[0]: request, **fields}
    elif request is not None:
        raise RequestError(f"expected a {cls.__name__}, a string or keywords, got {type(request).__name__}")
    try:
        return cls(**fields)
    except TypeError as e:
        raise RequestError(f"{cls.__name__}: {e}") from None
