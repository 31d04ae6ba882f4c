"""The block-wise fit of each converted layer (convert/fitting.py) inside mha-to-gqa/mqa and mha-to-mla."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from tiny_checkpoints import byte_level_tokenizer
from transformers import AutoModelForCausalLM

from kvshrink.convert.checkpoint import open_folder
from kvshrink.convert.cli import convert_cli
from kvshrink.convert.corpora import corpus_text
from kvshrink.convert.fitting import (
    AttentionRunner, FitSettings, HeldOut, WindowPairs, _batch_loss, fit_attention, heldout_indices,
)
from kvshrink.convert.layers import AttentionTables, StockModel
from kvshrink.convert.mha_to_gqa import mha_to_gqa
from kvshrink.convert.mha_to_mla import mha_to_mla
from kvshrink.convert.options import GqaOptions, MlaOptions

QUICK = dict(check=False, progress=False, calibration_tokens=2048, fit_steps=24)
# 4 KV heads merged into 1, weights large enough for sharp attention: the closed form leaves something to fit
LOSSY = dict(num_heads=4, num_kv_heads=4, tokenizer=True, initializer_range=0.15, max_position_embeddings=512)
# held-out text neither calibration nor the fit sees, as the tiny models' byte tokens
HELD_OUT = torch.tensor(
    byte_level_tokenizer()(corpus_text("pydoc", "heldout")[:2048])["input_ids"][:1024]
).reshape(4, 256)


def _logit_error(folder, source) -> float:
    """Relative error of the model's logits against the source's on held-out text."""
    with torch.no_grad():
        logits = [AutoModelForCausalLM.from_pretrained(f, dtype=torch.float32)(input_ids=HELD_OUT).logits
                  for f in (folder, source)]
    return float((logits[0] - logits[1]).norm() / logits[1].norm())


def _weights(folder) -> dict[str, torch.Tensor]:
    return {name: tensor for path in folder.glob("*.safetensors") for name, tensor in load_file(path).items()}


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "phi3", "olmo2", "gemma3_text"])
def test_the_fit_brings_mqa_closer_to_the_source_on_text_it_never_saw(tiny_checkpoint, tmp_path, model_type):
    """Each layer's held-out error falls (or the layer keeps its closed form, saying why), and the whole model's
    logits on held-out text are closer to the source's than the closed form's."""
    source = tiny_checkpoint(model_type, dtype=torch.bfloat16, **LOSSY)
    fitted = mha_to_gqa(source, tmp_path / "fitted", GqaOptions(groups=1, **QUICK))
    mha_to_gqa(source, tmp_path / "closed", GqaOptions(groups=1, **{**QUICK, "fit": "none"}))
    for layer in fitted["layers"]:
        fit = layer["fit"]
        assert "kept_closed_form" in fit or fit["windows"] + fit["heldout_windows"] == 4
        assert "kept_closed_form" in fit or fit["heldout_relative_end"] < 0.99 * fit["heldout_relative_start"]
    assert fitted["fit"]["layers_fitted"] >= 1 and fitted["fit"]["text"] == "pydoc+kjv"
    assert _logit_error(tmp_path / "fitted", source) < _logit_error(tmp_path / "closed", source)
    assert all(tensor.dtype == torch.bfloat16 for tensor in _weights(tmp_path / "fitted").values())
    assert "fitted, one at a time, to the source attention's output" in (tmp_path / "fitted" / "README.md").read_text()


def test_the_fit_trains_only_what_the_conversion_changed_unless_widened(tiny_checkpoint, tmp_path):
    """Mean-free methods that leave q and o as they are ('grouped' with identical heads) fit k and v only."""
    source = tiny_checkpoint("llama", **LOSSY)
    report = mha_to_gqa(source, tmp_path / "out", GqaOptions(groups=1, method="grouped", **QUICK))
    source_weights, written = _weights(source), _weights(tmp_path / "out")
    trained = set(report["layers"][0]["fit"]["trained"])
    assert trained == {n for n in report["new_parameters"] if n.startswith("model.layers.0.")}
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight"):
        assert name not in trained and torch.equal(written[name], source_weights[name])
    wide = mha_to_gqa(source, tmp_path / "wide", GqaOptions(groups=1, method="grouped", fit_scope="attention", **QUICK))
    assert (
        {n.rsplit(".", 2)[-2] for n in wide["layers"][0]["fit"]["trained"]} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    )


def test_a_diverging_fit_keeps_the_closed_form_and_says_so(tiny_checkpoint, tmp_path):
    source = tiny_checkpoint("llama", **LOSSY)
    report = mha_to_gqa(source, tmp_path / "wild", GqaOptions(groups=1, fit_lr=1e4, **QUICK))
    mha_to_gqa(source, tmp_path / "closed", GqaOptions(groups=1, **{**QUICK, "fit": "none"}))
    assert report["fit"]["layers_fitted"] == 0
    assert set(report["fit"]["kept_closed_form"].values()) <= {"no held-out gain", "the fit diverged"}
    wild, closed = _weights(tmp_path / "wild"), _weights(tmp_path / "closed")
    assert all(torch.equal(wild[name], closed[name]) for name in closed)


def test_mla_fit_lowers_held_out_error_and_an_exact_latent_is_left_alone(tiny_checkpoint, tmp_path):
    source = tiny_checkpoint("llama", **LOSSY)
    report = mha_to_mla(source, tmp_path / "mla", MlaOptions(kv_budget=0.5, target="sglang", **QUICK))
    closed = mha_to_mla(
        source, tmp_path / "closed", MlaOptions(kv_budget=0.5, target="sglang", **{**QUICK, "fit": "none"})
    )
    assert report["fit"]["heldout_relative_end_mean"] < report["fit"]["heldout_relative_start_mean"]
    assert closed["fit"] is None and "not fitted" in (tmp_path / "closed" / "README.md").read_text()
    assert _logit_error(tmp_path / "mla", source) < _logit_error(tmp_path / "closed", source)
    exact = mha_to_mla(
        source, tmp_path / "exact", MlaOptions(rope_dim="all", kv_rank="full", target="transformers", **QUICK)
    )
    assert exact["fit"]["layers_fitted"] == 0
    assert set(exact["fit"]["kept_closed_form"].values()) == {"already exact"}
    assert _logit_error(tmp_path / "exact", source) < 1e-5


def test_fit_attention_backtracks_stops_early_and_ends_at_the_best_point(tiny_checkpoint):
    """Held-out targets that the starting tensors give exactly: every step that fits makes the held-out error
    worse, so the first check goes back to the start at half the learning rate, the second stops the fit, and it
    ends at its starting tensors, bit for bit."""
    model = StockModel.of_checkpoint(open_folder(tiny_checkpoint("llama", 4, 2)), torch.device("cpu"))
    attention, teacher = (model.layer(0).self_attn for _ in range(2))
    with torch.no_grad():
        teacher.k_proj.weight.mul_(-1.5)
    runner = AttentionRunner(AttentionTables(model), 0)
    inputs = [torch.randn(32, 64, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    with torch.no_grad():
        targets = [runner(teacher, x) for x in inputs]
        unchanged = [runner(attention, x) for x in inputs]
    before = {name: p.detach().clone() for name, p in attention.named_parameters()}
    heldout = HeldOut.measured(attention, runner, WindowPairs(inputs, unchanged))
    result = fit_attention(attention, dict(attention.named_parameters()), runner, WindowPairs(inputs, targets),
                           FitSettings(steps=40, lr=1e-2, micro_batch_size=2, checks=8),
                           torch.Generator().manual_seed(0), 0.1, heldout=heldout)
    assert result["stopped"] == "early" and result["steps"] == 10 and result["backtracks"] == 1
    assert result["heldout_relative_end"] == result["heldout_relative_start"] == 0.0
    assert all(torch.equal(p, before[name]) for name, p in attention.named_parameters())


def test_a_step_runs_windows_of_one_length_as_one_batch_with_the_same_loss(tiny_checkpoint):
    """Windows of one length go through the attention together, others alone; the loss is the mean over windows
    of each one's own mean squared error either way."""
    model = StockModel.of_checkpoint(open_folder(tiny_checkpoint("llama", 4, 2)), torch.device("cpu"))
    attention, runner = model.layer(0).self_attn, AttentionRunner(AttentionTables(model), 0)
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(length, 64, generator=generator) for length in (32, 32, 20)]
    pairs = WindowPairs(inputs, [torch.randn(x.shape, generator=generator) for x in inputs])
    silent = WindowPairs(inputs, [torch.zeros(x.shape) for x in inputs])  # the loss is the output's own square
    with torch.no_grad():
        each = [float((runner(attention, x) - y).pow(2).mean()) for x, y in zip(pairs.inputs, pairs.targets)]
        batched = float(_batch_loss(attention, runner, pairs, [0, 1, 2], "fp32"))
        energy = [float(_batch_loss(attention, runner, silent, [0, 1], p)) for p in ("fp32", "bf16")]
    assert batched == pytest.approx(sum(each) / 3, rel=1e-6)
    assert energy[1] == pytest.approx(energy[0], rel=2e-2) and energy[1] != pytest.approx(energy[0], rel=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_fit_gains_in_either_precision_and_the_report_says_which(tiny_checkpoint, tmp_path, precision):
    """bf16 autocast steps update float32 master weights; the errors that decide and report are float32."""
    source = tiny_checkpoint("llama", **LOSSY)
    report = mha_to_gqa(source, tmp_path / "out", GqaOptions(groups=1, fit_precision=precision, **QUICK))
    assert report["fit"]["precision"] == precision and report["fit"]["layers_fitted"] >= 1
    assert report["fit"]["heldout_relative_end_mean"] < 0.99 * report["fit"]["heldout_relative_start_mean"]


def test_held_out_windows_are_spread_over_the_text():
    assert heldout_indices(16, 2) == [4, 12] and heldout_indices(3, 1) == [1] and len(heldout_indices(5, 5)) == 5


@pytest.mark.parametrize(("flags", "message"), [
    (["--calibration-tokens", "512"], "leaving none to fit: pass more --calibration-tokens"),
    (["--fit-steps", "0"], "--fit-steps"),
    (["--fit", "sgd"], "'sgd' is not one of 'attention', 'none'"),
    (["--fit-precision", "fp16"], "'fp16' is not one of 'auto', 'fp32', 'bf16'"),
])
def test_bad_fit_options_get_one_line_and_write_nothing(tiny_checkpoint, tmp_path, flags, message):
    source = tiny_checkpoint("llama", 4, 2, tokenizer=True)
    result = CliRunner().invoke(convert_cli, ["mha-to-mqa", str(source), str(tmp_path / "out"), "--no-check", *flags])
    assert result.exit_code != 0 and message in result.output, result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name != "tiny-0"] == []


def test_the_report_records_every_layers_fit_and_the_check_reads_held_out_text(tiny_checkpoint, tmp_path):
    source = tiny_checkpoint("llama", **LOSSY)
    mha_to_gqa(source, tmp_path / "out", GqaOptions(groups=1, **{**QUICK, "check": True, "check_tokens": 256}))
    report = json.loads((tmp_path / "out" / "kvshrink_report.json").read_text())
    assert {"steps", "lr", "heldout_windows", "scope", "text", "seconds"} <= set(report["fit"])
    for layer in report["layers"]:
        kept = "kept_closed_form" in layer["fit"]
        keys = {"heldout_relative_start", "tried"} if kept else {"relative_end", "heldout_relative_end", "steps"}
        assert keys | {"seconds"} <= set(layer["fit"])
    # the check reads the corpus's held-out split: text neither calibration nor the fit saw
    assert report["check"]["text"] == "held-out split of pydoc+kjv"
