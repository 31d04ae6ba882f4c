"""`convert add-sliding-window`: the stock class with per-layer windows, exact where no layer is windowed, the
layer choice from measured attention mass, the windowed cache, and every refusal."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from kvshrink.convert.cli import kvshrink_cli
from kvshrink.convert.engines import NOT_READ, CLASS_ENGINES, class_engines
from kvshrink.convert.errors import KvshrinkError
from kvshrink.convert.kvcache import kv_bytes_at_context
from kvshrink.convert.mha_to_gqa import mha_to_gqa
from kvshrink.convert.options import GqaOptions, SlidingWindowOptions
from kvshrink.convert.sliding_window import add_sliding_window
from kvshrink.convert.window_reach import dropped_mass, evenly_spaced, mean_dropped, most_reaching
from kvshrink.eval.kv import measure_kv

QUICK = dict(calibration_length=96, calibration_tokens=192, check=False, progress=False)


def _logits(folder, ids):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture
def llama(tiny_checkpoint):
    return tiny_checkpoint("llama", 4, 2, tokenizer=True, num_hidden_layers=4)


@pytest.mark.parametrize("model_type", ["llama", "mistral"])
def test_no_layer_windowed_reproduces_the_source_in_ministral(tiny_checkpoint, tmp_path, model_type):
    source = tiny_checkpoint(model_type, 4, 2, tokenizer=True, num_hidden_layers=4, sliding_window=None)
    report = add_sliding_window(source, tmp_path / "out", SlidingWindowOptions(window=16, full_layers=1.0, **QUICK))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["MinistralForCausalLM"] and config["layer_types"] == ["full_attention"] * 4
    assert report["new_parameters"] == []  # Ministral's layer is Llama's without biases: nothing to add
    ids = torch.randint(3, 300, (1, 80), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(tmp_path / "out", ids), _logits(source, ids), atol=1e-5, rtol=1e-5)


def test_llama_attention_biases_have_no_place_in_ministral(tiny_checkpoint, tmp_path):
    source = tiny_checkpoint("llama", 4, 2, tokenizer=True, num_hidden_layers=4, attention_bias=True)
    with pytest.raises(KvshrinkError, match="MinistralForCausalLM has no place for the source's"):
        add_sliding_window(source, tmp_path / "out", SlidingWindowOptions(window=16, **QUICK))
    assert not (tmp_path / "out").exists()


def test_the_report_names_the_engines_that_run_the_windows_as_read(llama, tmp_path):
    report = add_sliding_window(llama, tmp_path / "out", SlidingWindowOptions(window=16, full_layers=0.5, **QUICK))
    assert report["valid_engines"] == ["transformers", "vllm"]
    assert report["excluded_engines"] == {"sglang": NOT_READ}
    assert report["notes"] == [f"vllm: {CLASS_ENGINES['ministral']['vllm'].how}"]
    valid, excluded, how = class_engines("qwen2")
    assert valid == ["transformers"] and how == [] and "Sliding window for some but all layers" in excluded["vllm"]
    assert "qwen2.py @cb24295ecafd" in excluded["vllm"] and "RadixAttention" in excluded["sglang"]
    assert class_engines("gemma2") == (["transformers"], {"vllm": NOT_READ, "sglang": NOT_READ}, [])


def test_windowed_layers_see_only_the_window(llama, tmp_path):
    report = add_sliding_window(llama, tmp_path / "out", SlidingWindowOptions(window=16, full_layers=0.5, **QUICK))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert type(model).__name__ == "MinistralForCausalLM"
    full = report["sliding_window"]["full_layers"]
    assert len(full) == 2
    assert model.config.layer_types == ["full_attention" if i in full else "sliding_attention" for i in range(4)]
    ids = torch.randint(3, 300, (1, 40), generator=torch.Generator().manual_seed(1))
    # within the window nothing is dropped: the source's logits; beyond it the windowed layers forget
    short, long = _logits(tmp_path / "out", ids[:, :16]), _logits(tmp_path / "out", ids)
    torch.testing.assert_close(short, _logits(llama, ids[:, :16]), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(long, _logits(llama, ids), atol=1e-3)
    assert (llama / "config.json").exists() and json.loads((llama / "config.json").read_text())["model_type"] == "llama"


def test_dropped_mass_equals_the_masked_sum():
    weights = torch.softmax(torch.randn(3, 12, 12).masked_fill(torch.ones(12, 12).triu(1).bool(), -torch.inf), -1)
    window, sinks = 4, 2
    beyond, sink, queries = dropped_mass(weights, window, sinks)
    t = torch.arange(12)
    dropped = (t[None, :] <= t[:, None] - window) & (t[:, None] >= window)
    torch.testing.assert_close(beyond, (weights * dropped).sum((1, 2)).double())
    torch.testing.assert_close(sink, (weights * (dropped & (t[None, :] < sinks))).sum((1, 2)).double())
    assert queries == 12 - window


def test_layer_choice_keeps_the_layers_that_reach_furthest(llama, tmp_path):
    report = add_sliding_window(llama, tmp_path / "out", SlidingWindowOptions(window=16, full_layers=0.25, **QUICK))
    masses = [layer["mass_beyond_window"] for layer in report["layers"]]
    assert [layer["layer"] for layer in report["layers"]] == [0, 1, 2, 3]
    assert all(0 < mass < 1 for mass in masses)
    assert report["sliding_window"]["full_layers"] == [max(range(4), key=masses.__getitem__)]
    compared = report["sliding_window"]["mean_mass_beyond_window"]
    assert compared["calibrated"] <= compared["even"]


def test_choice_helpers():
    assert evenly_spaced(30, 5, list(range(30))) == [5, 11, 17, 23, 29]
    assert evenly_spaced(6, 2, [0, 1, 3]) == [1, 3]  # spots 2 and 5 are not candidates: nearest ones stand in
    assert evenly_spaced(8, 0, list(range(8))) == []
    from kvshrink.convert.window_reach import LayerReach

    reaches = [LayerReach(i, mass, mass, 0.0) for i, mass in enumerate([0.1, 0.5, 0.3, 0.05])]
    assert most_reaching(reaches, 2, [0, 1, 2, 3]) == [1, 2]
    assert most_reaching(reaches, 1, [0, 2, 3]) == [2]
    assert mean_dropped(reaches, [1, 2]) == pytest.approx((0.1 + 0.05) / 4)


def test_qwen2_keeps_its_class_and_gemma2_windows_only_its_full_layers(tiny_checkpoint, tmp_path):
    qwen = tiny_checkpoint("qwen2", 4, 2, tokenizer=True, num_hidden_layers=4)
    add_sliding_window(qwen, tmp_path / "qwen", SlidingWindowOptions(window=16, full_layers=0.25, **QUICK))
    config = json.loads((tmp_path / "qwen" / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["use_sliding_window"] is True
    assert config["layer_types"].count("sliding_attention") == 3
    gemma = tiny_checkpoint("gemma2", 4, 2, tokenizer=True, num_hidden_layers=4, sliding_window=32)
    source_types = json.loads((gemma / "config.json").read_text())["layer_types"]
    report = add_sliding_window(gemma, tmp_path / "gemma", SlidingWindowOptions(window=16, full_layers=0.25, **QUICK))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "gemma")
    assert type(model).__name__ == "Gemma2ForCausalLM" and model.config.sliding_window == 16
    assert all(source_types[i] == "full_attention" for i in report["sliding_window"]["full_layers"])


def test_composes_with_mqa_and_the_cache_keeps_only_the_window(llama, tmp_path):
    mha_to_gqa(llama, tmp_path / "mqa", GqaOptions(groups=1, method="mean", check=False, progress=False))
    add_sliding_window(tmp_path / "mqa", tmp_path / "out", SlidingWindowOptions(window=16, full_layers=0.25, **QUICK))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_key_value_heads"] == 1
    measured = measure_kv([tmp_path / "mqa", tmp_path / "out"], [12, 120], decode_tokens=1, device="cpu")
    for m in measured:
        folder = tmp_path / ("mqa" if m.model.endswith("mqa") else "out")
        assert m.bytes_held_per_token == pytest.approx(m.bytes_held_per_token_from_config)
        assert (
            m.bytes_held_per_token_from_config
            == kv_bytes_at_context(json.loads((folder / "config.json").read_text()), m.context)
        )
    by = {(m.model.endswith("mqa"), m.context): m.bytes_held_per_token for m in measured}
    assert by[(False, 12)] == by[(True, 12)]  # shorter than the window: the same cache
    # 120 tokens: 1 full layer keeps 120, 3 windowed layers keep 15 each
    assert by[(False, 120)] == pytest.approx(by[(True, 120)] * (120 + 3 * 15) / (4 * 120))


@pytest.mark.parametrize(
    ("make", "options", "message"),
    [
        (dict(), dict(window=256), "not shorter than the model's context"),
        (dict(), dict(window=96), "must exceed --window"),
        (dict(model_type="mistral", sliding_window=32), dict(window=16), "already attends within a window"),
        (dict(model_type="deepseek_v3", num_kv_heads=4), dict(window=16), "MLA checkpoint"),
        (dict(model_type="gemma3_text"), dict(window=16), "own RoPE base"),
        (dict(model_type="gemma2", sliding_window=32), dict(window=16, full_layers=0.75), "at most 0.500"),
        (dict(model_type="gemma2", sliding_window=8), dict(window=16), "wider than the source's own sliding window"),
    ],
)
def test_refusals_write_nothing(tiny_checkpoint, tmp_path, make, options, message):
    model_type = make.pop("model_type", "llama")
    source = tiny_checkpoint(model_type, 4, make.pop("num_kv_heads", 2), tokenizer=True, num_hidden_layers=4, **make)
    with pytest.raises(KvshrinkError, match=message):
        add_sliding_window(source, tmp_path / "out", SlidingWindowOptions(**{**QUICK, **options}))
    assert not (tmp_path / "out").exists()


def test_cli_refuses_a_fraction_outside_0_1_in_one_line(llama, tmp_path):
    result = CliRunner().invoke(kvshrink_cli, ["convert", "add-sliding-window", str(llama), str(tmp_path / "out"),
                                               "--window", "16", "--full-layers", "1.5"])
    assert result.exit_code != 0
    assert result.output.strip().splitlines()[-1].startswith("Error: ") and "--full-layers" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_cli_prints_the_choice_and_the_cache(llama, tmp_path):
    result = CliRunner().invoke(kvshrink_cli, ["convert", "add-sliding-window", str(llama), str(tmp_path / "out"),
                                               "-w", "16", "--full-layers", "0.5", "--calibration-length", "96",
                                               "--calibration-tokens", "192", "--check-tokens", "96"])
    assert result.exit_code == 0, result.output
    assert "full attention kept in layers" in result.output and "KV cache per token at 8,192 tokens" in result.output
    assert f"not claimed for sglang: {NOT_READ}" in result.output  # unread is not a failure, so not "not valid"
    report = json.loads((tmp_path / "out" / "kvshrink_report.json").read_text())
    assert report["check"]["window"] == 96 and report["method"] == "window/calibrated"
    card = (tmp_path / "out" / "README.md").read_text()
    assert "Valid in: transformers, vllm." in card and "Transformers backend" in card
