"""Strict reading of JSON config objects: every wrong field refused by its dotted name.

A config that loads "silently" computes something else: a typo (``mask_treshold``) leaves the
default in force, ``280.5`` as an input height is truncated, ``Infinity`` as a temperature changes
the labels. These helpers turn each of those into a ValueError that names the field
(``input.height``, ``model.backbone.num_heads``) and what it must be.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from collections.abc import Iterable
from typing import Any

__all__ = ["check_keys", "check_typed_fields", "finite_number", "integer", "number_list", "string"]


def check_keys(d: Any, known: Iterable[str], where: str, required: Iterable[str] = ()) -> dict:
    """``d`` itself once it is an object whose keys are all in ``known`` and include ``required``."""
    if not isinstance(d, dict):
        raise ValueError(f"{where or 'the config'} must be a JSON object, got {type(d).__name__}")
    known = list(known)
    for key in d:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(known)})"
            raise ValueError(f"unknown field {_join(where, key)!r}{hint}")
    for key in required:
        if key not in d:
            raise ValueError(f"missing field {_join(where, key)!r}")
    return d


def integer(value: Any, where: str, minimum: int | None = None) -> int:
    """An int (a JSON float such as 280.0 is refused: it would be truncated, or was meant otherwise)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where} is {value!r}; it must be an integer")
    if minimum is not None and value < minimum:
        raise ValueError(f"{where} is {value}; it must be >= {minimum}")
    return value


def finite_number(value: Any, where: str, positive: bool = False) -> float:
    """A finite int or float (> 0 with ``positive``), as float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where} is {value!r}; it must be a finite number")
    if positive and not value > 0:
        raise ValueError(f"{where} is {value!r}; it must be > 0")
    return float(value)


def number_list(value: Any, where: str, length: int, positive: bool = False) -> tuple[float, ...]:
    """A list of exactly ``length`` finite numbers."""
    if not isinstance(value, list) or len(value) != length:
        raise ValueError(f"{where} is {value!r}; it must be a list of {length} numbers")
    return tuple(finite_number(v, f"{where}[{i}]", positive) for i, v in enumerate(value))


def string(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where} is {value!r}; it must be a string")
    return value


def check_typed_fields(cls: type, d: Any, where: str) -> dict:
    """Check an object against the dataclass ``cls``: known keys only, and each scalar field's value of
    its declared type (int, float: finite, bool, str). Nested dataclass fields are the caller's."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    required = [n for n, f in fields.items()
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    check_keys(d, fields, where, required)
    for name, value in d.items():
        kind, at = hints[name], _join(where, name)
        if kind is bool:
            if not isinstance(value, bool):
                raise ValueError(f"{at} is {value!r}; it must be true or false")
        elif kind is int:
            integer(value, at)
        elif kind is float:
            finite_number(value, at)
        elif kind is str:
            string(value, at)
    return d


def _join(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)
