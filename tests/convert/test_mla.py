"""mha-to-mla on tiny stock checkpoints: exact where the maths allows, the layouts serving engines need, and errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, DeepseekV3ForCausalLM, DynamicCache

from kvshrink.convert.cli import convert_cli
from kvshrink.convert.errors import KvshrinkError
from kvshrink.convert import driver
from kvshrink.convert.mha_to_mla import mha_to_mla
from kvshrink.convert.options import MlaOptions, build_options

TOKENS = torch.randint(3, 259, (2, 40), generator=torch.Generator().manual_seed(1))
# Larger weights than the default init, so logits vary by several units and a wrong mapping shows.
LOUD = dict(initializer_range=0.15, max_position_embeddings=512)
QUICK = dict(check=False, progress=False, calibration_tokens=1024, overwrite=True, fit="none")


@pytest.fixture
def tiny_source(tiny_checkpoint):
    def make(model_type="llama", num_heads=4, num_kv_heads=4, **kwargs):
        return tiny_checkpoint(model_type, num_heads, num_kv_heads, tokenizer=True, **{**LOUD, **kwargs})

    return make


@pytest.fixture
def servable_source(tiny_source):
    """A small source vLLM's shapes fit: head_dim 64; 4 KV heads hold 512 K/V values per token, so 256+64 is 62.5%."""

    def make(model_type="llama", num_heads=4, num_kv_heads=4, **kwargs):
        return tiny_source(model_type, num_heads, num_kv_heads, **{"hidden_size": 64 * num_heads,
                                                                   "intermediate_size": 128, **kwargs})

    return make


def _duplicate_kv_heads(model):  # every KV head's keys = (head + 1) x KV head 0's: one component per frequency
    for layer in model.model.layers:
        attention = layer.self_attn
        keys = attention.k_proj.weight.data.view(attention.config.num_key_value_heads, attention.head_dim, -1)
        for head in range(1, keys.shape[0]):
            keys[head] = (head + 1) * keys[0]


