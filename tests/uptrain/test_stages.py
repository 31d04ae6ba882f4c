"""Stages: attention transfer on real (tiny) MLA conversions, the end-to-end stage continuing from it, resume
across stages, the stage rules refused before any model loads; and AdamW's size-scaled rows."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kvshrink.convert.errors import KvshrinkError
from kvshrink.convert.fitting import window_batches
from kvshrink.convert.optimizer import SizeScaledRows
from kvshrink.uptrain import load_recipe, uptrain
from kvshrink.uptrain.attention_transfer import TRANSFER_DIR

STAGES = ["attention_transfer", "end_to_end"]
TRANSFER = {"steps": 20, "sequences": 4, "micro_batch_size": 2, "lr": 1e-3}
QUICK = dict(check=False, progress=False, calibration_tokens=1024, overwrite=True, fit="none")


def _recipe(write_recipe, source: Path, model: Path, **keys):
    return load_recipe(write_recipe(**{
        "model": str(model), "teacher": str(source), "stages": STAGES, "attention_transfer": TRANSFER,
        "loss": {"kind": "distill"}, "max_steps": 2, "tracker": "csv", **keys,
    }))


def test_attention_transfer_starts_exact_on_a_lossless_conversion(tmp_path, mla_source_dir, write_recipe):
    """Rank 'full' with every rotary pair reproduces the source: the stage's inputs, masks and rotary
    embeddings are the source's own, so its starting error is float rounding."""
    from kvshrink.convert.mha_to_mla import mha_to_mla
    from kvshrink.convert.options import MlaOptions

    exact = tmp_path / "exact"
    mha_to_mla(mla_source_dir, exact, MlaOptions(rope_dim="all", kv_rank="full", target="transformers", **QUICK))
    report = uptrain(_recipe(write_recipe, mla_source_dir, exact, stages=["attention_transfer"],
                             attention_transfer={**TRANSFER, "steps": 1}))
    assert [row["layer"] for row in report["attention_transfer"]["layers"]] == [0, 1]
    assert all(row["relative_start"] < 1e-9 for row in report["attention_transfer"]["layers"])
    assert all(row["heldout_relative_start"] < 1e-9 for row in report["attention_transfer"]["layers"])


def test_attention_transfer_multiplies_in_bf16_under_precision_bf16(tmp_path, mla_source_dir, write_recipe):
    """The same lossless conversion under precision=bf16: the source layers and the fit run under bf16 autocast,
    so the starting error is bf16 rounding, above float32's and far below any conversion's."""
    from kvshrink.convert.mha_to_mla import mha_to_mla
    from kvshrink.convert.options import MlaOptions

    exact = tmp_path / "exact"
    mha_to_mla(mla_source_dir, exact, MlaOptions(rope_dim="all", kv_rank="full", target="transformers", **QUICK))
    report = uptrain(_recipe(write_recipe, mla_source_dir, exact, stages=["attention_transfer"], precision="bf16",
                             attention_transfer={**TRANSFER, "steps": 1}))
    assert all(1e-9 < row["relative_start"] < 1e-3 for row in report["attention_transfer"]["layers"])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_attention_transfer_fits_each_layer_and_the_output_holds_it(mla_source_dir, mla_converted_dir, write_recipe,
                                                                   precision):
    """Each layer's error halves at least, in bf16 too (each step's forward sees the previous step's update)."""
    recipe = _recipe(
        write_recipe, mla_source_dir, mla_converted_dir, stages=["attention_transfer"], precision=precision
    )
    report = uptrain(recipe)
    layers = report["attention_transfer"]["layers"]
    assert [row["layer"] for row in layers] == [0, 1] and report["steps"] == 0
    assert all(row["relative_end"] < 0.5 * row["relative_start"] for row in layers)
    # measured on validation blocks the fit never saw: reported apart, and above zero
    assert all(0 < row["heldout_relative_end"] and 0 < row["heldout_relative_start"] for row in layers)
    assert report["attention_transfer"]["heldout_relative_error_mean_end"] is not None
    output = Path(recipe.output_dir)
    metrics = (output / "metrics.csv").read_text()
    assert "0,attention_transfer/relative_end," in metrics and "1,attention_transfer/mse_end," in metrics
    before, after = load_file(mla_converted_dir / "model.safetensors"), load_file(output / "model.safetensors")
    transferred = {}
    for path in sorted((output / TRANSFER_DIR).glob("layer-*.safetensors")):
        transferred.update(load_file(path))
    assert set(transferred) == {n for n in before if ".self_attn." in n}
    for name in before:
        expected = transferred[name].to(before[name].dtype) if name in transferred else before[name]
        assert torch.equal(after[name], expected), name
    assert any(not torch.equal(transferred[n].to(before[n].dtype), before[n]) for n in transferred)


