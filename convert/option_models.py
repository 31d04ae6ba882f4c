"""The base of every options model (converters, uptraining recipes, pipeline files, eval options) and the one
rule that turns pydantic's validation errors into one line naming the key, the problem and the fix.

A model built from user input (the command line, a YAML file, or `GqaOptions(...)` in Python) either validates or
raises a `KvshrinkError` worded the same way wherever it came from.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError

from kvshrink.convert.errors import KvshrinkError


@dataclass(frozen=True)
class Naming:
    """How messages name a key: `noun` ("option", "recipe key"), an optional `scope` the line starts with
    ("conversion 'gqa2'"), and `style`: flag (--fit-steps), quoted ('fit_steps') or dotted (optimizer.lr)."""

    noun: str = "option"
    scope: str | None = None
    style: Literal["flag", "quoted", "dotted"] = "quoted"

    def name(self, path: list[str]) -> str:
        dotted = ".".join(path)
        if self.style == "flag":
            return "--" + dotted.replace("_", "-")
        return repr(dotted) if self.style == "quoted" else dotted

    def line(self, text: str) -> str:
        return f"{self.scope}: {text}" if self.scope else text


def _whole_number_text(value: Any) -> Any:
    """YAML 1.1 reads 6e9 (no dot) as text; it is a fine token count."""
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        return int(number) if number.is_integer() else number
    return value


WholeNumber = Annotated[int, BeforeValidator(_whole_number_text)]


class OptionsModel(BaseModel):
    """Frozen, unknown keys refused; building one from bad values raises a one-line KvshrinkError."""

    model_config = ConfigDict(extra="forbid", frozen=True, coerce_numbers_to_str=True)

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as error:
            raise KvshrinkError(one_line(error, type(self), Naming())) from None

    # Marks this __init__ as pydantic's own, so validation of a model nesting this one builds it directly (and
    # reports a nested problem by its full key path) instead of calling this translation halfway down.
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]


def build(model: type[BaseModel], values: Any, naming: Naming) -> Any:
    """`model` validated from plain values (a mapping), or a one-line KvshrinkError worded by `naming`."""
    try:
        return model.model_validate(values)
    except ValidationError as error:
        raise KvshrinkError(one_line(error, model, naming)) from None


def build_options(model: type[BaseModel], values: dict[str, Any], what: str | None = None, cli: bool = False) -> Any:
    """`model` validated from plain values, or a one-line KvshrinkError naming the bad option (as a command-line
    flag when `cli`; the line starts with `what` when given)."""
    return build(model, values, Naming("option", scope=what, style="flag" if cli else "quoted"))


def _unwrap(annotation: Any) -> Any:
    """The annotation without Annotated metadata and without None in an optional."""
    if typing.get_origin(annotation) is Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(members) == 1:
            return _unwrap(members[0])
    return annotation


def _walk(model: type[BaseModel], loc: tuple) -> tuple[list[str], Any]:
    """The parts of an error location that name keys and list items (pydantic adds union member tags after
    them), and the annotation they lead to."""
    path: list[str] = []
    annotation: Any = model
    for part in loc:
        annotation = _unwrap(annotation)
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel) and part in annotation.model_fields:
            annotation = annotation.model_fields[part].annotation
        elif origin in (list, tuple) and isinstance(part, int):
            annotation = args[0] if origin is list else args[min(part, len(args) - 1)]
        elif origin is dict:
            annotation = args[1]
        else:
            break
        path.append(str(part))
    return path, annotation


def _unknown_key(error: dict, model: type[BaseModel], naming: Naming) -> str:
    parent_path, parent = _walk(model, error["loc"][:-1])
    key = str(error["loc"][-1])
    known = list(_unwrap(parent).model_fields)
    prefix = ".".join(parent_path) + "." if parent_path and naming.style == "dotted" else ""
    guess = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean {prefix}{guess[0]}?" if guess else f"known keys: {', '.join(known)}"
    style = "quoted" if naming.style == "flag" else naming.style  # no flag exists for an unknown key
    return f"unknown {naming.noun} {Naming(naming.noun, style=style).name([*parent_path, key])}: {hint}"


def _choices(expected: str) -> str:
    """"'a', 'b' or 'c'" (pydantic's wording of a Literal) as "a, b, c"."""
    return ", ".join(re.findall(r"'([^']*)'", expected)) or expected


def _bound(context: dict, key: str) -> str:
    value = context.get(key)
    return f"{value:g}" if isinstance(value, float) else str(value)


def _problem(error: dict, subject: str, leaf: str) -> str | None:
    """The problem and its fix for the error kinds users meet; None for the rest."""
    kind, value, context = error["type"], error.get("input"), error.get("ctx", {})
    if kind == "missing":
        return f"{subject} is required: add `{leaf}: ...`"
    if value is None and kind.endswith(("_type", "_parsing")):
        return f"{subject} cannot be null: give it a value or leave the key out"
    worded = {
        "int_type": f"must be a whole number, got {value!r}",
        "int_parsing": f"must be a whole number, got {value!r}",
        "int_from_float": f"must be a whole number, got {value!r}",
        "float_type": f"must be a number, got {value!r}: write it like 3e-4 or 0.0003",
        "float_parsing": f"must be a number, got {value!r}: write it like 3e-4 or 0.0003",
        "bool_type": f"must be true or false, got {value!r}",
        "bool_parsing": f"must be true or false, got {value!r}",
        "string_type": f"must be text, got {value!r}",
        "list_type": f"must be a list, got {value!r}: write it as `- item` lines",
        "model_type": f"must be a mapping of keys to values, got {value!r}: write `key: value` lines",
        "dict_type": f"must be a mapping of keys to values, got {value!r}: write `key: value` lines",
        "literal_error": f"is {value!r}: choose one of {_choices(str(context.get('expected', '')))}",
        "greater_than": f"is {value!r}: it must be greater than {_bound(context, 'gt')}",
        "greater_than_equal": f"is {value!r}: it must be {_bound(context, 'ge')} or more",
        "less_than": f"is {value!r}: it must be less than {_bound(context, 'lt')}",
        "less_than_equal": f"is {value!r}: it must be {_bound(context, 'le')} or less",
    }
    return f"{subject} {worded[kind]}" if kind in worded else None


def one_line(error: ValidationError, model: type[BaseModel], naming: Naming) -> str:
    """The first problem in `error`, as one line that names the key, what is wrong and what to do."""
    errors = error.errors()
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])  # a typo explains the rest
    if first["type"] == "extra_forbidden":
        return naming.line(_unknown_key(first, model, naming))
    path, _ = _walk(model, first["loc"])
    if first["type"] == "value_error":  # a validator's own message, which states the problem and the fix
        message = str(first["ctx"]["error"])
        return naming.line(f"{'.'.join(path)} {message}" if path else message)
    subject = f"{naming.noun} {naming.name(path)}" if path else f"the {naming.noun.split()[0]}"
    same_key = [e for e in errors if _walk(model, e["loc"])[0] == path]
    if len(same_key) == 1 and (problem := _problem(first, subject, path[-1] if path else "")):
        return naming.line(problem)
    reasons = " or ".join(e["msg"] for e in same_key)  # one per member of a union
    return naming.line(f"{subject}: {reasons} (got {first.get('input')!r})")