def _load(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _logits(folder_or_model, tokens=TOKENS):
    model = _load(folder_or_model) if not isinstance(folder_or_model, torch.nn.Module) else folder_or_model
    with torch.no_grad():
        return model(input_ids=tokens).logits


def _random_biases(model):
    for layer in model.model.layers:
        for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            projection.bias.normal_(0, 0.3)


@pytest.mark.parametrize(
    ("model_type", "kv_heads", "edit"),
    [
        ("llama", 4, None), ("llama", 2, None), ("mistral", 1, None), ("qwen2", 2, _random_biases),
        ("ministral", 2, None)
    ],
    ids=["llama-mha", "llama-gqa", "mistral-mqa", "qwen2-biases", "ministral-full-attention"],
)
def test_lossless_configuration_reproduces_the_source(tiny_source, tmp_path, model_type, kv_heads, edit):
    # Ministral as add-sliding-window writes it with no layer windowed: every layer full, the window unused
    full_attention = {"layer_types": ["full_attention"] * 2} if model_type == "ministral" else {}
    source = tiny_source(model_type, 4, kv_heads, edit=edit, **full_attention)
    report = mha_to_mla(
        source, tmp_path / "out", MlaOptions(rope_dim="all", kv_rank="full", target="transformers", **QUICK)
    )
    model = _load(tmp_path / "out")
    assert isinstance(model, DeepseekV3ForCausalLM)
    config = model.config
    assert config.num_key_value_heads == config.num_attention_heads == 4
    assert config.qk_rope_head_dim == kv_heads * 16 and config.qk_nope_head_dim == 0 and config.v_head_dim == 16
    assert config.first_k_dense_replace == config.num_hidden_layers and config.rope_interleave
    assert (config.q_lora_rank is not None) == (model_type == "qwen2")  # the q bias needs the q_a_proj path
    expected = _logits(source)
    assert expected.std() > 1
    assert (_logits(model) - expected).abs().max() < 1e-3
    assert report["valid_engines"] == ["transformers"] and any("longrope" in note for note in report["notes"])
    assert all(layer["latent_norm_error"] < 1e-6 and layer["rope_energy_kept"] > 0.999 for layer in report["layers"])


def test_longrope_frequencies_are_the_source_frequencies(tiny_source, tmp_path):
    source = tiny_source("llama", 4, 2, rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    report = mha_to_mla(
        source, tmp_path / "out", MlaOptions(rope_dim="all", kv_rank="full", target="transformers", **QUICK)
    )
    model = _load(tmp_path / "out")
    source_freq = _load(source).model.rotary_emb.inv_freq.double()
    target_freq = model.model.rotary_emb.inv_freq.double()
    assert model.model.rotary_emb.attention_scaling == 1.0
    torch.testing.assert_close(target_freq.sort().values, source_freq.repeat(2).sort().values, rtol=1e-6, atol=0)
    slots = report["mla"]["rope_slots"]
    torch.testing.assert_close(
        target_freq, source_freq[[slot["source_frequency"] for slot in slots]], rtol=1e-6, atol=0
    )


@pytest.mark.parametrize("rope_dim", [4, 8, 16])
def test_serving_rope_theta_runs_each_slot_at_the_source_frequency_the_report_names(tiny_source, tmp_path, rope_dim):
    source = tiny_source("llama", 4, 2, rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    report = mha_to_mla(
        source, tmp_path / "out",
        MlaOptions(kv_budget=0.5, rope_dim=rope_dim, distance_aware=False, target="sglang", **QUICK)
    )
    model = _load(tmp_path / "out")
    assert model.config.rope_parameters["rope_type"] == "default" and model.model.rotary_emb.attention_scaling == 1.0
    target_freq = model.model.rotary_emb.inv_freq.double()
    source_freq = _load(source).model.rotary_emb.inv_freq.double()
    slots = report["mla"]["rope_slots"]
    chosen = [slot["source_frequency"] for slot in slots]
    torch.testing.assert_close(
        target_freq, torch.tensor([slot["inv_freq"] for slot in slots], dtype=torch.float64), rtol=1e-6, atol=0
    )
    torch.testing.assert_close(target_freq, source_freq[chosen], rtol=1e-6, atol=0)
    step = chosen[1] - chosen[0] if len(chosen) > 1 else 1
    assert chosen == list(range(0, step * len(chosen), step))  # geometric from frequency 1, one component each
    assert rope_dim < 16 or chosen == list(range(8))


def _deinterleave(config, tensors):
    """The same checkpoint with rope dims in rotate-half order (rope_interleave = False)."""
    rope, nope, heads = config["qk_rope_head_dim"], config["qk_nope_head_dim"], config["num_attention_heads"]
    order = torch.cat([torch.arange(0, rope, 2), torch.arange(1, rope, 2)])
    changed = dict(tensors)
    for name, tensor in tensors.items():
        if name.endswith("q_proj.weight"):
            per_head = tensor.reshape(heads, nope + rope, -1).clone()
            per_head[:, nope:] = per_head[:, nope:][:, order]
            changed[name] = per_head.reshape(tensor.shape)
        elif name.endswith("kv_a_proj_with_mqa.weight"):
            rows = tensor.clone()
            rows[-rope:] = tensor[-rope:][order]
            changed[name] = rows
    return {**config, "rope_interleave": False}, changed


@pytest.mark.parametrize("target", ["transformers", "sglang"])
def test_rope_interleave_layouts_are_equivalent(tiny_source, tmp_path, target):
    source = tiny_source("llama", 4, 2)
    mha_to_mla(source, tmp_path / "out", MlaOptions(kv_budget=0.5, target=target, **QUICK))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    tensors = load_file(tmp_path / "out" / "model.safetensors")
    flipped_config, flipped = _deinterleave(config, tensors)
    model = DeepseekV3ForCausalLM(DeepseekV3ForCausalLM.config_class(**flipped_config)).eval()
    model.load_state_dict(flipped, strict=False)
    model.tie_weights()
    torch.testing.assert_close(_logits(model), _logits(tmp_path / "out"), rtol=0, atol=1e-4)


def test_cache_holds_the_latent_and_rope_key_and_generate_and_reload_work(tiny_source, tmp_path):
    source = tiny_source("llama", 4, 2)
    report = mha_to_mla(source, tmp_path / "out", MlaOptions(kv_rank=20, rope_dim=8, target="sglang", **QUICK))
    model = _load(tmp_path / "out")
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=TOKENS, past_key_values=cache, use_cache=True)
    assert cache.layers[0].keys.shape == (2, 1, 40, 20) and cache.layers[0].values.shape == (2, 1, 40, 8)
    assert report["kv_fraction"] == pytest.approx(28 / (2 * 2 * 16))
    generated = model.generate(input_ids=TOKENS[:, :5], max_new_tokens=4, do_sample=False)
    assert generated.shape == (2, 9)
    model.save_pretrained(tmp_path / "again")
    torch.testing.assert_close(_logits(tmp_path / "again"), _logits(model), rtol=0, atol=0)


def _vllm_reference_logits(folder, tokens):
    """DeepSeek MLA as vLLM runs it, written from its rules, not from transformers' code: RoPE always interleaved
    (GPT-J style pairs (2i, 2i+1)) with default frequencies rope_theta^(-2i/D), no attention biases, the latent
    norm's eps = config.rms_norm_eps, scale (nope + rope)^-0.5. A checkpoint right in vLLM matches this."""
    config = json.loads((folder / "config.json").read_text())
    weights = load_file(folder / "model.safetensors")
    assert config["rope_parameters"]["rope_type"] == "default"
    assert not any(name.endswith(".bias") for name in weights)
    eps, heads = config["rms_norm_eps"], config["num_attention_heads"]
    rank, rope, nope, value = (
        config[k] for k in ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")
    )
    frequencies = config["rope_parameters"]["rope_theta"] ** (-torch.arange(0, rope, 2, dtype=torch.float64) / rope)
    length = tokens.shape[1]
    angle = torch.arange(length, dtype=torch.float64)[:, None] * frequencies
    phase = torch.polar(torch.ones_like(angle), angle).to(torch.complex64)  # [T, D/2]

    def norm(x, weight):
        return weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    def rotate(x):  # [..., T, D] interleaved pairs as complex numbers times e^{iωp}
        pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], rope // 2, 2).contiguous())
        return torch.view_as_real(pairs * phase).flatten(-2)

    hidden = weights["model.embed_tokens.weight"][tokens]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    for layer in range(config["num_hidden_layers"]):
        w = {name.split(f"layers.{layer}.")[1]: t for name, t in weights.items() if f"layers.{layer}." in name}
        x = norm(hidden, w["input_layernorm.weight"])
        q = (x @ w["self_attn.q_proj.weight"].T).unflatten(-1, (heads, nope + rope)).transpose(1, 2)
        latent, key_rope = (x @ w["self_attn.kv_a_proj_with_mqa.weight"].T).split([rank, rope], dim=-1)
        kv = norm(latent, w["self_attn.kv_a_layernorm.weight"]) @ w["self_attn.kv_b_proj.weight"].T
        key_nope, values = kv.unflatten(-1, (heads, nope + value)).transpose(1, 2).split([nope, value], dim=-1)
        logits = (
            q[..., :nope] @ key_nope.transpose(-1, -2)
            + rotate(q[..., nope:]) @ rotate(key_rope)[:, None].transpose(-1, -2)
        )
        probs = (logits / math.sqrt(nope + rope)).masked_fill(~causal, float("-inf")).softmax(-1)
        hidden = hidden + (probs @ values).transpose(1, 2).flatten(-2) @ w["self_attn.o_proj.weight"].T
        x = norm(hidden, w["post_attention_layernorm.weight"])
        gate, up = x @ w["mlp.gate_proj.weight"].T, x @ w["mlp.up_proj.weight"].T
        hidden = hidden + (torch.nn.functional.silu(gate) * up) @ w["mlp.down_proj.weight"].T
    head = weights.get("lm_head.weight", weights["model.embed_tokens.weight"])
    return norm(hidden, weights["model.norm.weight"]) @ head.T


@pytest.mark.parametrize(
    ("kv_heads", "options"),
    [(2, dict(kv_budget=0.5)), (4, dict(kv_budget=0.25, rope_method="partial")), (1, dict(kv_rank="full", rope_dim=16))]
)
def test_serving_layout_matches_an_independent_vllm_attention(tiny_source, tmp_path, kv_heads, options):
    exact = kv_heads == 1  # MQA, rope = head_dim, full rank: exact in the serving layout too
    source = tiny_source("llama", 4, kv_heads, rms_norm_eps=1e-6 if exact else 1e-5)
    report = mha_to_mla(source, tmp_path / "out", MlaOptions(target="sglang", **options, **QUICK))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["rope_interleave"] is True and config["attention_bias"] is False and config["rms_norm_eps"] == 1e-6
    assert report["valid_engines"] == ["transformers", "sglang"] and report["target"] == "sglang"
    assert "no MLA backend takes kv_lora_rank+rope" in report["excluded_engines"]["vllm"]
    assert exact or any("rms_norm_eps set from 1e-05 to 1e-06" in note for note in report["notes"])
    assert sum(layer["serving_rope_score_cost"] for layer in report["layers"]) >= -1e-9  # the free choice is optimal
    converted = _logits(tmp_path / "out")
    torch.testing.assert_close(_vllm_reference_logits(tmp_path / "out", TOKENS), converted, rtol=0, atol=2e-4)
    if exact:
        assert (converted - _logits(source)).abs().max() < 1e-3


def test_vllm_target_folds_no_rope_key_bias_and_refuses_what_it_cannot_carry(tiny_source, tmp_path):
    def key_bias_on_slow_pairs(model):
        for layer in model.model.layers:
            layer.self_attn.k_proj.bias.view(2, 16)[:, 7] = 0.5  # pair 7: the slowest frequency of head_dim 16

    source = tiny_source("qwen2", 4, 2, edit=key_bias_on_slow_pairs)
    mha_to_mla(
        source, tmp_path / "out", MlaOptions(kv_rank=40, rope_dim=4, target="sglang", distance_aware=False, **QUICK)
    )
    assert not any(name.endswith(".bias") for name in load_file(tmp_path / "out" / "model.safetensors"))
    torch.testing.assert_close(
        _vllm_reference_logits(tmp_path / "out", TOKENS), _logits(tmp_path / "out"), rtol=0, atol=2e-4
    )

    source = tiny_source("qwen2", 4, 2, edit=_random_biases)
    with pytest.raises(
        KvshrinkError, match=r"model\.layers\.0\.self_attn\.q_proj\.bias is not zero.*--target transformers"
    ):
        mha_to_mla(source, tmp_path / "refused", MlaOptions(kv_budget=0.5, target="sglang", exact_biases=True, **QUICK))
    assert not (tmp_path / "refused").exists()


def test_an_other_target_refusing_the_source_is_reported_not_raised(servable_source, tmp_path):
    """An o_proj bias has no place in the serving layout: with --target transformers the checked other target
    (vllm) refuses it, which the check reports; the conversion itself goes ahead."""
    def output_bias(model):
        for layer in model.model.layers:
            layer.self_attn.o_proj.bias.normal_(0, 0.1, generator=torch.Generator().manual_seed(4))

    source = servable_source("llama", 4, 4, attention_bias=True, edit=output_bias)
    checked = dict(QUICK, check=True, check_tokens=512)
    report = mha_to_mla(source, tmp_path / "out", MlaOptions(mla_shape="256+64", target="transformers", **checked))
    assert "o_proj.bias" in report["check"]["other_target"]["refused"]
    assert (tmp_path / "out" / "config.json").is_file()


def test_check_scores_both_targets_from_one_calibration_and_leaves_nothing_behind(
    servable_source, tiny_source, tmp_path, monkeypatch
):
    # Proportional KV heads: one key component per frequency, so 256+64 is exact in both layouts.
    source = servable_source("llama", 4, 4, rms_norm_eps=1e-6, edit=_duplicate_kv_heads)
    checked = dict(QUICK, check=True, check_tokens=512)
    report = mha_to_mla(source, tmp_path / "out", MlaOptions(mla_shape="256+64", target="vllm", **checked))
    check = report["check"]
    assert report["valid_engines"] == ["transformers", "vllm", "sglang"]
    assert (
        check["other_target"]["target"] == "transformers" and check["other_target"]["valid_engines"] == ["transformers"]
    )
    assert check["converted_perplexity"] == pytest.approx(check["source_perplexity"], rel=1e-4)
    assert check["other_target"]["perplexity"] == pytest.approx(check["source_perplexity"], rel=1e-4)
    assert (
        check["serving_perplexity_cost"]
        == pytest.approx(check["converted_perplexity"] - check["other_target"]["perplexity"])
    )
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out", "tiny-0"]
    assert not any(path.name.startswith(".") for path in (tmp_path / "out").iterdir())

    gqa = tiny_source("llama", 4, 2)  # head_dim 16: no shape vLLM runs
    report = mha_to_mla(
        gqa, tmp_path / "gqa", MlaOptions(rope_dim="all", kv_rank="full", target="transformers", **checked)
    )
    assert "no shape vllm runs fits this source" in report["check"]["other_target"]["refused"]
    assert "serving_perplexity_cost" not in report["check"]
    report = mha_to_mla(gqa, tmp_path / "gqa-sglang", MlaOptions(kv_budget=0.5, target="sglang", **checked))
    assert (
        report["check"]["other_target"]["target"] == "transformers"
        and report["check"]["other_target"]["perplexity"] > 1
    )

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(driver, "compare_perplexity", interrupted)
    with pytest.raises(KeyboardInterrupt):
        mha_to_mla(source, tmp_path / "interrupted", MlaOptions(kv_budget=0.7, **checked))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["gqa", "gqa-sglang", "out", "tiny-0", "tiny-1"]


def test_dropped_components_that_a_slot_key_explains_ride_on_that_slot(tiny_source, tmp_path):
    def duplicate_kv_head(model):  # KV head 1 = 2 x KV head 0: one component per frequency is all RoPE needs
        for layer in model.model.layers:
            keys = layer.self_attn.k_proj.weight.data.view(2, 16, -1)
            keys[1] = 2 * keys[0]

    source = tiny_source("llama", 4, 2, rms_norm_eps=1e-6, edit=duplicate_kv_head)
    exact = dict(rope_method="partial", rope_dim=16, kv_rank="full", target="sglang", **QUICK)
    report = mha_to_mla(source, tmp_path / "folded", MlaOptions(**exact))
    assert all(layer["folded_components"] == 8 for layer in report["layers"])  # the other head, at every frequency
    assert (_logits(tmp_path / "folded") - _logits(source)).abs().max() < 1e-3
    report = mha_to_mla(source, tmp_path / "unfolded", MlaOptions(**exact, distance_aware=False))
    assert all(layer["folded_components"] == 0 for layer in report["layers"])
    assert (_logits(tmp_path / "unfolded") - _logits(source)).abs().max() > 0.1


def test_report_records_shape_budget_and_per_layer_errors(tiny_source, tmp_path):
    source = tiny_source("llama", 4, 2)
    report = mha_to_mla(source, tmp_path / "out", MlaOptions(kv_budget=0.25, rope_dim=4, target="sglang", **QUICK))
    saved = json.loads((tmp_path / "out" / "kvshrink_report.json").read_text())
    assert saved == report and report["method"] == "mla/rotate+balanced+distance"
    assert report["mla"]["kv_lora_rank"] == 16 - 4 and report["kv_fraction"] == 0.25
    assert len(report["layers"]) == 2 and len(report["mla"]["rope_slots"]) == 2
    for layer in report["layers"]:
        assert 0 < layer["k_rel_error"] < 1 and 0 < layer["v_rel_error"] < 1
        assert 0 < layer["rope_energy_kept"] < 1 and layer["latent_norm_error"] < 1e-6
    assert "model.layers.1.self_attn.kv_b_proj.weight" in report["new_parameters"]


def test_methods_reach_their_own_objectives(tiny_source, tmp_path):
    source = tiny_source("llama", 4, 4)
    runs = {}
    for rope_method in ("partial", "rotate"):
        for factorization in ("weight", "activation"):
            runs[rope_method, factorization] = mha_to_mla(
                source, tmp_path / f"{rope_method}-{factorization}",
                MlaOptions(kv_rank=24, rope_dim=8, rope_method=rope_method, factorization=factorization,
                           distance_aware=False, target="sglang", **QUICK))["layers"]
    for layer in range(2):
        # rotation concentrates key energy: the shared rope key keeps more of it than any choice of source pairs
        assert (
            runs["rotate", "activation"][layer]["rope_energy_kept"]
            > runs["partial", "activation"][layer]["rope_energy_kept"]
        )
        # the whitened factorization minimizes the K/V output error on calibration tokens
        for rope_method in ("partial", "rotate"):
            weight, activation = runs[rope_method, "weight"][layer], runs[rope_method, "activation"][layer]
            assert (
                activation["k_rel_error"] ** 2 + activation["v_rel_error"] ** 2
                < weight["k_rel_error"] ** 2 + weight["v_rel_error"] ** 2
            )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(kv_rank=500, rope_dim=8), r"kv rank 500 is impossible here: the joint K/V latent has rank at most 64"),
        (dict(kv_rank=8, rope_dim=7), r"--rope-dim 7 must be an even number"),
        (dict(kv_rank=8, rope_dim=40, target="transformers"), r"--rope-dim 40 is more than the 32 rotary dims"),
        (dict(kv_rank=8, rope_dim=20), r"--rope-dim 20 is more than the 16 rotary dims available \(serving engines"),
        (dict(kv_rank=8, rope_dim="all"), r"--rope-dim all needs 32 rope dims .* --target transformers"),
        (dict(kv_budget=1.0), r"--kv-budget 1.0 must be a fraction of the source KV cache in \(0, 1\)"),
        (dict(kv_budget=0.0), r"--kv-budget 0.0 must be a fraction"),
        (dict(kv_budget=0.05, rope_dim=8), r"leaves no latent"),
        (dict(), r"pass exactly one of --kv-rank, --kv-budget or --mla-shape"),
        (dict(kv_rank=8, kv_budget=0.5), r"pass exactly one of .* \(got --kv-rank and --kv-budget\)"),
        (dict(mla_shape="512x64"), r"--mla-shape '512x64' is not RANK\+ROPE"),
        (dict(mla_shape="512+16"), r"kv rank 512 is impossible here"),
        (dict(kv_budget=0.5, target="vllm"), r"no shape vllm runs fits this source: head_dim 16 has 8 rotary "
                                             r"frequencies, fewer than the 32 .*pass --target transformers"),
    ],
)
def test_bad_shapes_are_refused_with_the_fix(tiny_source, tmp_path, options, message):
    source = tiny_source("llama", 4, 2)
    with pytest.raises(KvshrinkError, match=message):
        mha_to_mla(source, tmp_path / "out", MlaOptions(**{**QUICK, "target": "sglang", **options}))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(kv_rank=8, rope_method="spin"), r"option --rope-method is 'spin': choose one of rotate, partial"),
        (dict(kv_rank=8, target="tgi"), r"option --target is 'tgi': choose one of vllm, sglang, transformers"),
        (dict(kv_rank="most"), r"option --kv-rank: Input should be a valid integer.* or Input should be 'full'"),
        (dict(kv_rank=8, rope_dims=8), r"unknown option 'rope_dims': did you mean rope_dim\?"),
    ],
)
def test_bad_option_values_name_the_option(options, message):
    with pytest.raises(KvshrinkError, match=message):
        build_options(MlaOptions, options, cli=True)


