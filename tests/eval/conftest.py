"""Tiny random models (MHA, GQA, MLA) with a byte-level tokenizer, built offline once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_checkpoints import save_tiny_checkpoint

# Head dim 8 and a 1024-token window (the sizes test_kv checks), and a tokenizer for lm-eval.
EVAL_OPTIONS = dict(hidden_size=32, intermediate_size=64, max_position_embeddings=1024, tokenizer=True)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """{"mha": ..., "gqa": ..., "mla": ...}: saved tiny random models that stock transformers loads."""
    root = tmp_path_factory.mktemp("tiny")
    return {
        "mha": save_tiny_checkpoint(root / "mha", "llama", 4, 4, **EVAL_OPTIONS),
        "gqa": save_tiny_checkpoint(root / "gqa", "llama", 4, 2, **EVAL_OPTIONS),
        "mla": save_tiny_checkpoint(root / "mla", "deepseek_v3", 4, 4, **EVAL_OPTIONS),
    }


@pytest.fixture(scope="session", autouse=True)
def suite_cache(tmp_path_factory):
    """Build the offline suite in the session's temp folder, not in the user's cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()
