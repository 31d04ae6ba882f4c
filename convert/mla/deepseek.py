"""The target format: a dense DeepseekV3 config and its rope parameters.

Two layouts (the engines' rules are data in `kvshrink.convert.engines`):
- `vllm` / `sglang`: rope_type "default" with a rope_theta that makes the D/2 slot frequencies
  θ'^(-2i/D) the kept source frequencies (a geometric set from 1), interleaved rope weights, no attention
  biases, and rms_norm_eps set to the 1e-6 transformers hard-codes for the latent norm, so both engines run
  the same linear latent norm. Valid in vLLM, SGLang and transformers.
- `transformers`: rope_type "longrope" with short_factor == long_factor and factor 1.0, which gives every slot
  an arbitrary exact frequency (attention_scaling 1). vLLM and SGLang rewrite any non-default rope type to
  deepseek_yarn, so this form is silently wrong there: transformers only.
"""

from __future__ import annotations

from typing import Any

import torch

from kvshrink.convert.engines import TRANSFORMERS_LATENT_EPS
from kvshrink.convert.errors import KvshrinkError
from kvshrink.convert.families import FamilySpec
from kvshrink.convert.maths import PER_LAYER_TYPE, SourceRope

_CARRIED = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "bos_token_id", "eos_token_id",
    "pad_token_id", "hidden_act", "initializer_range", "attention_dropout", "use_cache", "dtype",
)


def refuse_uncopyable_rope(rope: SourceRope) -> None:
    """Refuse a source RoPE (`Conversion.rope`) that no one table of rope slot frequencies can copy: after this,
    `rope.inv_freq` is the source's table."""
    if rope.fraction != 1.0:
        raise KvshrinkError(
            "the source applies RoPE to only part of each head (partial_rotary_factor < 1): its no-RoPE dims "
            "would belong in the latent, which mha-to-mla does not map, so it refuses rather than drop them; "
            "convert a model with full-width RoPE, or use mha-to-gqa"
        )
    if rope.rope_type == PER_LAYER_TYPE:
        raise KvshrinkError(
            "the source gives each layer type its own RoPE, which one table of rope slot frequencies cannot copy: "
            "convert a model with one RoPE for every layer"
        )
    if rope.inv_freq is None:
        raise KvshrinkError(
            f"the source's rope_type {rope.rope_type!r} is unknown to transformers: update transformers"
        )
    if rope.attention_scaling != 1.0 or rope.rope_type == "dynamic":
        raise KvshrinkError(
            f"the source's {rope.rope_type} RoPE scales attention or changes with length, which one fixed table of "
            "frequencies cannot copy: convert a model with default, linear or llama3 RoPE"
        )


def longrope_parameters(theta: float, frequencies: torch.Tensor, max_positions: int) -> dict[str, Any]:
    """rope_parameters whose inv_freq is exactly `frequencies` [D/2] (transformers' longrope, factor 1)."""
    slots = frequencies.numel()
    base = theta ** (-torch.arange(0, 2 * slots, 2, dtype=torch.float64) / (2 * slots))
    factors = (base / frequencies.double()).tolist()
    return {
        "rope_type": "longrope", "rope_theta": theta, "short_factor": factors, "long_factor": factors,
        "factor": 1.0, "original_max_position_embeddings": max_positions,
    }


def geometric_theta(theta: float, step: int, rope_dim: int, head_dim: int) -> float:
    """θ' with θ'^(-2i/D) = θ^(-2·i·step/head_dim): slot i carries source frequency i·step."""
    return theta ** (step * rope_dim / head_dim)


def split_gate_up(spec: FamilySpec, config: dict[str, Any]) -> dict[str, tuple[tuple[str, slice], ...]]:
    """Fused [gate; up] MLP weights (Phi-3) -> DeepseekV3's gate_proj and up_proj, their row ranges (exact):
    target tensor name -> its source rows (`frame.Derived`). Empty for families with separate gate and up."""
    if spec.fused_gate_up is None:
        return {}
    width = int(config["intermediate_size"])
    derived = {}
    for layer in range(int(config["num_hidden_layers"])):
        prefix = spec.layer_prefix.format(layer=layer)
        fused = f"{prefix}{spec.fused_gate_up}.weight"
        derived[f"{prefix}mlp.gate_proj.weight"] = ((fused, slice(0, width)),)
        derived[f"{prefix}mlp.up_proj.weight"] = ((fused, slice(width, 2 * width)),)
    return derived


def deepseek_config(
    source: dict[str, Any],
    *,
    kv_rank: int,
    rope_dim: int,
    nope_dim: int,
    head_dim: int,
    rope_parameters: dict[str, Any],
    interleave: bool,
    attention_bias: bool,
    q_lora_rank: int | None,
    rms_norm_eps: float,
) -> dict[str, Any]:
    """A complete dense DeepseekV3 config.json dict: the source's model-wide settings, MLA attention."""
    from transformers import DeepseekV3Config

    carried = {key: source[key] for key in _CARRIED if source.get(key) is not None}
    carried["dtype"] = carried.get("dtype") or source.get("torch_dtype") or "float32"
    config = DeepseekV3Config(
        **carried,
        num_key_value_heads=int(source["num_attention_heads"]),
        kv_lora_rank=kv_rank,
        q_lora_rank=q_lora_rank,
        qk_rope_head_dim=rope_dim,
        qk_nope_head_dim=nope_dim,
        v_head_dim=head_dim,
        first_k_dense_replace=int(source["num_hidden_layers"]),
        rope_parameters=rope_parameters,
        rope_interleave=interleave,
        attention_bias=attention_bias,
    ).to_dict()
    config["rms_norm_eps"] = rms_norm_eps
    config["architectures"] = ["DeepseekV3ForCausalLM"]
    config.pop("transformers_version", None)
    return config