def test_unsupported_sources_are_refused(tiny_source, tiny_checkpoint, tmp_path):
    fp16 = tiny_checkpoint("llama", 4, 2, dtype=torch.float16, tokenizer=True)
    with pytest.raises(KvshrinkError, match=r"float16.*save the source as bfloat16 or float32"):
        mha_to_mla(fp16, tmp_path / "out", MlaOptions(kv_budget=0.5, **QUICK))
    with pytest.raises(KvshrinkError, match=r"can only approximate qwen3 and --exact-only is set"):
        mha_to_mla(tiny_source("qwen3", 4, 2), tmp_path / "out", MlaOptions(kv_budget=0.5, exact_only=True, **QUICK))
    with pytest.raises(KvshrinkError, match=r"sliding window of 64 tokens"):
        mha_to_mla(
            tiny_source("mistral", 4, 2, sliding_window=64), tmp_path / "out", MlaOptions(kv_budget=0.5, **QUICK)
        )
    no_tokenizer = tiny_checkpoint("llama", 4, 2, seed=3)
    with pytest.raises(KvshrinkError, match=r"no usable tokenizer.*calibrates on text"):
        mha_to_mla(no_tokenizer, tmp_path / "out", MlaOptions(kv_budget=0.5, target="transformers", **QUICK))


