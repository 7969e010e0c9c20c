"""Typed loading of plain data (YAML, JSON) into frozen dataclasses: the job spec and every task's params.

A leaf module (it imports nothing of shardwise but the error type), so the spec and the task registry both
use it without importing each other. Unknown keys, wrong types and bad values raise `SpecError` naming the
dotted key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Union, get_args, get_origin

from pipeline.errors import SpecError

__all__ = ["build", "convert", "to_plain", "type_name"]


def type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in get_args(tp))
    if origin is tuple:
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {type_name(args[0])}"
        return f"a list of {len(args)} items [{', '.join(type_name(a) for a in args)}]"
    if origin is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


# PyYAML follows YAML 1.1, where a float needs a dot: `lr: 5e-5` loads as the string "5e-5". Users (and
# YAML 1.2) mean a number, so float keys accept exactly that spelling; other strings stay errors.
_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def convert(value: Any, tp: Any, key: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise SpecError(key, f"got {value!r}; allowed: {', '.join(repr(a) for a in get_args(tp))}")
    if origin in (Union, types.UnionType):
        errors = []
        for arg in get_args(tp):
            try:
                return convert(value, arg, key)
            except SpecError as e:
                errors.append(e)
        for inner in errors:
            if (
                inner.key != key
            ):  # the value had this arm's shape (a mapping, a list); the mistake is inside it
                raise inner
        raise SpecError(key, f"got {value!r}; expected {type_name(tp)}")
    if tp is type(None):
        if value is None:
            return None
        raise SpecError(key, f"got {value!r}; expected null")
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if origin is tuple:
        if not isinstance(value, Sequence) or isinstance(value, str | bytes):
            raise SpecError(key, f"got {value!r}; expected {type_name(tp)}")
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise SpecError(key, f"got {value!r}; expected {type_name(tp)}")
        return tuple(convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise SpecError(key, f"got {value!r}; expected a mapping")
        kt, vt = get_args(tp)
        return {convert(k, kt, key): convert(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise SpecError(key, f"got {value!r}; expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise SpecError(key, f"got {value!r}; expected an integer")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value):
            return float(value)
        raise SpecError(key, f"got {value!r}; expected a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise SpecError(key, f"got {value!r}; expected a string")
    raise TypeError(f"spec type {tp!r} at {key} is not supported")  # a bug in this module, not user input


def build(cls: Any, data: Any, prefix: str) -> Any:
    where = prefix or "the job spec"
    if not isinstance(data, Mapping):
        raise SpecError(prefix, f"expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields), key=str)  # YAML keys need not be strings (`1: x`)
    if unknown:
        name = unknown[0]
        key = f"{prefix}.{name}" if prefix else str(name)
        close = difflib.get_close_matches(str(name), list(fields), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise SpecError(key, f"unknown key in {where}; {hint}allowed keys: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in data:
            kwargs[name] = convert(data[name], hints[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise SpecError(key, f"required key is missing from {where}")
    return cls(**kwargs)


def to_plain(value: Any) -> Any:
    """Plain data (JSON-able) for a dataclass tree; used for fingerprints and the manifest."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    return value