def test_resume_redoes_only_the_missing_layer_and_ends_bit_identical(tmp_path, mla_source_dir, mla_converted_dir,
                                                                     write_recipe):
    reference = _recipe(write_recipe, mla_source_dir, mla_converted_dir, output_dir=str(tmp_path / "reference"))
    uptrain(reference)
    recipe = _recipe(write_recipe, mla_source_dir, mla_converted_dir, output_dir=str(tmp_path / "interrupted"))
    uptrain(recipe)
    output = Path(recipe.output_dir)
    # the state of a run killed while fitting layer 1: layer 0 written, nothing of the end-to-end stage
    for path in [*output.glob(f"{TRANSFER_DIR}/layer-0001.*"), output / "checkpoints", output / "uptrain_report.json",
                 output / "model.safetensors"]:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    kept = (output / TRANSFER_DIR / "layer-0000.safetensors").stat().st_mtime_ns
    uptrain(recipe, resume=True)
    assert (output / TRANSFER_DIR / "layer-0000.safetensors").stat().st_mtime_ns == kept
    expected, actual = (
        load_file(Path(reference.output_dir) / "model.safetensors"), load_file(output / "model.safetensors")
    )
    assert all(torch.equal(expected[name], actual[name]) for name in expected)


def test_an_output_with_transferred_layers_needs_resume(mla_source_dir, mla_converted_dir, write_recipe):
    recipe = _recipe(write_recipe, mla_source_dir, mla_converted_dir, stages=["attention_transfer"],
                     attention_transfer={**TRANSFER, "steps": 1})
    uptrain(recipe)
    (Path(recipe.output_dir) / "uptrain_report.json").unlink()
    with pytest.raises(KvshrinkError, match="already holds a run: pass --resume"):
        uptrain(recipe)


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (
            {"stages": ["end_to_end", "attention_transfer"]},
            r"stages \['end_to_end', 'attention_transfer'\] are not in an order that can run"
        ),
        ({"stages": ["attention_transfer", "attention_transfer"]}, "list each once"),
        ({"stages": []}, "are not in an order that can run"),
        ({"stages": ["distill"]}, "recipe key stages.0 is 'distill': choose one of attention_transfer, end_to_end"),
        ({"teacher": None}, "stage attention_transfer needs the source model as teacher"),
        ({"stages": ["end_to_end"], "teacher": None}, "loss.kind is distill but there is no teacher"),
        ({"attention_transfer": {"steps": 0}}, "attention_transfer.steps is 0: it must be greater than 0"),
        ({"model": "no-report"}, "stage attention_transfer needs .*kvshrink_report.json, which the conversion writes"),
        ({"teacher": "other-vocabulary"}, r"teacher vocabulary \(301\) differs from the model's \(300\)"),
    ],
)
def test_bad_stage_recipes_are_refused_before_any_model_loads(tmp_path, mla_source_dir, mla_converted_dir,
                                                              write_recipe, keys, message):
    if keys.get("model") == "no-report":
        shutil.copytree(
            mla_converted_dir, tmp_path / "no-report", ignore=shutil.ignore_patterns("kvshrink_report.json")
        )
        keys = {"model": str(tmp_path / "no-report")}
    if keys.get("teacher") == "other-vocabulary":
        shutil.copytree(mla_source_dir, tmp_path / "other", ignore=shutil.ignore_patterns("*.safetensors"))
        config = json.loads((tmp_path / "other" / "config.json").read_text())
        (tmp_path / "other" / "config.json").write_text(json.dumps({**config, "vocab_size": 301}))
        keys = {"teacher": str(tmp_path / "other")}
    raw = {
        "model": str(mla_converted_dir), "teacher": str(mla_source_dir), "stages": STAGES, "loss": {"kind": "distill"}
    }
    with pytest.raises(KvshrinkError, match=message):
        load_recipe(write_recipe(**{**raw, **keys}))


def test_attention_transfer_fits_every_window_once_before_repeating_any():
    batches = window_batches(128, 2, torch.Generator().manual_seed(0))
    first_pass = [index for _ in range(64) for index in next(batches)]
    assert sorted(first_pass) == list(range(128)) and first_pass != list(range(128))
    assert sorted(index for _ in range(64) for index in next(batches)) == list(range(128))
    odd = window_batches(5, 2, torch.Generator().manual_seed(0))
    assert all(len(set(next(odd) + next(odd))) == 4 for _ in range(10))  # a pass never repeats a window
    assert sorted(next(window_batches(3, 4, torch.Generator()))) == [0, 1, 2]  # fewer windows than a batch: all of them


