"""The shared maths: layouts that must round-trip exactly, RoPE and RMSNorm as transformers runs them, and the
source's RoPE read from a config as transformers' rotary embedding computes it."""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma3TextConfig, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb

from kvshrink.convert.maths import (
    PER_LAYER_TYPE, augmented, augmented_inputs, augmented_moment, complex_pairs, from_complex, input_moment,
    read_source_rope, rms_norm, rotate_half_rope, split_augmented, to_complex, to_interleaved, to_rotate_half,
)

GENERATOR = torch.Generator().manual_seed(0)


def _config(**rope) -> dict:
    return LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=16, **rope).to_dict()


def test_complex_rows_round_trip_exactly_in_both_layouts():
    rows = torch.randn(3 * 8, 5, generator=GENERATOR, dtype=torch.float64)
    pairs = to_complex(rows, 8)  # [heads, d/2, n]
    assert pairs.shape == (3, 4, 5)
    assert torch.equal(from_complex(pairs), rows)
    assert torch.equal(to_rotate_half(pairs).reshape(-1, 5), rows)
    interleaved = to_interleaved(pairs)  # (Re, Im) of pair 0, then pair 1 ...
    assert torch.equal(interleaved[:, 0::2], pairs.real) and torch.equal(interleaved[:, 1::2], pairs.imag)


def test_augmented_rows_round_trip_with_and_without_bias():
    weight, bias = torch.randn(6, 4, generator=GENERATOR), torch.randn(6, generator=GENERATOR)
    assert torch.equal(augmented(weight, None)[:, -1], torch.zeros(6, dtype=torch.float64))
    assert split_augmented(augmented(weight, None), had_bias=False)[1] is None
    back_weight, back_bias = split_augmented(augmented(weight, bias), had_bias=True)
    assert torch.equal(back_weight, weight) and torch.equal(back_bias, bias)


def test_both_moment_forms_are_the_second_moment_of_the_augmented_inputs():
    inputs = torch.randn(500, 6, generator=GENERATOR)
    tokens = augmented_inputs(inputs)
    torch.testing.assert_close(input_moment(inputs), augmented_moment(tokens), rtol=1e-12, atol=1e-12)
    assert augmented_moment(tokens)[-1, -1] == 1.0


def test_rotate_half_rope_is_transformers_rope_and_a_complex_product():
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=16)
    x = torch.randn(1, 4, 7, 16, generator=GENERATOR)  # [batch, heads, positions, d]
    cos, sin = LlamaRotaryEmbedding(config)(x, torch.arange(7)[None])
    expected, _ = apply_rotary_pos_emb(x, x, cos, sin)
    half_cos, half_sin = cos[:, None, :, :8], sin[:, None, :, :8]
    assert torch.equal(rotate_half_rope(x, half_cos, half_sin), expected)
    turned = complex_pairs(x) * torch.complex(half_cos, half_sin)
    torch.testing.assert_close(torch.cat([turned.real, turned.imag], dim=-1), expected)


def test_rms_norm_is_transformers_rms_norm():
    norm = LlamaRMSNorm(16, eps=1e-5)
    norm.weight.data.normal_(1.0, 0.3, generator=GENERATOR)
    x = torch.randn(3, 16, generator=GENERATOR)
    torch.testing.assert_close(rms_norm(x, norm.weight.detach(), 0.0, 1e-5), norm(x).detach(), rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "default", "rope_theta": 500000.0},
        {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    ],
)
def test_source_rope_is_transformers_rotary_embedding(rope):
    config = _config(rope_parameters=rope, max_position_embeddings=512)
    read = read_source_rope(config, 16)
    embedding = LlamaRotaryEmbedding(LlamaConfig(**config))
    assert (read.rope_type, read.theta, read.fraction) == (rope["rope_type"], rope["rope_theta"], 1.0)
    assert read.inv_freq.dtype == torch.float64 and read.attention_scaling == embedding.attention_scaling
    torch.testing.assert_close(read.inv_freq, embedding.inv_freq.double(), rtol=1e-6, atol=0)


def test_source_rope_falls_back_to_the_top_level_then_to_transformers_default():
    old_style = {"rope_theta": 123.0, "rope_scaling": None, "partial_rotary_factor": 0.5}
    read = read_source_rope(old_style, 8)
    assert (read.rope_type, read.theta, read.fraction) == ("default", 123.0, 0.5)
    torch.testing.assert_close(read.inv_freq, 123.0 ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8))
    assert read_source_rope({}, 8).theta == 10000.0


def test_per_layer_type_rope_has_no_one_table():
    config = Gemma3TextConfig(hidden_size=64, num_attention_heads=4, head_dim=16).to_dict()
    read = read_source_rope(config, 16)
    assert read.rope_type == PER_LAYER_TYPE and read.inv_freq is None


def test_unknown_rope_type_has_no_table():
    read = read_source_rope({"rope_parameters": {"rope_type": "not-a-rope", "rope_theta": 10.0}}, 8)
    assert read.rope_type == "not-a-rope" and read.inv_freq is None
