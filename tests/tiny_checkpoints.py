"""Tiny random checkpoints of stock transformers classes, with an optional byte-level tokenizer: the models unit
tests convert, train and evaluate. The conftests import it (pytest puts this folder on sys.path)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

CONFIG_CLASSES = {
    "llama": "LlamaConfig",
    "mistral": "MistralConfig",
    "ministral": "MinistralConfig",
    "qwen2": "Qwen2Config",
    "qwen3": "Qwen3Config",
    "phi3": "Phi3Config",
    "olmo": "OlmoConfig",
    "olmo2": "Olmo2Config",
    "gemma2": "Gemma2Config",
    "gemma3_text": "Gemma3TextConfig",
    "gpt_neox": "GPTNeoXConfig",
    "deepseek_v3": "DeepseekV3Config",
}
# The tokenizer's special tokens take the first ids, as the models' config says; the 256 bytes follow.
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}
SHAPE = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=2, vocab_size=300, max_position_embeddings=256,
    pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
)
# The MLA layout conversions write: queries not compressed, a 16-dim latent and an 8-dim shared rope key.
MLA_LAYOUT = dict(q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)


def byte_level_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A fast tokenizer with one token per byte (no merges), so any text tokenizes without a download."""
    symbols = [*SPECIAL_TOKENS.values(), *sorted(pre_tokenizers.ByteLevel.alphabet())]
    vocab = {symbol: i for i, symbol in enumerate(symbols)}
    tokenizer = Tokenizer(models.BPE(vocab, [], unk_token=SPECIAL_TOKENS["pad_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)


def build_tiny_model(
    model_type: str = "llama", num_heads: int = 4, num_kv_heads: int = 4, seed: int = 0, **overrides
) -> transformers.PreTrainedModel:
    """A small random model of a stock transformers class, float32, eval mode. `overrides` are config fields;
    "deepseek_v3" gives a dense MLA model (every layer a plain MLP)."""
    settings = {**SHAPE, "num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads, **overrides}
    if model_type == "gpt_neox":  # its config has no KV head count: every head has its own key and value
        del settings["num_key_value_heads"]
    if model_type == "deepseek_v3":  # DeepseekV3 derives head_dim from its MLA dims
        settings = {**MLA_LAYOUT, "first_k_dense_replace": settings["num_hidden_layers"], **settings}
    else:
        settings.setdefault("head_dim", settings["hidden_size"] // num_heads)
    config = getattr(transformers, CONFIG_CLASSES[model_type])(**settings)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def save_tiny_checkpoint(
    folder: Path,
    model_type: str = "llama",
    num_heads: int = 4,
    num_kv_heads: int = 4,
    *,
    dtype: torch.dtype = torch.float32,
    shard_size: str | None = None,
    edit: Callable[[transformers.PreTrainedModel], None] | None = None,
    tokenizer: bool = False,
    **overrides,
) -> Path:
    """Save build_tiny_model(...) to `folder`: changed by `edit` (under no_grad), cast to `dtype`, sharded at
    `shard_size`, with the byte-level tokenizer if `tokenizer`. Returns the folder."""
    model = build_tiny_model(model_type, num_heads, num_kv_heads, **overrides)
    if edit is not None:
        with torch.no_grad():
            edit(model)
    model.to(dtype).save_pretrained(folder, **({"max_shard_size": shard_size} if shard_size else {}))
    if tokenizer:
        byte_level_tokenizer().save_pretrained(folder)
    return folder
