"""Tiny models and a tiny tokenizer, so uptraining tests take seconds on two CPU cores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

VOCAB = 320


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer with a few hundred tokens, trained on pydoc's train split."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from kvshrink.convert.corpora import corpus_text

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator([corpus_text("pydoc", "train")[:200_000]], trainer)
    folder = tmp_path_factory.mktemp("tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>").save_pretrained(folder)
    return folder


def _save(model, tokenizer_dir: Path, folder: Path) -> Path:
    from transformers import AutoTokenizer

    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A 2-layer LlamaForCausalLM with GQA (4 heads, 2 KV heads) and tied embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, max_position_embeddings=256,
        eos_token_id=0, pad_token_id=0, bos_token_id=None,
    )
    return _save(LlamaForCausalLM(config), tiny_tokenizer_dir, tmp_path_factory.mktemp("llama") / "model")


@pytest.fixture(scope="session")
def tiny_llama_teacher_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """An MHA sibling of tiny_llama_dir (4 KV heads), standing in for a conversion's source."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, head_dim=16, tie_word_embeddings=True, max_position_embeddings=256,
        eos_token_id=0, pad_token_id=0, bos_token_id=None,
    )
    return _save(LlamaForCausalLM(config), tiny_tokenizer_dir, tmp_path_factory.mktemp("teacher") / "model")


@pytest.fixture(scope="session")
def tiny_converted_dir(tmp_path_factory, tiny_llama_dir) -> Path:
    """tiny_llama_dir plus the kvshrink_report.json a conversion writes, listing its new tensors."""
    import shutil

    folder = tmp_path_factory.mktemp("converted") / "model"
    shutil.copytree(tiny_llama_dir, folder)
    new = [f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(2) for p in ("k", "v")]
    (folder / "kvshrink_report.json").write_text(json.dumps({"new_parameters": new}))
    return folder


@pytest.fixture(scope="session")
def tiny_deepseek_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A dense 2-layer DeepseekV3ForCausalLM (MLA), the stock class MLA conversions target."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(0)
    config = DeepseekV3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, first_k_dense_replace=2, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=16, max_position_embeddings=256, eos_token_id=0, pad_token_id=0,
        bos_token_id=None, tie_word_embeddings=False,
    )
    return _save(DeepseekV3ForCausalLM(config), tiny_tokenizer_dir, tmp_path_factory.mktemp("mla") / "model")


@pytest.fixture
def write_recipe(tmp_path):
    """Write a recipe (a small fast default, updated with the given keys) and return its path."""

    def write(**keys) -> Path:
        recipe = {
            "output_dir": str(tmp_path / "out"),
            "max_steps": 4,
            "seq_len": 32,
            "micro_batch_size": 2,
            "data": [{"corpus": "pydoc"}],
            "validation": {"max_tokens": 512},
            "optimizer": {"lr": 1e-3},
            "log_interval": 1,
        }
        recipe.update(keys)
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe))
        return path

    return write


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each in-process run builds its own Accelerator; accelerate keeps process-wide singletons."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
