"""Which parameters uptraining updates: all of them, the attention blocks, or only what the conversion made."""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Literal

import torch

from kvshrink.convert.errors import KvshrinkError
from kvshrink.uptrain.recipe import new_parameter_names


def select_trainable(
    model: torch.nn.Module,
    mode: Literal["all", "attention", "new"],
    model_dir: str | Path,
    freeze: list[str] | tuple[str, ...] = (),
) -> list[str]:
    """Set requires_grad on `model` for `mode`, minus the parameters whose names match a `freeze` glob
    pattern; return the trained parameter names (tied names included).

    attention: every parameter inside a module whose class name ends in "Attention" (stock transformers
    names them LlamaAttention, DeepseekV3Attention, ...). new: the tensors kvshrink_report.json lists; a
    tied tensor is trained if any of its names is listed.
    """
    named = list(model.named_parameters(remove_duplicate=False))
    if mode == "all":
        chosen = {id(p) for _, p in named}
    elif mode == "attention":
        chosen = {
            id(p)
            for module in model.modules()
            if type(module).__name__.endswith("Attention")
            for p in module.parameters()
        }
        if not chosen:
            raise KvshrinkError(
                f"{type(model).__name__} has no module named *Attention: set trainable to all or new"
            )
    else:
        by_name = {name: p for name, p in named}
        listed = new_parameter_names(model_dir)
        missing = [name for name in listed if name not in by_name]
        if missing:
            raise KvshrinkError(
                f"kvshrink_report.json lists {missing[0]!r} ({len(missing)} missing in all), which "
                f"{type(model).__name__} does not have: use the report written with this model, or trainable: all"
            )
        chosen = {id(by_name[name]) for name in listed}
    for pattern in freeze:
        matched = {id(p) for name, p in named if fnmatch.fnmatchcase(name, pattern)}
        if not matched:
            raise KvshrinkError(
                f"freeze pattern {pattern!r} matches no parameter of {type(model).__name__}: "
                f"patterns are globs over names like {named[0][0]!r}"
            )
        chosen -= matched
    for _, parameter in named:
        parameter.requires_grad_(id(parameter) in chosen)
    return [name for name, p in named if id(p) in chosen]
