"""KV-cache size per token, from a model's config, for every architecture kvshrink writes."""

from __future__ import annotations

from typing import Any

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


def cache_dtype_bytes(config: dict[str, Any]) -> int:
    dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    return _DTYPE_BYTES.get(str(dtype).removeprefix("torch."), 4)


def kv_values_per_token(config: dict[str, Any]) -> int:
    """Numbers cached per token over all layers: K and V heads for MHA/GQA, latent + rope key for MLA."""
    layers = int(config["num_hidden_layers"])
    if "kv_lora_rank" in config:
        return layers * (int(config["kv_lora_rank"]) + int(config["qk_rope_head_dim"]))
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    return layers * 2 * kv_heads * head_dim


def kv_bytes_per_token(config: dict[str, Any]) -> int:
    """Bytes of KV cache one token costs, in the checkpoint's own dtype."""
    return kv_values_per_token(config) * cache_dtype_bytes(config)


def kv_bytes_at_context(config: dict[str, Any], context: int) -> float:
    """Bytes of KV cache per token of a `context`-token sequence: a sliding layer (`layer_types`) holds at most
    window - 1 tokens between steps (the next token completes its window; transformers' DynamicSlidingWindowLayer
    keeps that many), a full-attention layer every token."""
    per_layer = kv_bytes_per_token(config) / int(config["num_hidden_layers"])
    window = config.get("sliding_window")
    kinds = config.get("layer_types") or ["full_attention"] * int(config["num_hidden_layers"])
    held = sum(min(context, int(window) - 1) if kind == "sliding_attention" and window else context for kind in kinds)
    return per_layer * held / context