def test_bfloat16_source_converts_to_bfloat16(tiny_source, tmp_path):
    source = tiny_source("llama", 4, 2, dtype=torch.bfloat16)
    mha_to_mla(source, tmp_path / "out", MlaOptions(rope_dim="all", kv_rank="full", target="transformers", **QUICK))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert next(model.parameters()).dtype == torch.bfloat16
    reference = _logits(source).float()
    assert (_logits(model).float() - reference).abs().max() < 0.1 * reference.abs().max()


def test_cli_converts_and_reports_errors_in_one_line(servable_source, tmp_path):
    source = servable_source("llama", 4, 4)
    runner = CliRunner()
    result = runner.invoke(convert_cli, ["mha-to-mla", str(source), str(tmp_path / "out"), "--kv-budget", "0.7",
                                         "--calibration-tokens", "1024", "--check-tokens", "512", "--fit", "none"])
    assert result.exit_code == 0, result.output
    assert "DeepseekV3ForCausalLM" in result.output and "valid in transformers, vllm, sglang" in result.output
    assert "(62.5% of the source" in result.output and "perplexity on" in result.output
    assert "--kv-budget 0.7 snapped to 256+64" in result.output
    assert (
        "--target transformers would give perplexity" in result.output and "serving constraint costs" in result.output
    )
    result = runner.invoke(convert_cli, ["mha-to-mla", str(source), str(tmp_path / "bad"), "--kv-budget", "0.5"])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert result.output.startswith(
        "Error: --kv-budget 0.5 has no shape vllm runs: this source reaches 256+64 (62.5% KV)"
    )
    result = runner.invoke(convert_cli, ["mha-to-mla", str(source), str(tmp_path / "bad"), "--kv-rank", "lots"])
    assert result.exit_code == 1 and "option --kv-rank: Input should be a valid integer" in result.output
    assert "or Input should be 'full' (got 'lots')" in result.output
    result = runner.invoke(convert_cli, ["mha-to-mla", str(source), str(tmp_path / "bad"), "--kv-budget", "2"])
    assert result.exit_code == 1 and result.output.startswith("Error: --kv-budget 2.0 must be a fraction")


