"""`convert add-linear-attention`: Mamba-2 mixers in place of chosen attention layers, in GraniteMoeHybrid."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from tiny_checkpoints import byte_level_tokenizer
from transformers import AutoModelForCausalLM

from kvshrink.convert.cli import convert_cli
from kvshrink.convert.corpora import corpus_text
from kvshrink.convert.fitting import UNCHANGED
from kvshrink.convert.kvcache import kv_bytes_at_context, recurrent_state_bytes
from kvshrink.convert.linear import mamba2
from kvshrink.convert.linear_attention import add_linear_attention
from kvshrink.convert.options import LinearAttentionOptions

QUICK = dict(check=False, progress=False, calibration_tokens=2048, fit_steps=24)
SHARP = dict(tokenizer=True, initializer_range=0.15, max_position_embeddings=512, num_hidden_layers=4)
IDS = torch.randint(0, 200, (2, 48), generator=torch.Generator().manual_seed(0))
# held-out text neither calibration nor the fit sees, as the tiny models' byte tokens
HELD_OUT = torch.tensor(
    byte_level_tokenizer()(corpus_text("pydoc", "heldout")[:2048])["input_ids"][:1024]
).reshape(4, 256)


def _logits(folder, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(input_ids=ids).logits


def _weights(folder) -> dict[str, torch.Tensor]:
    return {name: tensor for path in folder.glob("*.safetensors") for name, tensor in load_file(path).items()}


@pytest.fixture(scope="module")
def half_linear(tmp_path_factory):
    """A 4-layer Llama (4 query / 2 KV heads) with half its layers linearized, fitted, and the same with --fit none."""
    from tiny_checkpoints import save_tiny_checkpoint

    folder = tmp_path_factory.mktemp("linear")
    source = save_tiny_checkpoint(folder / "source", "llama", 4, 2, **SHARP)
    fitted = add_linear_attention(source, folder / "fitted", LinearAttentionOptions(**QUICK))
    closed = add_linear_attention(source, folder / "closed", LinearAttentionOptions(**{**QUICK, "fit": "none"}))
    return source, folder, fitted, closed


# Phi-3's 128k variants as their config.json has them: longrope factors in rope_scaling, the pretrained length at the
# top level (the long factors and an attention scale of sqrt(1 + ln(512/128) / ln(128)) apply past it)
LONGROPE = {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [1.5 + i / 8 for i in range(8)]}
PAST_ORIGINAL = torch.randint(0, 200, (1, 300), generator=torch.Generator().manual_seed(1))


def _with_hub_longrope(source):
    config = json.loads((source / "config.json").read_text())
    config.pop("rope_parameters", None)
    config.update(rope_scaling={"type": "longrope", **LONGROPE}, rope_theta=10000.0,
                  original_max_position_embeddings=128)
    (source / "config.json").write_text(json.dumps(config))
    loaded = AutoModelForCausalLM.from_pretrained(source).config.rope_parameters
    assert loaded["rope_type"] == "longrope" and loaded["original_max_position_embeddings"] == 128
    return source


@pytest.mark.parametrize(("model_type", "longrope"), [("llama", False), ("mistral", False), ("ministral", False),
                                                      ("qwen2", False), ("phi3", False), ("phi3", True)])
def test_with_no_layer_linearized_the_hybrid_class_computes_the_source_logits(tiny_checkpoint, tmp_path, model_type,
                                                                              longrope):
    source = tiny_checkpoint(model_type, 4, 2, **SHARP)
    source = _with_hub_longrope(source) if longrope else source
    report = add_linear_attention(source, tmp_path / "out", LinearAttentionOptions(linear_layers="0", **QUICK))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert type(model).__name__ == "GraniteMoeHybridForCausalLM" and report["linear_attention"]["linear_layers"] == []
    ids = PAST_ORIGINAL if longrope else IDS
    assert torch.equal(_logits(tmp_path / "out", ids), _logits(source, ids))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["layer_types"] == ["attention"] * 4 and config["num_local_experts"] == 0


def test_phi3_fused_projections_become_the_kept_layers_q_k_v_and_the_mixers(tiny_checkpoint, tmp_path):
    source = tiny_checkpoint("phi3", 4, 2, **SHARP)
    options = LinearAttentionOptions(linear_layers="1,3", **{**QUICK, "fit": "none"})
    report = add_linear_attention(source, tmp_path / "out", options)
    written, original = _weights(tmp_path / "out"), _weights(source)
    for layer in (0, 2):  # attention kept: q/k/v are the row blocks of qkv_proj (4 query, 2 KV heads of 16)
        qkv = original[f"model.layers.{layer}.self_attn.qkv_proj.weight"]
        for part, rows in (("q_proj", slice(0, 64)), ("k_proj", slice(64, 96)), ("v_proj", slice(96, 128))):
            assert torch.equal(written[f"model.layers.{layer}.self_attn.{part}.weight"], qkv[rows])
        assert report["layers"][layer]["mixer"] == "attention"
    assert [report["layers"][layer]["mixer"] for layer in (1, 3)] == ["mamba2", "mamba2"]
    for layer in range(4):
        gate_up = original[f"model.layers.{layer}.mlp.gate_up_proj.weight"]
        assert torch.equal(written[f"model.layers.{layer}.shared_mlp.input_linear.weight"], gate_up)
    assert not any("qkv_proj" in name or "gate_up_proj" in name for name in written)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    generated = model.generate(IDS[:1, :12], max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert torch.equal(generated[:, :12], IDS[:1, :12]) and generated.shape == (1, 18)


def test_explicit_layers_and_even_choice(tiny_checkpoint, tmp_path):
    source = tiny_checkpoint("llama", 4, 2, **SHARP)
    explicit = add_linear_attention(source, tmp_path / "explicit",
                                    LinearAttentionOptions(linear_layers="1,3", **{**QUICK, "fit": "none"}))
    even = add_linear_attention(source, tmp_path / "even",
                                LinearAttentionOptions(layer_choice="even", **{**QUICK, "fit": "none"}))
    assert explicit["linear_attention"]["linear_layers"] == [1, 3]
    assert explicit["linear_attention"]["layer_choice"] == "explicit"
    assert even["linear_attention"]["linear_layers"] == [0, 2]
    assert sorted(even["linear_attention"]["closed_form_residual_error"]) == ["0", "2"]  # only the chosen calibrated


def test_bytes_held_at_context_count_the_state_once_and_no_tokens_for_mixers():
    config = {"num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 32,
              "head_dim": 8, "dtype": "bfloat16", "layer_types": ["mamba", "attention", "mamba", "attention"],
              "mamba_n_heads": 4, "mamba_d_head": 8, "mamba_d_state": 8, "mamba_n_groups": 4, "mamba_d_conv": 4}
    state = 2 * (4 * 8 * 8 * 4 + (32 + 2 * 32) * 4 * 2)
    assert recurrent_state_bytes(config) == state
    per_token = 2 * 2 * 2 * 8 * 2  # two attention layers, K and V, 2 heads of 8, bf16
    assert kv_bytes_at_context(config, 1000) == pytest.approx(per_token + state / 1000)


@pytest.mark.parametrize(("model_type", "flags", "message"), [
    ("llama", ["--linear-layers", "1.5"], "--linear-layers 1.5 is outside [0, 1)"),
    ("llama", ["--linear-layers", "1.0"], "--linear-layers 1 is outside [0, 1): at least one layer must keep"),
    ("llama", ["--linear-layers", "0,1,2,3"], "names every layer, but generation needs one attention layer"),
    ("llama", ["--linear-layers", "7"], "names layer 7, but the source has layers 0-3"),
    ("llama", ["--linear-layers", "a,b"], "is not a list of distinct layer indices"),
    ("qwen3", [], "add-linear-attention cannot convert qwen3: GraniteMoeHybrid's attention has no per-head q/k"),
    ("mistral", ["--linear-layers", "0.5"], "attends within a sliding window of 64 tokens"),
    ("llama", ["--linear-layers", "0.5"], "4 heads x 12 dims is not a whole multiple of hidden size 64"),
    ("llama", ["--linear-layers", "0.5"], "the source's MLP has biases or its RoPE covers part of each head"),
])
def test_bad_input_gets_one_line_and_writes_nothing(tiny_checkpoint, tmp_path, model_type, flags, message):
    overrides = {"sliding_window": 64} if model_type == "mistral" else {"head_dim": 12} if "12 dims" in message else (
        {"mlp_bias": True} if "MLP has biases" in message else {})
    source = tiny_checkpoint(model_type, 4, 2, **{**SHARP, **overrides})
    result = CliRunner().invoke(convert_cli, ["add-linear-attention", str(source), str(tmp_path / "out"), *flags])
    assert result.exit_code != 0 and message in result.output, result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_eval_kv_measures_the_cache_and_the_mixers_state_as_the_config_says(half_linear):
    from kvshrink.eval.kv import measure_kv

    _, folder, _, _ = half_linear
    for measured in measure_kv([folder / "closed"], [12, 120], decode_tokens=1, device="cpu"):
        assert measured.bytes_held_per_token == pytest.approx(measured.bytes_held_per_token_from_config)
