"""GQA/MQA merging methods: the exact transformations, each method's objective, the pipeline and the CLI."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from click.testing import CliRunner
from tiny_checkpoints import build_tiny_model

from kvshrink.convert.attention import AttentionWeights
from kvshrink.convert.calibration import AttentionInputs
from kvshrink.convert.cli import convert_cli
from kvshrink.convert.gqa import DEFAULT_METHOD, KvMerge, get_method, method_names, needs_calibration
from kvshrink.convert.gqa.attended import RotaryAttentionInputs, attended_moments
from kvshrink.convert.gqa.grouping import similar_groups
from kvshrink.convert.gqa.heads import permute_kv_heads, rotate_keys, rotate_values
from kvshrink.convert.gqa.objectives import merge_errors
from kvshrink.convert.maths import augmented, input_moment, to_complex

CALIBRATED = [name for name in method_names() if needs_calibration(name)]
TOKENS = torch.randint(3, 300, (2, 48), generator=torch.Generator().manual_seed(1))


def layer_attention(model, layer: int) -> AttentionWeights:
    attention, config = model.model.layers[layer].self_attn, model.config

    def tensor(module, name="weight"):
        value = getattr(module, name, None) if module is not None else None
        return None if value is None else value.detach().clone().float()

    return AttentionWeights(
        q=tensor(attention.q_proj), k=tensor(attention.k_proj), v=tensor(attention.v_proj), o=tensor(attention.o_proj),
        num_heads=config.num_attention_heads, num_kv_heads=config.num_key_value_heads, head_dim=config.head_dim,
        q_bias=tensor(attention.q_proj, "bias"), k_bias=tensor(attention.k_proj, "bias"),
        v_bias=tensor(attention.v_proj, "bias"), o_bias=tensor(attention.o_proj, "bias"),
        q_norm=tensor(getattr(attention, "q_norm", None)), k_norm=tensor(getattr(attention, "k_norm", None)),
    )


def with_attention(model, attentions: list[AttentionWeights]):
    """A stock model of the same class whose attention layers hold `attentions` (KV heads may be fewer)."""
    config = copy.deepcopy(model.config)
    config.num_key_value_heads = attentions[0].num_kv_heads
    rebuilt = type(model)(config).eval()
    state = {k: v for k, v in model.state_dict().items() if ".k_proj." not in k and ".v_proj." not in k}
    rebuilt.load_state_dict(state, strict=False)
    with torch.no_grad():
        for layer, attention in zip(rebuilt.model.layers, attentions):
            module = layer.self_attn
            for part in ("q", "k", "v", "o"):
                projection = getattr(module, f"{part}_proj")
                projection.weight.copy_(getattr(attention, part))
                if projection.bias is not None:
                    projection.bias.copy_(getattr(attention, f"{part}_bias"))
    return rebuilt


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


def calibration_stats(model) -> list[AttentionInputs]:
    """Every layer's attention inputs on random tokens, as collect_statistics records them."""
    captured: list[torch.Tensor] = []
    handles = [
        layer.self_attn.q_proj.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach()))
        for layer in model.model.layers
    ]
    tokens = torch.randint(3, 300, (4, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model(input_ids=tokens)
    for handle in handles:
        handle.remove()
    return [AttentionInputs(inputs) for inputs in captured]


FAMILIES = ["llama", "qwen2", "qwen3"]  # plain; q/k/v biases; per-head q_norm/k_norm


def tiny(model_type="llama"):
    """8 query heads on 4 KV heads of 16 dims (8 rotary pairs each)."""
    return build_tiny_model(model_type, 8, 4, head_dim=16)


def tie_heads(model, groups: list[list[int]], noise: float = 0.0, twist: bool = False) -> None:
    """Make the KV heads of each group copies of its first head — optionally rotated exactly (the model's function
    changes, but an aligning method can undo it) and perturbed by `noise` times the weights' spread."""
    generator = torch.Generator().manual_seed(3)
    d = model.config.head_dim
    with torch.no_grad():
        for layer in model.model.layers:
            attention = layer.self_attn
            for projection in (attention.k_proj, attention.v_proj):
                for members in groups:
                    first = projection.weight[members[0] * d : (members[0] + 1) * d].clone()
                    for head in members[1:]:
                        rows = first.clone()
                        if twist and projection is attention.k_proj:
                            angles = torch.rand(d // 2, generator=generator) * 6.283
                            pairs = (
                                torch.complex(rows[: d // 2], rows[d // 2 :])
                                * torch.polar(torch.ones(d // 2), angles)[:, None]
                            )
                            rows = torch.cat([pairs.real, pairs.imag])
                        elif twist:
                            rows = torch.linalg.qr(torch.randn(d, d, generator=generator))[0] @ rows
                        noisy = rows + noise * rows.std() * torch.randn(rows.shape, generator=generator)
                        projection.weight[head * d : (head + 1) * d] = noisy
                    if projection.bias is not None:
                        for head in members[1:]:
                            projection.bias[head * d : (head + 1) * d] = projection.bias[
                                members[0] * d : (members[0] + 1) * d
                            ]


# ---------------------------------------------------------------- exact transformations


@pytest.mark.parametrize("model_type", FAMILIES)
def test_permuting_kv_heads_with_their_queries_keeps_every_logit(model_type):
    model = tiny(model_type)
    permuted = [permute_kv_heads(layer_attention(model, i), [2, 0, 3, 1]) for i in range(2)]
    assert not torch.equal(permuted[0].q, layer_attention(model, 0).q)
    torch.testing.assert_close(logits(with_attention(model, permuted)), logits(model), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_complex_key_gains_and_value_rotations_keep_every_logit(model_type):
    model = tiny(model_type)
    generator = torch.Generator().manual_seed(4)
    rotated = []
    for i in range(2):
        attention = layer_attention(model, i)
        gains = torch.polar(0.5 + torch.rand(4, 8, generator=generator), torch.rand(4, 8, generator=generator) * 6.283)
        rotations = torch.linalg.qr(torch.randn(4, 16, 16, generator=generator, dtype=torch.float64))[0]
        rotated.append(rotate_values(rotate_keys(attention, gains.to(torch.complex128)), rotations))
    assert not torch.allclose(rotated[0].k, layer_attention(model, 0).k)
    torch.testing.assert_close(logits(with_attention(model, rotated)), logits(model), atol=2e-5, rtol=1e-5)


def test_value_rotations_keep_every_logit_with_per_head_norms():
    model = tiny("qwen3")
    rotations = torch.linalg.qr(
        torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    )[0]
    rotated = [rotate_values(layer_attention(model, i), rotations) for i in range(2)]
    torch.testing.assert_close(logits(with_attention(model, rotated)), logits(model), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("groups", [2, 1])
@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("method", method_names())
def test_identical_heads_merge_losslessly(method, model_type, groups):
    model = tiny(model_type)
    # Heads 0 and 2 (and 1 and 3) are copies: the stock grouping (0,1),(2,3) would lose, grouping must not.
    tie_heads(model, [[0, 1, 2, 3]] if groups == 1 else ([[0, 1], [2, 3]] if method == "mean" else [[0, 2], [1, 3]]))
    stats = calibration_stats(model)
    merged = [get_method(method)(layer_attention(model, i), groups, stats[i]) for i in range(2)]
    assert merged[0].attention.num_kv_heads == groups
    torch.testing.assert_close(
        logits(with_attention(model, [m.attention for m in merged])), logits(model), atol=5e-5, rtol=1e-4
    )


# ---------------------------------------------------------------- objectives


def test_objectives_match_their_definition_on_the_calibration_tokens():
    model = tiny("qwen2")
    stats = calibration_stats(model)[0]
    source = layer_attention(model, 0)
    merge = get_method("mean")(source, 2, stats)
    x = torch.cat([stats.flat_inputs.double(), torch.ones(stats.flat_inputs.shape[0], 1, dtype=torch.float64)], dim=1)
    d, order = 16, torch.arange(8)
    # Logits: every pair of tokens (m, n), every query head and rotary pair, as complex bilinear forms.
    forms = []
    for attention in (source, merge.attention):
        queries = to_complex(augmented(attention.q, attention.q_bias), d)  # [H, J, c]
        keys = to_complex(augmented(attention.k, attention.k_bias), d)[order // attention.queries_per_kv_head]
        forms.append(torch.einsum("hjc,mc,hjd,nd->hjmn", queries, x.to(queries.dtype), keys.conj(), x.to(keys.dtype)))
    logit = float((forms[0] - forms[1]).abs().pow(2).sum() / forms[0].abs().pow(2).sum())
    # Values: each query head's o_proj output of its KV head's value, per token.
    outputs = []
    for attention in (source, merge.attention):
        values = (x @ augmented(attention.v, attention.v_bias).T).reshape(-1, attention.num_kv_heads, d)
        per_query = values.repeat_interleave(attention.queries_per_kv_head, dim=1)  # [tokens, H, d]
        o = attention.o.double().reshape(-1, 8, d)
        outputs.append(torch.einsum("thd,ohd->tho", per_query, o))
    value = float((outputs[0] - outputs[1]).pow(2).sum() / outputs[0].pow(2).sum())
    errors = merge_errors(source, merge, input_moment(stats.flat_inputs))
    assert errors["logit_rel_error"] == pytest.approx(logit, rel=1e-6)
    assert errors["value_rel_error"] == pytest.approx(value, rel=1e-6)


def structured(twist: bool) -> tuple[AttentionWeights, AttentionInputs]:
    """Heads 0/2 and 1/3 are noisy copies of each other (rotated copies if `twist`); heads 0/1 are unrelated."""
    model = tiny("llama")
    tie_heads(model, [[0, 2], [1, 3]], noise=0.2, twist=twist)
    return layer_attention(model, 1), calibration_stats(model)[1]


@pytest.fixture(scope="module")
def noisy_copies():
    return structured(twist=False)


@pytest.fixture(scope="module")
def rotated_copies():
    return structured(twist=True)


def errors_of_every_method(attention, stats, groups):
    moment = input_moment(stats.flat_inputs)
    return {
        name: merge_errors(attention, get_method(name)(attention, groups, stats), moment) for name in method_names()
    }


def assert_output_aware_is_best(errors):
    """output-aware is the least-squares optimum over a family that contains every other method's result."""
    for name, other in errors.items():
        assert errors["output-aware"]["logit_rel_error"] <= other["logit_rel_error"] + 1e-9, name
        assert errors["output-aware"]["value_rel_error"] <= other["value_rel_error"] + 1e-9, name


@pytest.mark.parametrize("copies", ["noisy_copies", "rotated_copies"])
def test_grouping_finds_the_heads_that_belong_together(copies, request):
    attention, stats = request.getfixturevalue(copies)
    assert similar_groups(attention, 2, input_moment(stats.flat_inputs)) == [[0, 2], [1, 3]]


def test_grouping_beats_the_stock_grouping(noisy_copies):
    errors = errors_of_every_method(*noisy_copies, groups=2)
    for objective in ("logit_rel_error", "value_rel_error"):
        assert errors["grouped"][objective] < 0.5 * errors["mean"][objective]
    assert_output_aware_is_best(errors)


@pytest.mark.parametrize("groups", [2, 1])
def test_alignment_beats_averaging_unaligned_heads(rotated_copies, groups):
    errors = errors_of_every_method(*rotated_copies, groups=groups)
    for objective in ("logit_rel_error", "value_rel_error"):
        assert errors["aligned"][objective] < 0.7 * errors["grouped"][objective]
        assert errors["aligned"][objective] < 0.7 * errors["mean"][objective]
    assert_output_aware_is_best(errors)


def rotary_stats(model) -> list[RotaryAttentionInputs]:
    inv_freq = model.model.rotary_emb.inv_freq.double()
    return [RotaryAttentionInputs(s.inputs, inv_freq) for s in calibration_stats(model)]


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_attended_moments_follow_the_stock_attention(model_type):
    model = build_tiny_model(model_type, 8, 4, head_dim=16, attn_implementation="eager")
    stats = rotary_stats(model)
    tokens = torch.randint(3, 300, (4, 64), generator=torch.Generator().manual_seed(2))  # the tokens stats saw
    with torch.no_grad():
        probabilities = model(input_ids=tokens, output_attentions=True).attentions[1]  # [windows, H, T, T]
    x = torch.cat([stats[1].inputs, torch.ones(*stats[1].inputs.shape[:2], 1)], dim=-1)
    attended = probabilities @ x[:, None]  # [windows, H, T, c]
    expected_values = torch.einsum("whtc,whte->hce", attended, attended) / (4 * 64)
    expected_keys = torch.einsum("whmn,wnc,wne->hce", probabilities, x, x) / (4 * 64)
    identity = torch.eye(x.shape[-1], dtype=torch.float64)
    values, keys = attended_moments(layer_attention(model, 1), stats[1], identity, identity)
    torch.testing.assert_close(values.float(), expected_values, atol=1e-5, rtol=2e-3)
    torch.testing.assert_close(keys.float(), expected_keys.mean(dim=0), atol=1e-5, rtol=2e-3)


def test_attended_moments_through_rows_are_the_projected_moments():
    """A merge reads the attended moments only through its source rows R: R M Rᵀ computed from the projected
    tokens (small, [rows, rows]) equals the full [hidden + 1]² moment M projected afterwards."""
    model = build_tiny_model("llama", 8, 4, head_dim=16, attn_implementation="eager")
    attention, stats = layer_attention(model, 1), rotary_stats(model)[1]
    width = stats.inputs.shape[-1] + 1
    identity = torch.eye(width, dtype=torch.float64)
    rows = torch.randn(24, width, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    full_values, full_keys = attended_moments(attention, stats, identity, identity)
    values, keys = attended_moments(attention, stats, rows, rows[:8])
    assert values.shape == (8, 24, 24) and keys.shape == (8, 8)
    for projected, full in ((values, rows @ full_values @ rows.T), (keys, rows[:8] @ full_keys @ rows[:8].T)):
        assert float((projected - full).norm() / full.norm()) < 1e-5  # float32 accumulation either way


def test_rotary_pair_covariance_equals_its_complex_definition():
    """E[z_aj conj(z_bj)] for the rotary pairs z = r + i r' of every head, computed from the real rows with the
    moment applied once, equals the definition through complex rows and a complex copy of the moment."""
    from kvshrink.convert.maths import pair_covariance, rows_pair_covariance

    generator = torch.Generator().manual_seed(3)
    heads, head_dim, width = 3, 8, 21
    rows = torch.randn(heads * head_dim, width, dtype=torch.float64, generator=generator)
    tokens = torch.randn(50, width, dtype=torch.float64, generator=generator)
    moment = tokens.T @ tokens / 50
    pairs = torch.complex(*rows.reshape(heads, 2, head_dim // 2, width).unbind(1))  # [heads, J, width]
    definition = torch.einsum("ajc,cd,bjd->jab", pairs, moment.to(torch.complex128), pairs.conj())
    for covariance in (rows_pair_covariance(rows, moment, heads, head_dim),
                       pair_covariance(rows @ moment @ rows.T, heads, head_dim)):
        assert covariance.shape == (head_dim // 2, heads, heads)
        assert torch.allclose(covariance, definition, rtol=1e-12, atol=1e-12)


def test_output_aware_does_not_depend_on_how_many_heads_are_taken_at_once(monkeypatch):
    """Wide layers are merged a few query heads at a time; chunks that split a KV head's query heads (3 of 8
    heads, 2 per KV head) must give the same merge and the same reported errors."""
    import kvshrink.convert.gqa.heads as heads

    model = tiny("llama")
    attention, stats = layer_attention(model, 1), rotary_stats(model)[1]
    whole = get_method("output-aware")(attention, 2, stats)
    monkeypatch.setattr(heads, "HEAD_CHUNK", 3)
    chunked = get_method("output-aware")(attention, 2, stats)
    for name in ("q", "k", "v", "o"):
        torch.testing.assert_close(
            getattr(chunked.attention, name), getattr(whole.attention, name), rtol=1e-6, atol=1e-7
        )
    for key in ("logit_rel_error", "value_rel_error", "attended_value_rel_error"):
        assert chunked.details[key] == pytest.approx(whole.details[key], rel=1e-9)


def test_output_aware_fits_values_to_what_attention_averages():
    model = tiny("llama")
    tie_heads(model, [[0, 2], [1, 3]], noise=0.2, twist=True)
    attention, stats = layer_attention(model, 1), rotary_stats(model)[1]
    per_token = get_method("output-aware")(attention, 1, AttentionInputs(stats.inputs))
    attended = get_method("output-aware")(attention, 1, stats)
    identity = torch.eye(stats.inputs.shape[-1] + 1, dtype=torch.float64)
    moments = attended_moments(attention, stats, identity, identity)[0]
    # Same quantity by two summation orders over float32 weights: they agree to float32 rounding (1.1e-6 apart
    # with one BLAS thread), not to 1e-6.
    assert attended.details["attended_value_rel_error"] == pytest.approx(
        merge_errors(attention, attended, input_moment(stats.flat_inputs), moments)["value_rel_error"], rel=1e-5
    )
    before = merge_errors(attention, per_token, input_moment(stats.flat_inputs), moments)["value_rel_error"]
    assert attended.details["attended_value_rel_error"] < 0.9 * before


@pytest.mark.parametrize("method", CALIBRATED)
def test_calibrated_methods_refuse_to_run_without_calibration_inputs(method):
    attention = layer_attention(tiny(), 0)
    with pytest.raises(Exception, match="needs calibration inputs"):
        get_method(method)(attention, 2, None)


def test_output_aware_says_when_per_head_norms_force_mean_keys():
    model = tiny("qwen3")
    merge: KvMerge = get_method("output-aware")(layer_attention(model, 0), 2, calibration_stats(model)[0])
    assert merge.details["key_merge"].startswith("mean")
    assert merge.details["value_rel_error"] < 1


# ---------------------------------------------------------------- pipeline and CLI


def test_help_lists_every_method_and_the_default():
    for command in ("mha-to-gqa", "mha-to-mqa"):
        result = CliRunner().invoke(convert_cli, [command, "--help"])
        assert result.exit_code == 0
        for name in method_names():
            assert name in result.output
        assert f"default: {DEFAULT_METHOD}" in " ".join(result.output.split())
        assert "--calibration-tokens" in result.output


@pytest.mark.parametrize(
    ("arguments", "message"),
    [(["--method", "median"], "Invalid value for '--method'"),
     (["--calibration-tokens", "1"], "--calibration-tokens must be at least 2")],
)
def test_cli_rejects_bad_method_options(tiny_checkpoint, tmp_path, arguments, message):
    result = CliRunner().invoke(
        convert_cli, ["mha-to-gqa", str(tiny_checkpoint()), str(tmp_path / "out"), "-g", "2", *arguments]
    )
    assert result.exit_code != 0
    assert message in result.output
    assert not (tmp_path / "out").exists()


def test_calibrated_method_without_a_tokenizer_says_what_to_do(tiny_checkpoint, tmp_path):
    result = CliRunner().invoke(
        convert_cli, ["mha-to-gqa", str(tiny_checkpoint()), str(tmp_path / "out"), "-g", "2", "--no-check"]
    )
    assert result.exit_code == 1
    error = result.output.strip().splitlines()[-1]
    assert error.startswith("Error: ") and "no usable tokenizer" in error and "--method mean" in error
    assert not (tmp_path / "out").exists()


def test_default_method_converts_and_reports_its_errors(tiny_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    source = tiny_checkpoint("qwen2", tokenizer=True, edit=lambda m: tie_heads(m, [[0, 2], [1, 3]]))
    out = tmp_path / "gqa"
    result = CliRunner().invoke(
        convert_cli, [
            "mha-to-gqa", str(source), str(out), "-g", "2", "--calibration-tokens", "256", "--check-tokens", "64",
            "--fit", "none"
        ]
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "kvshrink_report.json").read_text())
    assert report["method"] == f"gqa/{DEFAULT_METHOD}"
    assert report["calibration"]["tokens"] == 256
    for layer in report["layers"]:
        assert layer["groups"] == [[0, 2], [1, 3]]
        assert layer["logit_rel_error"] < 1e-6 and layer["value_rel_error"] < 1e-6
    check = report["check"]
    assert check["converted_perplexity"] == pytest.approx(check["source_perplexity"], rel=1e-4)
    converted = AutoModelForCausalLM.from_pretrained(out)
    assert converted.config.num_key_value_heads == 2
    torch.testing.assert_close(
        logits(converted), logits(AutoModelForCausalLM.from_pretrained(source)), atol=5e-5, rtol=1e-4
    )


@pytest.mark.slow
def test_default_method_keeps_smollm2_usable_as_mqa(smollm2_mqa_dir):
    report = json.loads((smollm2_mqa_dir / "kvshrink_report.json").read_text())
    assert report["method"] == f"gqa/{DEFAULT_METHOD}"
    assert report["kv_fraction"] == pytest.approx(1 / 3)
    assert report["calibration"]["tokens"] > 0
    assert all(layer["groups"] == [[0, 1, 2]] and layer["logit_rel_error"] < 1 for layer in report["layers"])
    # Values are fitted to what attention averages, yet single tokens' o_proj output stays bounded: without the
    # single-token share, layer 18 reached 1260 times the source's output energy
    assert all(layer["attended_value_rel_error"] < 0.2 and layer["value_rel_error"] < 1 for layer in report["layers"])
    # Mean-pooling SmolLM2's 3 KV heads multiplies perplexity by about 1000; a good merge stays within 20x.
    assert report["check"]["converted_perplexity"] < 20 * report["check"]["source_perplexity"]


@pytest.mark.parametrize("method", ["output-aware", "aligned"])
def test_methods_that_fold_key_rotations_refuse_partial_rope(tiny_checkpoint, tmp_path, method):
    source = tiny_checkpoint(model_type="phi3", partial_rotary_factor=0.5)
    result = CliRunner().invoke(
        convert_cli, ["mha-to-gqa", str(source), str(tmp_path / "out"), "-g", "2", "--method", method, "--no-check"]
    )
    assert result.exit_code == 1
    assert "partial_rotary_factor" in result.output and "--method grouped or mean" in result.output
    assert not (tmp_path / "out").exists()
