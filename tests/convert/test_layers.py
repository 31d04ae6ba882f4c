"""The layer-streamed runner: every supported family (and the MLA output class) run one stock decoder layer at a
time gives the whole model's perplexity, and corrupt tensors are named."""

from __future__ import annotations

import pytest
import torch

from kvshrink.convert.check import load_causal_lm, perplexity
from kvshrink.convert.checkpoint import open_source
from kvshrink.convert.errors import KvshrinkError
from kvshrink.convert.layers import StockModel, stream_perplexity

FAMILIES = [
    ("llama", 4, 2, {}),
    ("llama", 4, 4, {"tie_word_embeddings": True}),
    ("mistral", 4, 2, {"sliding_window": 16}),
    ("qwen2", 4, 2, {}),
    ("qwen3", 4, 2, {}),
    ("phi3", 4, 2, {}),
    ("deepseek_v3", 4, 4, {}),
]


def _windows() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(3, 300, (length,), generator=generator) for length in (64, 64, 33)]


@pytest.mark.parametrize("model_type,heads,kv_heads,overrides", FAMILIES)
def test_streamed_perplexity_equals_the_whole_model(tiny_checkpoint, model_type, heads, kv_heads, overrides):
    folder = tiny_checkpoint(model_type, heads, kv_heads, dtype=torch.bfloat16, **overrides)
    with open_source(folder) as checkpoint:
        streamed = stream_perplexity(StockModel.of_checkpoint(checkpoint, torch.device("cpu")), _windows())
    whole = perplexity(load_causal_lm(folder, "cpu"), _windows(), progress=False)
    assert streamed == pytest.approx(whole, rel=1e-5)


def test_a_tensor_holding_nan_is_refused_by_name(tiny_checkpoint):
    def corrupt(model):
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")

    folder = tiny_checkpoint("llama", 4, 2, edit=corrupt)
    with open_source(folder) as checkpoint, pytest.raises(KvshrinkError, match=r"model\.layers\.1\.mlp\.up_proj\.weight .*NaN or inf"):
        stream_perplexity(StockModel.of_checkpoint(checkpoint, torch.device("cpu")), _windows())
