"""Tiny models with a byte-level tokenizer and small recipes, so uptraining tests take seconds on two CPU cores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from tiny_checkpoints import save_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A 2-layer LlamaForCausalLM with GQA (4 heads, 2 KV heads) and tied embeddings."""
    folder = tmp_path_factory.mktemp("llama") / "model"
    return save_tiny_checkpoint(folder, "llama", 4, 2, tie_word_embeddings=True, tokenizer=True)


@pytest.fixture(scope="session")
def tiny_llama_teacher_dir(tmp_path_factory) -> Path:
    """An MHA sibling of tiny_llama_dir (4 KV heads, other weights), standing in for a conversion's source."""
    folder = tmp_path_factory.mktemp("teacher") / "model"
    return save_tiny_checkpoint(folder, "llama", 4, 4, seed=1, tie_word_embeddings=True, tokenizer=True)


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
def tiny_deepseek_dir(tmp_path_factory) -> Path:
    """A dense 2-layer DeepseekV3ForCausalLM (MLA), the stock class MLA conversions target."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("mla") / "model", "deepseek_v3", 4, 4, tokenizer=True)


@pytest.fixture(scope="session")
def mla_source_dir(tmp_path_factory) -> Path:
    """A GQA Llama (4 heads, 2 KV heads) with the byte-level tokenizer: the source of the MLA conversions."""
    folder = tmp_path_factory.mktemp("mla-source") / "model"
    return save_tiny_checkpoint(
        folder, "llama", 4, 2, tokenizer=True, initializer_range=0.15, max_position_embeddings=512
    )


@pytest.fixture(scope="session")
def mla_converted_dir(tmp_path_factory, mla_source_dir) -> Path:
    """mla_source_dir converted to MLA at half its KV cache with the default method (approximate)."""
    from kvshrink.convert.mha_to_mla import mha_to_mla
    from kvshrink.convert.options import MlaOptions

    out = tmp_path_factory.mktemp("mla-converted") / "model"
    mha_to_mla(mla_source_dir, out, MlaOptions(kv_budget=0.5, target="sglang", check=False, progress=False,
                                               calibration_tokens=1024, fit="none"))
    return out


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
