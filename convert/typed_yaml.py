"""Plain YAML mappings validated into typed dataclasses, with errors that name the key and the fix.

Shared by uptraining recipes and pipeline files: unknown keys get a close-match suggestion, missing keys and
wrong types are named by their dotted path, and YAML 1.1's habit of reading `3e-4` as text is forgiven.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal

from kvshrink.convert.errors import KvshrinkError


def build_dataclass(cls: type, raw: Any, what: str = "recipe", prefix: str = "") -> Any:
    """An instance of dataclass `cls` from the mapping `raw`; `what` names the file kind in messages."""
    where = prefix.rstrip(".") or f"the {what}"
    if not isinstance(raw, dict):
        raise KvshrinkError(f"{where} must be a mapping of keys to values, got {raw!r}: write `key: value` lines")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            guess = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"did you mean {prefix}{guess[0]}?" if guess else f"known keys: {', '.join(fields)}"
            raise KvshrinkError(f"unknown {what} key {prefix}{key}: {hint}")
    values = {}
    for name, spec in fields.items():
        if name in raw:
            values[name] = _coerce(hints[name], raw[name], f"{prefix}{name}", what)
        elif spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            raise KvshrinkError(f"{what} key {prefix}{name} is missing: add `{name}: ...` to {where}")
    return cls(**values)


def _not_a_number(key: str, value: Any, what: str) -> float:
    raise KvshrinkError(f"{what} key {key} must be a number, got {value!r}: write it like 3e-4 or 0.0003")


def _coerce(hint: Any, value: Any, key: str, what: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        choices = [arg for arg in args if arg is not type(None)]
        return _coerce(choices[0], value, key, what)
    if value is None:
        raise KvshrinkError(f"{what} key {key} cannot be null: give it a value or leave the key out")
    if hint is Any:
        return value
    if origin is Literal:
        if value not in args:
            raise KvshrinkError(f"{what} key {key} is {value!r}: choose one of {', '.join(map(str, args))}")
        return value
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value, what, f"{key}.")
    if origin is list:
        if not isinstance(value, list):
            raise KvshrinkError(f"{what} key {key} must be a list, got {value!r}: write it as `- item` lines")
        return [_coerce(args[0], item, f"{key}.{index}", what) for index, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise KvshrinkError(f"{what} key {key} must be a mapping, got {value!r}: write `name: value` lines")
        return {str(k): _coerce(args[1], v, f"{key}.{k}", what) for k, v in value.items()}
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise KvshrinkError(f"{what} key {key} must be a list of {len(args)} numbers, got {value!r}")
        return tuple(_coerce(arg, item, f"{key}.{i}", what) for i, (arg, item) in enumerate(zip(args, value)))
    if hint is bool:
        if not isinstance(value, bool):
            raise KvshrinkError(f"{what} key {key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, str):  # YAML 1.1 reads 6e9 (no dot) as text; it is a fine token count
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise KvshrinkError(f"{what} key {key} must be a whole number, got {value!r}")
        return value
    if hint is float:
        try:  # YAML 1.1 reads 3e-4 (no dot) as a string
            return float(value) if not isinstance(value, bool) else _not_a_number(key, value, what)
        except (TypeError, ValueError):
            _not_a_number(key, value, what)
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise KvshrinkError(f"{what} key {key} must be text, got {value!r}")
        return str(value)
    raise TypeError(f"{what} field {key} has unsupported type {hint}")
