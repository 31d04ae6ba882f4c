"""MLA checkpoints serving engines run: their rules, shapes snapped to what they take, numerics at servable widths,
the absorbed decode form, and the model card every output folder gets."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from kvshrink.convert import engines
from kvshrink.convert.attention import HeadCounts
from kvshrink.convert.errors import KvshrinkError
from kvshrink.convert.mha_to_gqa import mha_to_gqa
from kvshrink.convert.mha_to_mla import mha_to_mla
from kvshrink.convert.options import GqaOptions, MlaOptions
from kvshrink.convert.maths import energy, factored_energy, moment_factor
from kvshrink.convert.mla.biases import refit_without_bias
from kvshrink.convert.mla.shapes import resolve_shape

QUICK = dict(check=False, progress=False, calibration_tokens=1024, overwrite=True, fit="none")
LOUD = dict(initializer_range=0.15, max_position_embeddings=512)


@pytest.fixture
def servable_source(tiny_checkpoint):
    """head_dim 64 sources: 4 KV heads hold 512 K/V values per token (256+64 = 62.5%); 8 hold 1024."""

    def make(num_heads=4, num_kv_heads=4, model_type="llama", **kwargs):
        settings = {**LOUD, "hidden_size": 64 * num_heads, "intermediate_size": 128, **kwargs}
        return tiny_checkpoint(model_type, num_heads, num_kv_heads, tokenizer=True, **settings)

    return make


def test_errors_are_sums_of_squares_where_the_quadratic_form_rounds_below_zero():
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(513, 200, generator=generator, dtype=torch.float64) * torch.logspace(
        0, 3, 200, dtype=torch.float64
    )
    moment = inputs @ inputs.T / 200  # rank 200 of 513: calibration with fewer tokens than inputs
    basis, _ = torch.linalg.qr(inputs)
    unseen = torch.randn(64, 513, generator=generator, dtype=torch.float64)
    unseen -= unseen @ basis @ basis.T  # rows the calibration never excites: a near-exact latent's residual
    assert (energy(unseen, moment) < 0).any()  # rᵀ·moment·r of such rows rounds below zero: sqrt() failed on it
    factor = moment_factor(moment)
    typical = factored_energy(inputs.T, factor)
    assert (factored_energy(unseen, factor) >= 0).all() and factored_energy(unseen, factor).max() < 1e-9 * typical.min()
    torch.testing.assert_close(typical, energy(inputs.T, moment), rtol=1e-9, atol=0)


def test_near_full_rank_latent_at_576_converts_and_reports_small_errors(servable_source, tmp_path):
    # The reported crash: 8 heads x 64, 2 layers, --kv-budget 0.6 -> 512+64, a latent as wide as the input.
    source = servable_source(8, 8)
    report = mha_to_mla(source, tmp_path / "out", MlaOptions(kv_budget=0.6, **QUICK))
    assert (report["mla"]["kv_lora_rank"], report["mla"]["qk_rope_head_dim"]) == (512, 64)
    assert (
        report["kv_fraction"] == pytest.approx(576 / 1024)
        and report["valid_engines"] == ["transformers", "vllm", "sglang"]
    )
    for layer in report["layers"]:
        assert 0 <= layer["k_rel_error"] < 1e-3 and 0 <= layer["v_rel_error"] < 1e-3
        assert layer["latent_norm_error"] < 1e-6
    assert isinstance(AutoModelForCausalLM.from_pretrained(tmp_path / "out"), torch.nn.Module)


def test_seven_billion_width_layer_converts_at_576(tiny_checkpoint, tmp_path):
    # One Llama-3-8B-width layer (hidden 4096, 32 query heads, 8 KV heads x 128) in bfloat16, at 512+64.
    source = tiny_checkpoint("llama", 32, 8, tokenizer=True, dtype=torch.bfloat16, hidden_size=4096,
                             intermediate_size=128, num_hidden_layers=1, max_position_embeddings=512)
    report = mha_to_mla(
        source, tmp_path / "out", MlaOptions(mla_shape="512+64", **{**QUICK, "calibration_tokens": 512})
    )
    assert report["valid_engines"] == ["transformers", "vllm", "sglang"]
    layer = report["layers"][0]
    assert 0 < layer["k_rel_error"] < 1 and 0 < layer["v_rel_error"] < 1 and layer["latent_norm_error"] < 1e-6
    assert all(math.isfinite(value) for value in (layer["k_rel_error"], layer["v_rel_error"]))


@pytest.mark.parametrize(
    ("layout", "options", "message"),
    [
        ((4, 4), dict(kv_budget=0.5), r"^--kv-budget 0.5 has no shape vllm runs: this source reaches 256\+64 \(62.5% "
        r"KV\); "
                                      r"pass --kv-budget 0.625 or more, or --target transformers$"),
        ((4, 4), dict(mla_shape="160+32"), r"^--mla-shape 160\+32: vllm's MLA kernels take a 64-dim rope key; "
                                           r"servable shapes for this source: 256\+64 \(62.5% KV\)"),
        ((4, 4), dict(mla_shape="200+64"), r"^--mla-shape 200\+64 has no vllm backend: servable shapes for this source "
                                           r"are 256\+64 \(62.5% KV\); pass one of them, or --target transformers"),
        ((4, 4), dict(kv_rank="full"), r"^--kv-rank full has no vllm backend: servable shapes .* 256\+64"),
        ((4, 4), dict(kv_rank=256, rope_dim=32), r"^--rope-dim 32: vllm's MLA kernels take a 64-dim rope key"),
        ((3, 3), dict(kv_budget=0.9), r"^no shape vllm runs fits this source: 512\+64 is 576 values, not fewer than "
                                      r"the source's 384; 256\+64 needs a latent of rank 256, more than this source's "
                                      r"192; pass --target transformers$"),
        ((2, 2, dict(head_dim=256, hidden_size=128)), dict(kv_budget=0.5),
         r"^no shape vllm runs fits this source: head_dim 256 \+ rope 64 exceeds the 256 QK head dim its prefill runs"),
        ((4, 4, dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0})), dict(kv_budget=0.7),
         r"^the source's linear RoPE frequencies are neither a geometric set nor llama3's.*--target transformers$"),
    ],
    ids=["budget", "shape-rope", "shape-rank", "rank-full", "rope-dim", "no-shape", "head-dim", "rope-type"],
)
def test_vllm_target_refuses_unservable_requests_naming_the_nearest_servable_choice(
    servable_source, tmp_path, layout, options, message
):
    heads, kv_heads, *extra = layout
    source = servable_source(heads, kv_heads, **(extra[0] if extra else {}))
    with pytest.raises(KvshrinkError, match=message):
        mha_to_mla(source, tmp_path / "out", MlaOptions(**{**QUICK, **options}))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("head_dim", "rope_dim", "kv_rank"), [(64, 32, 160), (128, 64, 320)])
def test_sglang_default_rope_key_is_at_most_half_a_head(head_dim, rope_dim, kv_rank):
    # SmolLM2's 64-wide heads get 160+32 at 50% KV (it trained better than 128+64), 128-wide heads DeepSeek's 64.
    counts = HeadCounts(num_heads=9, num_kv_heads=3, head_dim=head_dim, hidden_size=4096, num_layers=1)
    shape = resolve_shape(counts, MlaOptions(kv_budget=0.5, target="sglang"), engines.SGLANG, latent_inputs=4096)
    assert (shape.rope_dim, shape.kv_rank, shape.nope_dim) == (rope_dim, kv_rank, head_dim)


def test_budget_snaps_to_the_largest_servable_shape_within_it(servable_source, tmp_path):
    source = servable_source(8, 8)  # 1024 K/V values: 256+64 is 31.25%, 512+64 56.25%
    for budget, rank in ((0.4, 256), (0.99, 512)):
        report = mha_to_mla(source, tmp_path / "out", MlaOptions(kv_budget=budget, **QUICK))
        assert (report["mla"]["kv_lora_rank"], report["mla"]["qk_rope_head_dim"]) == (rank, 64)
        assert any(f"snapped to {rank}+64" in note for note in report["notes"])
    transformers = mha_to_mla(source, tmp_path / "free", MlaOptions(kv_budget=0.4, target="transformers", **QUICK))
    assert (
        transformers["kv_fraction"] == pytest.approx(0.4, abs=1e-3)
        and transformers["valid_engines"] == ["transformers"]
    )
    assert (
        "longrope" in transformers["excluded_engines"]["vllm"]
        or "rope_type" in transformers["excluded_engines"]["vllm"]
    )


def _config(**changes):
    base = dict(kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, rms_norm_eps=1e-6,
                rope_interleave=True, attention_bias=False, rope_parameters={"rope_type": "default", "rope_theta": 1e4})
    return {**base, **changes}


@pytest.mark.parametrize(
    ("changes", "vllm", "sglang"),
    [
        ({}, None, None),
        (dict(kv_lora_rank=256), None, None),
        (dict(kv_lora_rank=160, qk_rope_head_dim=32), "no MLA backend takes kv_lora_rank+rope 160+32", None),
        (dict(qk_nope_head_dim=256), "prefill cannot run QK head dim 320", "prefill cannot run QK head dim 320"),
        (dict(v_head_dim=256, qk_nope_head_dim=64), "v_head_dim 256 must not exceed 128", "v_head_dim 256"),
        (
            dict(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4}), "rewritten to deepseek_yarn",
            "deepseek_yarn"
        ),
        (dict(rope_interleave=False), "always rotates interleaved pairs", "interleaved"),
        (dict(attention_bias=True), "without biases", "without biases"),
        (dict(rms_norm_eps=1e-5), "rms_norm_eps 1e-05, transformers' at 1e-06", "rms_norm_eps"),
    ],
)
def test_engine_rules_read_a_config(changes, vllm, sglang):
    valid, excluded = engines.valid_engines(_config(**changes))
    for engine, expected in (("vllm", vllm), ("sglang", sglang)):
        if expected is None:
            assert engine in valid and engine not in excluded
        else:
            assert engine not in valid and expected in excluded[engine]
    assert valid[0] == "transformers"


def test_every_engine_rule_names_the_file_and_commit_it_was_read_from():
    table = engines.engine_rules_table()
    assert {row["engine"] for row in table} == {"vllm", "sglang"}
    for row in table:
        repo, path, *version = row["source"].split(" ")
        assert (
            repo in ("vllm-project/vllm", "sgl-project/sglang") and path.endswith(".py") and version[0].startswith("@")
        )


def test_every_output_folder_gets_a_model_card(servable_source, tmp_path):
    source = servable_source(4, 4)
    mha_to_mla(source, tmp_path / "mla", MlaOptions(kv_budget=0.7, **{**QUICK, "check": True, "check_tokens": 512}))
    card = (tmp_path / "mla" / "README.md").read_text()
    assert "DeepseekV3ForCausalLM" in card and "kv_lora_rank 256 + rope 64" in card and "62.5% of the source" in card
    assert "Valid in: transformers, vllm, sglang." in card and f"vllm serve {tmp_path / 'mla'}" in card
    assert "Perplexity on" in card and "`--target transformers` scores" in card
    mha_to_mla(source, tmp_path / "free", MlaOptions(kv_budget=0.5, target="transformers", **QUICK))
    card = (tmp_path / "free" / "README.md").read_text()
    assert "Valid in: transformers." in card and "- not vllm:" in card and "vllm serve" not in card
    mha_to_gqa(source, tmp_path / "gqa", GqaOptions(groups=2, method="mean", check=False, progress=False))
    card = (tmp_path / "gqa" / "README.md").read_text()
    assert "4 -> 2 KV heads" in card and "50.0% of the source" in card and "Not checked" in card


def _absorbed_attention(attention, x, cos_sin, dtype):
    """DeepseekV3 attention as serving engines decode it: W_UK folded into the query, W_UV into the output, the
    normalized latent read straight from the cache (vLLM's forward_mqa), every tensor in `dtype`."""
    config = attention.config
    heads, rank, rope = config.num_attention_heads, config.kv_lora_rank, config.qk_rope_head_dim
    nope, value = config.qk_nope_head_dim, config.v_head_dim
    x = x.to(dtype)
    # [B, H, T, nope+rope]
    q = (x @ attention.q_proj.weight.to(dtype).T).unflatten(-1, (heads, nope + rope)).transpose(1, 2)
    latent, key_rope = (x @ attention.kv_a_proj_with_mqa.weight.to(dtype).T).split([rank, rope], dim=-1)
    weight = attention.kv_a_layernorm.weight.to(dtype)
    variance = latent.float().pow(2).mean(-1, keepdim=True)  # engines' RMSNorm accumulates in float32
    cached = (latent.float() * torch.rsqrt(variance + config.rms_norm_eps)).to(dtype) * weight  # [B, T, R]
    up = attention.kv_b_proj.weight.to(dtype).unflatten(0, (heads, nope + value))  # [H, nope+v, R]
    w_uk, w_uv = up[:, :nope], up[:, nope:]
    query_latent = q[..., :nope] @ w_uk  # [B, H, T, R]
    cos, sin = (t[..., : rope // 2].repeat_interleave(2, dim=-1).to(dtype) for t in cos_sin)  # one angle per pair

    def rotate(t):  # interleaved pairs (2i, 2i+1)
        pairs = t.unflatten(-1, (rope // 2, 2))
        turned = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
        return t * cos + turned * sin

    logits = (
        query_latent @ cached[:, None].transpose(-1, -2)
        + rotate(q[..., nope:]) @ rotate(key_rope[:, None]).transpose(-1, -2)
    )
    length = x.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    probs = (logits.float() * attention.scaling).masked_fill(~causal, float("-inf")).softmax(-1).to(dtype)
    output = (probs @ cached[:, None]) @ w_uv.transpose(-1, -2)  # [B, H, T, v]
    return output.transpose(1, 2).flatten(-2) @ attention.o_proj.weight.to(dtype).T


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_absorbed_form_matches_transformers_layer(servable_source, tmp_path, dtype, tolerance):
    source = servable_source(4, 4, rms_norm_eps=1e-6)
    mha_to_mla(source, tmp_path / "out", MlaOptions(kv_budget=0.7, **QUICK))
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", dtype=torch.float32, attn_implementation="eager"
    ).eval()
    layer = model.model.layers[0]
    tokens = torch.randint(3, 259, (1, 48), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        x = layer.input_layernorm(model.model.embed_tokens(tokens))
        positions = torch.arange(tokens.shape[1])[None]
        cos, sin = model.model.rotary_emb(x, positions)
        mask = torch.full((48, 48), float("-inf")).triu(1)[None, None]
        reference, _ = layer.self_attn(hidden_states=x, position_embeddings=(cos, sin), attention_mask=mask)
        absorbed = _absorbed_attention(layer.self_attn, x, (cos[0], sin[0]), dtype).float()
        latent = layer.self_attn.kv_a_proj_with_mqa(x)[..., : model.config.kv_lora_rank].to(dtype).float()
    relative = (absorbed - reference).norm() / reference.norm()
    assert relative < tolerance, f"absorbed {dtype} differs by {relative:.2e}"
    # the latent the cache holds is tiny, so RMSNorm stays linear; bfloat16 has the range to hold it exactly enough
    rms = latent.pow(2).mean(-1).sqrt()
    assert rms.max() < 1e-2 * math.sqrt(model.config.rms_norm_eps) and rms.min() > 0


def test_bias_refit_is_the_least_squares_fit_and_exact_when_a_constant_input_exists():
    generator = torch.Generator().manual_seed(0)
    inputs = (
        torch.randn(4000, 6, generator=generator, dtype=torch.float64)
        + torch.tensor([1.0, 0, 0, 0, 0, 0], dtype=torch.float64)
    )
    rows = torch.randn(3, 7, generator=generator, dtype=torch.float64)  # [w | b]
    augmented = torch.cat([inputs, torch.ones(4000, 1, dtype=torch.float64)], dim=1)
    moment = augmented.T @ augmented / 4000
    refit, error = refit_without_bias(rows, moment, moment_factor(moment))
    wanted = augmented @ rows.T
    best = torch.linalg.lstsq(inputs, wanted).solution.T  # min over w' of Σ|w'·x - (w·x + b)|²
    torch.testing.assert_close(refit, best, rtol=1e-6, atol=1e-8)
    assert error == pytest.approx(float((inputs @ refit.T - wanted).norm() / wanted.norm()), rel=1e-6) and 0 < error < 1
    inputs[:, 0] = 0.5  # a constant channel: the bias is a multiple of it, so the refit is exact
    augmented = torch.cat([inputs, torch.ones(4000, 1, dtype=torch.float64)], dim=1)
    moment = augmented.T @ augmented / 4000
    refit, error = refit_without_bias(rows, moment, moment_factor(moment))
    assert error < 1e-4
    torch.testing.assert_close(inputs @ refit.T, augmented @ rows.T, rtol=0, atol=1e-3)


def _qwen2_biases(model):
    for layer in model.model.layers:
        for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            projection.bias.normal_(0, 0.3, generator=torch.Generator().manual_seed(3))


def test_qwen2_biases_are_refit_under_the_serving_target_and_reported(servable_source, tmp_path):
    source = servable_source(4, 4, model_type="qwen2", edit=_qwen2_biases)
    report = mha_to_mla(
        source, tmp_path / "out", MlaOptions(kv_budget=0.7, **{**QUICK, "check": True, "check_tokens": 512})
    )
    assert report["valid_engines"] == ["transformers", "vllm", "sglang"]
    assert any(note.startswith("approximate: serving engines run no attention biases") for note in report["notes"])
    for layer in report["layers"]:
        errors = layer["bias_refit_error"]
        assert set(errors) == {"query", "latent", "rope_key"} and all(0 < value < 1 for value in errors.values())
    check = report["check"]
    assert check["other_target"]["target"] == "transformers" and "serving_perplexity_cost" in check
    assert math.isfinite(check["converted_perplexity"])
    from safetensors.torch import load_file

    assert not any(name.endswith(".bias") for name in load_file(tmp_path / "out" / "model.safetensors"))
    with pytest.raises(KvshrinkError, match=r"q_proj\.bias is not zero .*drop --exact-biases to refit it"):
        mha_to_mla(source, tmp_path / "exact", MlaOptions(kv_budget=0.7, exact_biases=True, **QUICK))


LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # Llama-3.1's


def _vllm_deepseek_yarn(rope: dict, dim: int) -> torch.Tensor:
    """vLLM's deepseek_yarn inv_freq written from its rules (DeepseekScalingRotaryEmbedding): correction dims
    dim·ln(L/(2π·β))/(2 ln base), floor for beta_fast and ceil for beta_slow, clamped to [0, dim-1]; a linear ramp
    over dim/2 slots; extrapolated base^(-2i/dim) before the ramp, interpolated (/factor) after it."""
    base, factor, length = rope["rope_theta"], rope["factor"], rope["original_max_position_embeddings"]

    def correction(rotations):
        return dim * math.log(length / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction(rope["beta_fast"])), 0)
    high = min(math.ceil(correction(rope["beta_slow"])), dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low if high != low else 0.001)).clamp(0, 1)
    extrapolation = 1 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    mask = 1 - ramp
    return extrapolation / factor * (1 - mask) + extrapolation * mask


def test_llama3_rope_is_written_as_a_yarn_table_both_engines_compute_alike(servable_source, tmp_path):
    source = servable_source(4, 4, rope_parameters=LLAMA3)
    report = mha_to_mla(
        source, tmp_path / "out", MlaOptions(kv_budget=0.7, **{**QUICK, "check": True, "check_tokens": 512})
    )
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    rope = config["rope_parameters"]
    assert (
        rope["rope_type"] == "yarn" and rope["mscale"] == rope["mscale_all_dim"] == 0 and rope["attention_factor"] == 1
    )
    assert report["valid_engines"] == ["transformers", "vllm", "sglang"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    table = model.model.rotary_emb.inv_freq.double()
    assert model.model.rotary_emb.attention_scaling == 1.0
    assert model.model.layers[0].self_attn.scaling == pytest.approx((64 + 64) ** -0.5)  # no mscale either
    torch.testing.assert_close(table, _vllm_deepseek_yarn(rope, 64), rtol=1e-6, atol=0)
    # against the source's own llama3 frequencies at the kept slots: exact at both ends, bounded in between
    source_freq = AutoModelForCausalLM.from_pretrained(source).model.rotary_emb.inv_freq.double()
    wanted = source_freq[[slot["source_frequency"] for slot in report["mla"]["rope_slots"]]]
    error = (table - wanted).abs() / wanted
    torch.testing.assert_close(
        torch.tensor(report["mla"]["rope_frequency_error"], dtype=torch.float64), error, rtol=1e-4, atol=1e-6
    )
    assert error[:8].max() < 1e-6 and error[-8:].max() < 1e-6 and error.max() < 0.35
    assert any("llama3 RoPE written as deepseek_yarn" in note for note in report["notes"])
    assert "serving_perplexity_cost" in report["check"] and report["check"]["other_target"]["target"] == "transformers"