def test_distance_gains_are_the_mean_rotation_under_the_source_attention():
    from kvshrink.convert.attention import AttentionWeights
    from kvshrink.convert.mla.distance import attention_distances, rotation_gains

    generator = torch.Generator().manual_seed(0)
    heads, kv_heads, d, hidden, length = 4, 2, 8, 16, 30
    attention = AttentionWeights(
        q=torch.randn(heads * d, hidden, generator=generator), k=torch.randn(kv_heads * d, hidden, generator=generator),
        v=torch.randn(kv_heads * d, hidden), o=torch.randn(hidden, heads * d), num_heads=heads,
        num_kv_heads=kv_heads, head_dim=d,
    )
    inputs = torch.randn(2, length, hidden, generator=generator)
    inv_freq = 100.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    expected = torch.zeros(heads, d // 2, dtype=torch.complex128)
    positions = torch.arange(length, dtype=torch.float64)
    for window in inputs:  # literally: softmax of RoPE'd q·k, then E[e^{iω(m - n)}] over the attention
        def rope(x):
            pairs = torch.complex(x[..., : d // 2], x[..., d // 2 :]).to(torch.complex128)
            return pairs * torch.exp(1j * positions[:, None, None] * inv_freq)

        q = rope((window @ attention.q.T).reshape(length, heads, d))
        k = rope((window @ attention.k.T).reshape(length, kv_heads, d)).repeat_interleave(2, dim=1)
        scores = torch.einsum("mhj,nhj->hmn", q, k.conj()).real / math.sqrt(d)
        probs = scores.masked_fill(~torch.ones(length, length, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
        delta = positions[:, None] - positions[None, :]
        expected += torch.einsum("hmn,mnj->hj", probs.to(torch.complex128), torch.exp(1j * delta[..., None] * inv_freq))
    distances = attention_distances(attention, inputs, inv_freq)
    torch.testing.assert_close(distances.sum(dim=1), torch.ones(heads, dtype=torch.float64))
    gains = rotation_gains(distances, inv_freq)
    torch.testing.assert_close(gains, expected / (2 * length), rtol=0, atol=1e-5)
    assert (gains.abs() <= 1 + 1e-6).all() and gains[:, -1].abs().min() > gains[:, 0].abs().max()


@pytest.mark.parametrize("factorization", ["output", "balanced"])
def test_weighted_factorizations_are_exact_at_full_rank(tiny_source, tmp_path, factorization):
    source = tiny_source("llama", 4, 2)
    mha_to_mla(
        source, tmp_path / "out",
        MlaOptions(rope_dim="all", kv_rank="full", target="transformers", factorization=factorization, **QUICK)
    )
    assert (_logits(tmp_path / "out") - _logits(source)).abs().max() < 1e-3


def test_balanced_factorization_keeps_values_that_loud_keys_would_crowd_out():
    from kvshrink.convert.mla.lowrank import joint_latent

    generator = torch.Generator().manual_seed(0)
    keys = 30 * torch.randn(8, 32, generator=generator, dtype=torch.float64)
    values = torch.randn(8, 32, generator=generator, dtype=torch.float64)
    targets, factor = torch.cat([keys, values]), torch.eye(32, dtype=torch.float64)  # the identity moment's factor
    key_rows = torch.arange(16) < 8

    def value_error(factorization):
        latent = joint_latent(targets, 8, factorization, factor, key_rows=key_rows)
        return float(((latent.up @ latent.down)[~key_rows] - values).norm() / values.norm())

    assert value_error("activation") > 0.85  # the rank all goes to the keys, 900 times louder
    assert value_error("balanced") < 0.6 * value_error("activation")
