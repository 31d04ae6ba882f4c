"""Model families as data: one JSON spec per family says where the attention tensors live and what each
converter can do with the family.

A spec names, relative to a layer's prefix, either separate `q_proj`/`k_proj`/`v_proj` or one fused `qkv_proj`
(rows [q; k; v]), the `o_proj`, and optional `q_norm`/`k_norm`. Biases are found by tensor presence
(`<name>.bias`), so one spec serves checkpoints with and without them. Optional keys (defaults fit llama):

- `qk_norm_scope`: "head" (one [head_dim] weight shared by every head, Qwen3, Gemma-3) or "projection" (one
  weight over the whole q or k projection, OLMo-2);
- `norm_offset`: 1.0 where the RMSNorm multiplies by (1 + weight) (Gemma), else 0.0;
- `fused_gate_up`: the MLP's fused [gate; up] projection relative to the layer prefix (Phi-3), else absent;
- `sliding_window_switch`: the config flag that turns a configured `sliding_window` on (Qwen2: use_sliding_window),
  or absent where the stock class slides whenever `sliding_window` is set (Mistral, Phi-3);
- `sliding_window_class`: the model_type of the stock class that runs this family with per-layer windows
  (`layer_types`) exactly: the family's own where it has them (Qwen2, Qwen3, Gemma-2, Ministral), Ministral for
  Llama and Mistral (the same layer, also without biases); absent where `add-sliding-window` refuses the family;
- `embeddings`, `final_norm`, `lm_head`: the stock class's modules outside the layers (Gemma's embedding module
  applies its sqrt(hidden_size) scale itself; Gemma-2's final logit softcapping is config.final_logit_softcapping,
  applied by the causal-LM class after lm_head);
- `converters`: per converter ("gqa", "mla", "window", "linear") a `support` of "exact" (every feature of the family is
  carried exactly; the KV reduction's own error is always measured and reported), "approximate" (a feature is
  approximated, with its error reported) or "refused", and `why` (the reason, or what is approximated).

Adding a family = adding a JSON file here plus a test against its stock transformers class.
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from kvshrink.convert.errors import KvshrinkError

_PROJECTION_KEYS = ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "q_norm", "k_norm")
_ROPE_LAYOUTS = ("rotate_half",)
_NORM_SCOPES = ("head", "projection")
CONVERTERS = {"gqa": "mha-to-gqa / mha-to-mqa", "mla": "mha-to-mla", "window": "add-sliding-window",
              "linear": "add-linear-attention"}
SUPPORT_LEVELS = ("exact", "approximate", "refused")


@dataclass(frozen=True)
class Support:
    level: str  # one of SUPPORT_LEVELS
    why: str = ""


@dataclass(frozen=True)
class FamilySpec:
    model_type: str
    architectures: tuple[str, ...]
    layer_prefix: str
    attention: dict[str, str]
    rope_layout: str
    qk_norm_scope: str = "head"
    norm_offset: float = 0.0
    embeddings: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    fused_gate_up: str | None = None
    sliding_window_switch: str | None = None
    sliding_window_class: str | None = None
    converters: dict[str, Support] = field(default_factory=dict)

    @property
    def fused_qkv(self) -> bool:
        return "qkv_proj" in self.attention

    @property
    def has_head_norms(self) -> bool:
        return "q_norm" in self.attention or "k_norm" in self.attention

    @property
    def has_projection_norms(self) -> bool:
        return self.has_head_norms and self.qk_norm_scope == "projection"

    def support(self, converter: str) -> Support:
        return self.converters.get(converter, Support("exact"))

    def require(self, converter: str, exact_only: bool = False) -> Support:
        """The family's support for `converter`, or a one-line refusal naming why (`exact_only`: also refuse
        what the converter would only approximate)."""
        support = self.support(converter)
        if support.level == "approximate" and exact_only:
            raise KvshrinkError(
                f"{CONVERTERS[converter]} can only approximate {self.model_type} and --exact-only is set: "
                f"{support.why}; drop --exact-only to convert it approximately"
            )
        if support.level == "refused":
            usable = [name for name, level in supported_families(converter).items() if level != "refused"]
            raise KvshrinkError(
                f"{CONVERTERS[converter]} cannot convert {self.model_type}: {support.why} "
                f"(families it converts: {', '.join(usable)})"
            )
        return support

    @property
    def attention_module(self) -> str:
        """The attention module's path inside a decoder layer ('self_attn')."""
        return self.attention["o_proj"].rsplit(".", 1)[0]

    def tensor_name(self, layer: int, part: str, kind: str = "weight") -> str:
        """Full checkpoint name of a layer's attention tensor, e.g. part='k_proj', kind='bias'."""
        return f"{self.layer_prefix.format(layer=layer)}{self.attention[part]}.{kind}"

    def attention_tensor_names(self, layer: int) -> set[str]:
        """Every weight or bias name this layer's attention may use."""
        return {
            self.tensor_name(layer, part, kind) for part in self.attention for kind in ("weight", "bias")
        }


