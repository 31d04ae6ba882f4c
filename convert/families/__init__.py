"""Model families as data: one JSON spec per family says where the attention tensors live.

A spec names, relative to a layer's prefix, either separate `q_proj`/`k_proj`/`v_proj` or one fused `qkv_proj`
(rows [q; k; v]), the `o_proj`, and optional per-head `q_norm`/`k_norm`. Biases are found by tensor presence
(`<name>.bias`), so one spec serves checkpoints with and without them. Adding a family = adding a JSON file here
plus a test against its stock transformers class.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

from kvshrink.convert.errors import KvshrinkError

_PROJECTION_KEYS = ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "q_norm", "k_norm")
_ROPE_LAYOUTS = ("rotate_half",)


@dataclass(frozen=True)
class FamilySpec:
    model_type: str
    architectures: tuple[str, ...]
    layer_prefix: str
    attention: dict[str, str]
    rope_layout: str

    @property
    def fused_qkv(self) -> bool:
        return "qkv_proj" in self.attention

    @property
    def has_head_norms(self) -> bool:
        return "q_norm" in self.attention or "k_norm" in self.attention

    def tensor_name(self, layer: int, part: str, kind: str = "weight") -> str:
        """Full checkpoint name of a layer's attention tensor, e.g. part='k_proj', kind='bias'."""
        return f"{self.layer_prefix.format(layer=layer)}{self.attention[part]}.{kind}"

    def attention_tensor_names(self, layer: int) -> set[str]:
        """Every weight or bias name this layer's attention may use."""
        return {
            self.tensor_name(layer, part, kind) for part in self.attention for kind in ("weight", "bias")
        }


def _parse(raw: dict[str, Any], origin: str) -> FamilySpec:
    attention = raw.get("attention", {})
    unknown = set(attention) - set(_PROJECTION_KEYS)
    split = {"q_proj", "k_proj", "v_proj"} <= set(attention)
    if unknown or "o_proj" not in attention or split == ("qkv_proj" in attention):
        raise KvshrinkError(
            f"family spec {origin} is malformed: 'attention' needs o_proj and either q_proj/k_proj/v_proj or "
            f"qkv_proj (allowed keys: {', '.join(_PROJECTION_KEYS)})"
        )
    if raw.get("rope_layout") not in _ROPE_LAYOUTS:
        raise KvshrinkError(f"family spec {origin}: rope_layout must be one of {', '.join(_ROPE_LAYOUTS)}")
    return FamilySpec(
        model_type=raw["model_type"],
        architectures=tuple(raw["architectures"]),
        layer_prefix=raw["layer_prefix"],
        attention=dict(attention),
        rope_layout=raw["rope_layout"],
    )


def load_family_specs() -> dict[str, FamilySpec]:
    specs = {}
    for entry in resources.files(__package__).iterdir():
        if entry.name.endswith(".json"):
            spec = _parse(json.loads(entry.read_text()), entry.name)
            specs[spec.model_type] = spec
    return specs


def family_for(config: dict[str, Any]) -> FamilySpec:
    """The spec for a checkpoint's config.json, or an error listing what is supported."""
    specs = load_family_specs()
    model_type = config.get("model_type")
    if model_type not in specs:
        raise KvshrinkError(
            f"model_type {model_type!r} is not supported: supported families are {', '.join(sorted(specs))} "
            "(a new family is a JSON spec in kvshrink/convert/families)"
        )
    return specs[model_type]
