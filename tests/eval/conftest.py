"""Tiny random models (MHA, GQA, MLA) with a byte-level tokenizer, built offline once per session."""

from __future__ import annotations

from pathlib import Path

import pytest


def byte_level_tokenizer():
    """A fast tokenizer over the 256 byte symbols (no merges), so any text tokenizes without a download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {symbol: index for index, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<eos>"] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", pad_token="<eos>")


TINY = {"vocab_size": 257, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "max_position_embeddings": 1024, "eos_token_id": 256, "pad_token_id": 256}


def _save(model, tokenizer, folder: Path) -> Path:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """{"mha": ..., "gqa": ..., "mla": ...}: saved tiny random models that stock transformers loads."""
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tiny")
    tokenizer = byte_level_tokenizer()
    mla_config = DeepseekV3Config(
        **TINY, num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=8, first_k_dense_replace=TINY["num_hidden_layers"],
    )
    return {
        "mha": _save(LlamaForCausalLM(LlamaConfig(**TINY, num_key_value_heads=4)), tokenizer, root / "mha"),
        "gqa": _save(LlamaForCausalLM(LlamaConfig(**TINY, num_key_value_heads=2)), tokenizer, root / "gqa"),
        "mla": _save(DeepseekV3ForCausalLM(mla_config), tokenizer, root / "mla"),
    }


@pytest.fixture(scope="session", autouse=True)
def suite_cache(tmp_path_factory):
    """Build the offline suite in the session's temp folder, not in the user's cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()