def _malformed(origin: str, problem: str) -> KvshrinkError:
    return KvshrinkError(f"family spec {origin} is malformed: {problem}")


def _parse_converters(raw: dict[str, Any], origin: str) -> dict[str, Support]:
    converters = {}
    for converter, entry in raw.items():
        if converter not in CONVERTERS or entry.get("support") not in SUPPORT_LEVELS:
            raise _malformed(origin, f"converters.{converter} needs a converter in {', '.join(CONVERTERS)} and a "
                                     f"support in {', '.join(SUPPORT_LEVELS)}")
        if entry["support"] != "exact" and not entry.get("why"):
            raise _malformed(origin, f"converters.{converter} is {entry['support']} and must say why")
        converters[converter] = Support(entry["support"], entry.get("why", ""))
    return converters


def _parse(raw: dict[str, Any], origin: str) -> FamilySpec:
    attention = raw.get("attention", {})
    unknown = set(attention) - set(_PROJECTION_KEYS)
    split = {"q_proj", "k_proj", "v_proj"} <= set(attention)
    if unknown or "o_proj" not in attention or split == ("qkv_proj" in attention):
        raise _malformed(
            origin, "'attention' needs o_proj and either q_proj/k_proj/v_proj or qkv_proj "
            f"(allowed keys: {', '.join(_PROJECTION_KEYS)})",
        )
    if raw.get("rope_layout") not in _ROPE_LAYOUTS:
        raise KvshrinkError(f"family spec {origin}: rope_layout must be one of {', '.join(_ROPE_LAYOUTS)}")
    if raw.get("qk_norm_scope", "head") not in _NORM_SCOPES:
        raise _malformed(origin, f"qk_norm_scope must be one of {', '.join(_NORM_SCOPES)}")
    optional = {key: raw[key] for key in ("qk_norm_scope", "norm_offset", "embeddings", "final_norm", "lm_head",
                                          "fused_gate_up", "sliding_window_switch", "sliding_window_class")
                if key in raw}
    return FamilySpec(
        model_type=raw["model_type"],
        architectures=tuple(raw["architectures"]),
        layer_prefix=raw["layer_prefix"],
        attention=dict(attention),
        rope_layout=raw["rope_layout"],
        converters=_parse_converters(raw.get("converters", {}), origin),
        **optional,
    )


def load_family_specs() -> dict[str, FamilySpec]:
    specs = {}
    for entry in resources.files(__package__).iterdir():
        if entry.name.endswith(".json"):
            spec = _parse(json.loads(entry.read_text()), entry.name)
            specs[spec.model_type] = spec
    return specs


def supported_families(converter: str) -> dict[str, str]:
    """model_type -> support level for `converter`, sorted by name."""
    return {name: spec.support(converter).level for name, spec in sorted(load_family_specs().items())}


def support_matrix(markdown: bool = True) -> str:
    """The family x converter table, generated from the specs: Markdown for the README, plain text (with the
    reasons listed under it) for `convert --help`."""
    specs = sorted(load_family_specs().items())
    if markdown:
        lines = [
            "| family | architecture | " + " | ".join(f"`{name}`" for name in CONVERTERS.values()) + " |",
            "|---|---|" + "---|" * len(CONVERTERS),
        ]
        for name, spec in specs:
            cells = [_cell(spec.support(converter)) for converter in CONVERTERS]
            lines.append(f"| {name} | {', '.join(spec.architectures)} | " + " | ".join(cells) + " |")
        return "\n".join(lines)
    lines = [("family        " + "".join(f"{name:<26}" for name in CONVERTERS.values())).rstrip()]
    reasons = []
    for name, spec in specs:
        lines.append(f"{name:<14}" + "".join(f"{spec.support(c).level:<26}" for c in CONVERTERS).rstrip())
        reasons += [textwrap.fill(f"{name} {CONVERTERS[c]}: {spec.support(c).why}", 96, subsequent_indent="    ")
                    for c in CONVERTERS if spec.support(c).why]
    return "\n".join([*lines, "", *reasons])


def _cell(support: Support) -> str:
    return f"**{support.level}**" + (f": {support.why}" if support.why else "")


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
