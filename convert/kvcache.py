"""KV-cache size per token, from a model's config, for every architecture kvshrink writes."""

from __future__ import annotations

from typing import Any

from kvshrink.convert.checkpoint import stock_config
from kvshrink.convert.errors import KvshrinkError

# Where reports compare what models hold: a window or a recurrent state pays off with length, so a per-token KV size
# alone misranks them against MQA or MLA.
LONG_CONTEXTS = (8192, 32768)
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


def cache_dtype_bytes(config: dict[str, Any]) -> int:
    dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    return _DTYPE_BYTES.get(str(dtype).removeprefix("torch."), 4)


_RECURRENT = ("mamba", "linear_attention")  # GraniteMoeHybrid's Mamba-2 layers, in either spelling of layer_types


def _recurrent_layers(config: dict[str, Any]) -> int:
    return sum(kind in _RECURRENT for kind in config.get("layer_types") or [])


def recurrent_state_bytes(config: dict[str, Any]) -> int:
    """Bytes a sequence's Mamba-2 layers hold whatever its length: each layer's state (heads x head dim x d_state,
    float32 in transformers' torch path) and conv window (the last d_conv inputs of x, B and C, in the model dtype;
    transformers' DynamicCache keeps d_conv of them)."""
    if not _recurrent_layers(config):
        return 0
    if "mamba_n_heads" not in config:
        raise KvshrinkError(f"the recurrent layers of {config.get('model_type')!r} are not Mamba-2 mixers, whose state "
                            "kvshrink can size: only GraniteMoeHybrid's are")
    heads, head_dim, state = (int(config[key]) for key in ("mamba_n_heads", "mamba_d_head", "mamba_d_state"))
    conv_channels = heads * head_dim + 2 * int(config["mamba_n_groups"]) * state
    per_layer = heads * head_dim * state * 4 + conv_channels * int(config["mamba_d_conv"]) * cache_dtype_bytes(config)
    return _recurrent_layers(config) * per_layer


def kv_values_per_token(config: dict[str, Any]) -> int:
    """Numbers cached per token over all layers: K and V heads for MHA/GQA, latent + rope key for MLA (recurrent
    layers cache no tokens)."""
    layers = int(config["num_hidden_layers"]) - _recurrent_layers(config)
    if "kv_lora_rank" in config:
        return layers * (int(config["kv_lora_rank"]) + int(config["qk_rope_head_dim"]))
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    return layers * 2 * kv_heads * head_dim


def kv_bytes_per_token(config: dict[str, Any]) -> int:
    """Bytes of KV cache one token costs, in the checkpoint's own dtype."""
    return kv_values_per_token(config) * cache_dtype_bytes(config)


def _layer_kinds(config: dict[str, Any]) -> tuple[list[str], int | None]:
    """Each layer's kind and the window, as transformers' cache sees them: `layer_types` where the config has them,
    else as its config class derives them (Gemma 2 alternates; Qwen2 windows only with use_sliding_window), else
    every layer windowed when a window is set (DynamicCache does so for Mistral-7B-v0.1 and Phi-3's 4k models)."""
    kinds, window = config.get("layer_types"), config.get("sliding_window")
    if not kinds and config.get("model_type"):
        try:
            loaded = stock_config(config)
        except (KeyError, ValueError, TypeError):  # a model type this transformers does not know: the config as is
            loaded = None
        kinds = getattr(loaded, "layer_types", None)
        window = getattr(loaded, "sliding_window", window) if loaded is not None else window
    layers = int(config["num_hidden_layers"])
    return list(kinds or ["sliding_attention" if window else "full_attention"] * layers), window


def kv_bytes_at_context(config: dict[str, Any], context: int) -> float:
    """Bytes of cache and state per token of a `context`-token sequence: a sliding layer (`layer_types`) holds at
    most window - 1 tokens between steps (the next token completes its window; transformers'
    DynamicSlidingWindowLayer keeps that many), a full-attention layer every token, a recurrent layer its fixed
    state (`recurrent_state_bytes`)."""
    attention_layers = int(config["num_hidden_layers"]) - _recurrent_layers(config)
    per_layer = kv_bytes_per_token(config) / attention_layers
    kinds, window = _layer_kinds(config)
    kinds = [kind for kind in kinds if kind not in _RECURRENT]
    held = sum(min(context, int(window) - 1) if kind == "sliding_attention" and window else context for kind in kinds)
    return (per_layer * held + recurrent_state_bytes(config)) / context


def bytes_held_per_token(config: dict[str, Any]) -> dict[str, float]:
    """`kv_bytes_at_context` at each of LONG_CONTEXTS, keyed by the context as text (the JSON reports' keys)."""
    return {str(context): kv_bytes_at_context(config, context) for context in LONG_CONTEXTS}