def test_size_scaled_rows_move_by_their_size_and_the_rest_by_plain_adam():
    """Adam's first step moves every weight by lr (its update is m / sqrt(v) = ±1); a row 1e4 times below the
    reference moves by lr x its RMS / reference instead, i.e. by the same fraction of itself."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(3, 8))
    with torch.no_grad():
        weight[1] *= 1e-4 / weight[1].pow(2).mean().sqrt()  # RMS exactly 1e-4
        weight[2] *= 1e4 / weight[2].pow(2).mean().sqrt()
    start = weight.detach().clone()
    optimizer = torch.optim.AdamW([weight], lr=1e-3, weight_decay=0.0, eps=1e-30)
    SizeScaledRows([weight], reference=1.0).attach(optimizer)
    weight.grad = torch.randn(3, 8)
    optimizer.step()
    moved = (weight.detach() - start).abs()
    torch.testing.assert_close(moved[0], torch.full((8,), 1e-3), rtol=1e-4, atol=0)
    torch.testing.assert_close(moved[1], torch.full((8,), 1e-3 * 1e-4), rtol=1e-3, atol=0)
    torch.testing.assert_close(moved[2], torch.full((8,), 1e-3 * 1e4), rtol=1e-3, atol=0)


@pytest.mark.parametrize("size_scaled", [True, False])
def test_training_every_mla_parameter_keeps_the_latent_in_range_only_with_size_scaled_rows(
    mla_converted_dir, write_recipe, size_scaled
):
    """No freeze: the linearized latent rows of kv_a_proj_with_mqa (~1e-8) survive training with size-scaled
    updates (their RMS stays within 10%), while plain AdamW multiplies them by orders of magnitude."""
    recipe = load_recipe(write_recipe(
        model=str(mla_converted_dir), trainable="all", max_steps=3,
        optimizer={"lr": 1e-3, "size_scaled_rows": size_scaled},
    ))
    uptrain(recipe)
    rank = json.loads((mla_converted_dir / "config.json").read_text())["kv_lora_rank"]
    name = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
    before = load_file(mla_converted_dir / "model.safetensors")[name][:rank].float().pow(2).mean().sqrt()
    after = load_file(Path(recipe.output_dir) / "model.safetensors")[name][:rank].float().pow(2).mean().sqrt()
    assert before < 1e-4  # the converter linearized the norm
    if size_scaled:
        assert abs(after / before - 1) < 0.1
    else:
        assert after / before > 100


def test_attention_transfer_fits_only_what_the_conversions_fit_left_unless_asked(
    tmp_path, mla_source_dir, write_recipe
):
    """The conversion's block-wise fit is the same loop: attention_transfer fits only the layers that kept an
    approximate closed form (here layer 1, where the fit found no held-out gain), is skipped when every layer was
    fitted or exact, and fits every changed layer with attention_transfer.after_fit."""
    from kvshrink.convert.mha_to_mla import mha_to_mla
    from kvshrink.convert.options import MlaOptions

    fitting = {**QUICK, "calibration_tokens": 2048, "fit": "attention", "fit_steps": 8}
    fitted = tmp_path / "fitted"
    conversion = mha_to_mla(mla_source_dir, fitted, MlaOptions(kv_budget=0.5, target="sglang", **fitting))
    assert conversion["fit"]["kept_closed_form"] == {"1": "no held-out gain"}
    partly = uptrain(_recipe(write_recipe, mla_source_dir, fitted, max_steps=1))
    assert [row["layer"] for row in partly["attention_transfer"]["layers"]] == [1]
    asked = uptrain(_recipe(write_recipe, mla_source_dir, fitted, max_steps=1, output_dir=str(tmp_path / "asked"),
                            attention_transfer={**TRANSFER, "steps": 2, "after_fit": True}))
    assert [row["layer"] for row in asked["attention_transfer"]["layers"]] == [0, 1]
    exact = tmp_path / "exact"  # every layer already exact: nothing is left to transfer
    mha_to_mla(mla_source_dir, exact, MlaOptions(rope_dim="all", kv_rank="full", target="transformers", **fitting))
    skipped = uptrain(_recipe(write_recipe, mla_source_dir, exact, max_steps=1, output_dir=str(tmp_path / "skipped")))
    assert "already fitted" in skipped["attention_transfer"]["skipped"]
    assert not (tmp_path / "skipped" / TRANSFER_DIR).exists()


def test_attention_transfer_fits_the_mamba2_mixers_of_a_linear_hybrid_then_distils(tmp_path, mla_source_dir,
                                                                                  write_recipe):
    """The mixers that add-linear-attention wrote (closed form only) are fitted to the source attention, the
    attention layers it carried exactly are left alone, and the end-to-end stage trains from there."""
    from kvshrink.convert.linear_attention import add_linear_attention
    from kvshrink.convert.options import LinearAttentionOptions

    hybrid = tmp_path / "hybrid"
    converted = add_linear_attention(mla_source_dir, hybrid, LinearAttentionOptions(linear_layers="1,", **QUICK))
    assert converted["linear_attention"]["linear_layers"] == [1]
    recipe = _recipe(write_recipe, mla_source_dir, hybrid)
    report = uptrain(recipe)
    layers = report["attention_transfer"]["layers"]
    assert [row["layer"] for row in layers] == [1]
    assert layers[0]["heldout_relative_end"] < layers[0]["heldout_relative_start"]
    transferred = {}
    for path in sorted((Path(recipe.output_dir) / TRANSFER_DIR).glob("layer-*.safetensors")):
        transferred.update(load_file(path))
    assert transferred and all(name.startswith("model.layers.1.mamba.") for name in transferred)
    assert report["steps"] == 2
