"""mha-to-gqa / mha-to-mqa on tiny stock checkpoints: the output loads in the source class and is exact where it must
be."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from kvshrink.convert.mha_to_gqa import mha_to_gqa
from kvshrink.convert.options import GqaOptions

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "phi3"]


def _kv_parts(model):
    """(k weight, v weight, k bias, v bias) of every layer, fused or not."""
    for layer in model.model.layers:
        attention = layer.self_attn
        if hasattr(attention, "qkv_proj"):
            q_rows = attention.config.num_attention_heads * attention.head_dim
            kv_rows = (attention.qkv_proj.weight.shape[0] - q_rows) // 2
            k, v = attention.qkv_proj.weight[q_rows:].split(kv_rows)
            yield k, v, None, None
        else:
            yield (attention.k_proj.weight, attention.v_proj.weight,
                   attention.k_proj.bias, attention.v_proj.bias)


def _logits(folder_or_model, tokens):
    model = folder_or_model
    if not isinstance(model, torch.nn.Module):
        model = AutoModelForCausalLM.from_pretrained(folder_or_model, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits


TOKENS = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_output_loads_as_source_class_with_fewer_kv_heads(tiny_checkpoint, tmp_path, model_type, dtype):
    source = tiny_checkpoint(model_type, num_heads=4, num_kv_heads=4, dtype=dtype, shard_size="40KB")
    assert (source / "model.safetensors.index.json").exists()
    report = mha_to_gqa(source, tmp_path / "out", GqaOptions(groups=2, method="mean", check=False, progress=False))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(model).__name__ == json.loads((source / "config.json").read_text())["architectures"][0]
    assert model.config.num_key_value_heads == 2
    assert next(model.parameters()).dtype == dtype
    assert report["kv_bytes_per_token"]["target"] * 2 == report["kv_bytes_per_token"]["source"]
    model(input_ids=TOKENS)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_kv_weights_are_group_means(tiny_checkpoint, tmp_path, model_type):
    source = tiny_checkpoint(model_type, num_heads=4, num_kv_heads=4)
    mha_to_gqa(source, tmp_path / "out", GqaOptions(groups=2, method="mean", check=False, progress=False))
    before = AutoModelForCausalLM.from_pretrained(source)
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    for old, new in zip(_kv_parts(before), _kv_parts(after)):
        for old_part, new_part in zip(old, new):
            if old_part is None:
                assert new_part is None
                continue
            expected = old_part.reshape(2, 2, old_part.shape[0] // 4, *old_part.shape[1:]).mean(1)
            torch.testing.assert_close(new_part, expected.reshape(new_part.shape), rtol=0, atol=1e-7)


def _make_groups_identical(groups: int):
    def edit(model):
        for k, v, k_bias, v_bias in _kv_parts(model):
            for tensor in (k, v, k_bias, v_bias):
                if tensor is None:
                    continue
                heads = model.config.num_key_value_heads
                per_head = tensor.data.reshape(groups, heads // groups, tensor.shape[0] // heads, *tensor.shape[1:])
                per_head[:] = per_head[:, :1].clone()

    return edit


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize(("kv_heads", "groups"), [(4, 2), (4, 1), (2, 1)])
def test_identical_heads_merge_losslessly(tiny_checkpoint, tmp_path, model_type, kv_heads, groups):
    source = tiny_checkpoint(model_type, num_heads=4, num_kv_heads=kv_heads, edit=_make_groups_identical(groups))
    mha_to_gqa(source, tmp_path / "out", GqaOptions(groups=groups, method="mean", check=False, progress=False))
    torch.testing.assert_close(_logits(tmp_path / "out", TOKENS), _logits(source, TOKENS), rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_groups_equal_to_kv_heads_is_bit_identical(tiny_checkpoint, tmp_path, dtype):
    source = tiny_checkpoint("qwen2", num_heads=4, num_kv_heads=2, dtype=dtype)
    mha_to_gqa(source, tmp_path / "out", GqaOptions(groups=2, method="mean", check=False, progress=False))
    before, after = load_file(source / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name


def test_output_shards_follow_the_size_limit_and_index(tiny_checkpoint, tmp_path):
    source = tiny_checkpoint("llama")
    mha_to_gqa(
        source, tmp_path / "out",
        GqaOptions(groups=1, method="mean", check=False, progress=False, out_shard_size="30KB")
    )
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((tmp_path / "out" / shard).exists() for shard in shards)
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for shard in shards for t in load_file(tmp_path / "out" / shard).values()
    )
    torch.testing.assert_close(
        _logits(tmp_path / "out", TOKENS), _logits(tmp_path / "out", TOKENS)
    )  # loads through the index


def test_report_records_groups_errors_and_parameters(tiny_checkpoint, tmp_path):
    source = tiny_checkpoint("llama", num_heads=4, num_kv_heads=4)
    report = mha_to_gqa(source, tmp_path / "out", GqaOptions(groups=2, method="mean", check=False, progress=False))
    saved = json.loads((tmp_path / "out" / "kvshrink_report.json").read_text())
    assert saved == report
    assert report["method"] == "gqa/mean"
    assert report["source_heads"] == {"query": 4, "kv": 4} and report["target_heads"] == {"query": 4, "kv": 2}
    assert [layer["groups"] for layer in report["layers"]] == [[[0, 1], [2, 3]]] * 2
    assert all(0 < layer["k_rel_error"] < 1.5 and 0 < layer["v_rel_error"] < 1.5 for layer in report["layers"])
    assert "model.layers.1.self_attn.k_proj.weight" in report["new_parameters"]
    assert report["kv_fraction"] == 0.5
    assert {"kvshrink", "torch", "transformers"} <= set(report["versions"])
    assert report["elapsed_seconds"] >= 0
