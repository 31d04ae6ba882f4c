"""The layer-streamed runner: every supported family (and the MLA output class) run one stock decoder layer at a
time gives the whole model's perplexity, and corrupt tensors are named."""

from __future__ import annotations

import pytest
import torch

from kvshrink.convert.check import load_causal_lm, perplexity
from kvshrink.convert.checkpoint import open_source
from kvshrink.convert.errors import KvshrinkError
from kvshrink.convert.layers import HeapTrim, StockModel, stream_perplexity

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


def test_a_given_heap_trim_runs_before_each_piece_is_materialized(tiny_checkpoint):
    trims = []

    class CountingTrim(HeapTrim):
        def __call__(self) -> None:
            trims.append(None)

    with open_source(tiny_checkpoint("llama", 4, 2)) as checkpoint:
        stream_perplexity(StockModel.of_checkpoint(checkpoint, torch.device("cpu"), CountingTrim()), _windows())
    assert len(trims) == 4  # the embeddings, two decoder layers, the final norm


def test_a_tensor_holding_nan_is_refused_by_name(tiny_checkpoint):
    def corrupt(model):
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")

    folder = tiny_checkpoint("llama", 4, 2, edit=corrupt)
    with open_source(folder) as checkpoint, pytest.raises(
        KvshrinkError, match=r"model\.layers\.1\.mlp\.up_proj\.weight .*NaN or inf"
    ):
        stream_perplexity(StockModel.of_checkpoint(checkpoint, torch.device("cpu")), _windows())


def test_large_finite_float16_values_are_not_mistaken_for_corruption(tiny_checkpoint):
    """The fast finiteness check sums each tensor: a float16 sum of large finite values overflows to inf, which
    must not be taken for corrupt values."""

    def large(model):
        model.model.layers[0].post_attention_layernorm.weight.fill_(60000.0)

    folder = tiny_checkpoint("llama", 4, 2, dtype=torch.float16, edit=large)
    with open_source(folder) as checkpoint:
        tensor = checkpoint.tensor("model.layers.0.post_attention_layernorm.weight")
    assert tensor.dtype == torch.float16 and not torch.isfinite(tensor.sum())


def _live_state() -> tuple[int, int]:
    """(most real decoder layers alive at once, most tensor bytes alive at once) while a layer is written."""
    import gc
    import warnings

    layers, tensor_bytes = [0], [0]
    with warnings.catch_warnings():  # isinstance on some torch module globals warns of their deprecation
        warnings.simplefilter("ignore")
        objects = [item for item in gc.get_objects() if isinstance(item, (torch.nn.Module, torch.Tensor))]
    for item in objects:
        if isinstance(item, torch.nn.Module) and type(item).__name__.endswith("DecoderLayer"):
            if any(p.device.type != "meta" for p in item.parameters()):
                layers[0] += 1
        elif isinstance(item, torch.Tensor) and item.device.type != "meta":
            tensor_bytes[0] += item.numel() * item.element_size()
    return layers[0], tensor_bytes[0]


@pytest.mark.parametrize("converter", ["gqa", "mla"])
def test_one_layer_is_alive_at_a_time_whatever_the_depth(tiny_checkpoint, tmp_path, monkeypatch, converter):
    from kvshrink.convert import frame
    from kvshrink.convert.mha_to_gqa import mha_to_gqa
    from kvshrink.convert.mha_to_mla import mha_to_mla
    from kvshrink.convert.options import GqaOptions, MlaOptions

    seen: list[tuple[int, int]] = []
    write_layer = frame.LayerWriter.write_layer

    def observed(self, layer, tensors):
        write_layer(self, layer, tensors)
        seen.append(_live_state())

    monkeypatch.setattr(frame.LayerWriter, "write_layer", observed)
    peaks = {}
    for depth in (2, 8):
        source = tiny_checkpoint("llama", 4, 2, tokenizer=True, num_hidden_layers=depth)
        seen.clear()
        if converter == "gqa":
            mha_to_gqa(
                source, tmp_path / f"out{depth}",
                GqaOptions(groups=1, calibration_tokens=1024, check=False, progress=False, fit="none")
            )
        else:
            mha_to_mla(
                source, tmp_path / f"out{depth}",
                MlaOptions(
                    kv_budget=0.5, target="sglang", calibration_tokens=1024, check=False, progress=False, fit="none"
                )
            )
        assert max(alive for alive, _ in seen) <= 1
        peaks[depth] = max(size for _, size in seen)
    layer_bytes = 4 * (4 * 64 * 64 + 3 * 64 * 96)
    assert peaks[8] - peaks[2] < layer_bytes  # 6 more layers held would add 6 x layer_bytes


GEMMA_AND_OLMO = [
    ("gemma2", 4, 2, {"sliding_window": 16, "final_logit_softcapping": 5.0, "attn_logit_softcapping": 20.0}),
    ("gemma3_text", 4, 2, {"sliding_window": 16}),
    ("olmo", 4, 4, {}),
    ("olmo2", 4, 4, {}),
]


@pytest.mark.parametrize("model_type,heads,kv_heads,overrides", GEMMA_AND_OLMO)
def test_streamed_perplexity_equals_the_whole_model_for_the_newer_families(
    tiny_checkpoint, model_type, heads, kv_heads, overrides
):
    test_streamed_perplexity_equals_the_whole_model(tiny_checkpoint, model_type, heads, kv_heads, overrides)
