"""`eval kv` measures what stock transformers really caches: equal to the config arithmetic for MHA, GQA, MLA."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, DynamicCache

from kvshrink.convert.cli import kvshrink_cli
from kvshrink.convert.kvcache import kv_bytes_at_context, kv_bytes_per_token
from kvshrink.eval.kv import CPU_CONTEXTS, GPU_CONTEXTS, default_contexts, measure_kv
from kvshrink.eval.models import check_model_dirs


def test_measured_kv_bytes_equal_theory_for_mha_gqa_and_mla(tiny_models):
    measurements = measure_kv([tiny_models[name] for name in ("mha", "gqa", "mla")], [24, 70], decode_tokens=2)
    assert [(m.model, m.context) for m in measurements] == [
        (name, context) for name in ("mha", "gqa", "mla") for context in (24, 70)
    ]
    for m in measurements:
        config = json.loads((tiny_models[m.model] / "config.json").read_text())
        assert m.bytes_held_per_token == m.bytes_held_per_token_from_config == kv_bytes_per_token(config)
        assert m.decode_tokens_per_second > 0
    per_model = {m.model: m.bytes_held_per_token for m in measurements}
    # 2 layers x float32: MHA 4 heads x 8 dims for K and V; GQA 2 heads; MLA latent 16 + rope key 8.
    assert per_model == {"mha": 2 * 4 * 2 * 4 * 8, "gqa": 2 * 4 * 2 * 2 * 8, "mla": 2 * 4 * (16 + 8)}


def test_mla_cache_holds_the_latent_and_the_shared_rope_key(tiny_models):
    model = AutoModelForCausalLM.from_pretrained(tiny_models["mla"])
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(torch.arange(10)[None], past_key_values=cache, use_cache=True)
    layer = cache.layers[0]
    assert layer.keys.shape == (1, 1, 10, model.config.kv_lora_rank)
    assert layer.values.shape == (1, 1, 10, model.config.qk_rope_head_dim)


def test_kv_command_prints_ratios_against_the_first_model(tiny_models):
    result = CliRunner().invoke(
        kvshrink_cli, ["eval", "kv", str(tiny_models["mha"]), str(tiny_models["mla"]), "--contexts", "16",
                       "--decode-tokens", "2"]
    )
    assert result.exit_code == 0, result.output
    mla_line = next(line for line in result.output.splitlines() if line.startswith("mla"))
    assert "0.375×" in mla_line  # (16 + 8) / (2 * 4 * 8)


@pytest.mark.parametrize("contexts", ["0", "512,x"])
def test_kv_command_rejects_bad_context_lists(tiny_models, contexts):
    result = CliRunner().invoke(kvshrink_cli, ["eval", "kv", str(tiny_models["mha"]), "--contexts", contexts])
    assert result.exit_code == 2 and "--contexts" in result.output


def test_kv_refuses_contexts_beyond_the_model_window(tiny_models):
    result = CliRunner().invoke(kvshrink_cli, ["eval", "kv", str(tiny_models["mha"]), "--contexts", "4096"])
    assert result.exit_code == 1 and "max_position_embeddings 1024" in result.output


def test_default_contexts_are_cut_to_every_model_s_position_limit(tiny_models):
    folders = check_model_dirs([tiny_models["mha"], tiny_models["gqa"]])  # max_position_embeddings 1024
    assert default_contexts("cpu", folders, decode_tokens=2) == (512, 1020)  # 2,048 cut to what 1,024 leaves
    assert default_contexts("cuda", folders, decode_tokens=32) == (990,)
    unlimited = [replace(folder, config={}) for folder in folders]
    assert default_contexts("cpu", unlimited, decode_tokens=2) == CPU_CONTEXTS
    assert default_contexts("cuda", unlimited, decode_tokens=2) == GPU_CONTEXTS


def test_a_window_without_layer_types_is_counted_as_transformers_caches_it(tiny_checkpoint):
    # Mistral-7B-v0.1's config.json: a sliding_window and no layer_types; DynamicCache windows every layer
    source = tiny_checkpoint("mistral", 4, 2, sliding_window=16)
    config = json.loads((source / "config.json").read_text())
    config.pop("layer_types", None)
    (source / "config.json").write_text(json.dumps(config))
    (measured,) = measure_kv([source], [40], decode_tokens=2)
    assert measured.bytes_held_per_token == measured.bytes_held_per_token_from_config
    assert measured.bytes_held_per_token == pytest.approx(kv_bytes_per_token(config) * 15 / 40)
    # Qwen2 windows only with use_sliding_window; Gemma 2's config class alternates windowed and full layers
    base = {"num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 64,
            "head_dim": 16, "sliding_window": 100}
    full = kv_bytes_per_token(base)
    assert kv_bytes_at_context({**base, "model_type": "qwen2", "use_sliding_window": False}, 1000) == full
    assert kv_bytes_at_context({**base, "model_type": "gemma2"}, 1000) == pytest.approx(full * (1000 + 99) / 2000)
