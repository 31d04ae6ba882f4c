"""The real SmolLM2-135M (9 query / 3 KV heads) through mha-to-mqa, and straight from its GGUF file."""

from __future__ import annotations

import json

import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, LlamaForCausalLM

from kvshrink.convert.cli import convert_cli
from kvshrink.convert.example import smollm2_gguf_path


def test_mqa_output_loads_generates_and_caches_one_kv_head(smollm2_mqa_dir):
    model = AutoModelForCausalLM.from_pretrained(smollm2_mqa_dir)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_mqa_dir)
    assert isinstance(model, LlamaForCausalLM) and model.config.num_key_value_heads == 1
    inputs = tokenizer("The quick brown fox", return_tensors="pt")
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(**inputs, past_key_values=cache, use_cache=True)
    assert cache.layers[0].keys.shape[1] == 1  # (batch, kv heads, tokens, head_dim)
    generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == inputs.input_ids.shape[1] + 5


def test_mqa_report_is_complete(smollm2_mqa_dir):
    report = json.loads((smollm2_mqa_dir / "kvshrink_report.json").read_text())
    assert report["source_architecture"] == report["target_architecture"] == "LlamaForCausalLM"
    assert report["source_heads"] == {"query": 9, "kv": 3} and report["target_heads"] == {"query": 9, "kv": 1}
    assert report["kv_bytes_per_token"] == {"source": 30 * 2 * 3 * 64 * 4, "target": 30 * 2 * 1 * 64 * 4}
    assert len(report["layers"]) == 30 and all(layer["groups"] == [[0, 1, 2]] for layer in report["layers"])
    for layer in range(30):
        for part in ("k_proj", "v_proj"):
            assert f"model.layers.{layer}.self_attn.{part}.weight" in report["new_parameters"]
    check = report["check"]
    assert 5 < check["source_perplexity"] < 40 and check["converted_perplexity"] > check["source_perplexity"]
    for copied in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"):
        assert (smollm2_mqa_dir / copied).exists(), copied


def test_gguf_file_converts_directly(tmp_path):
    out = tmp_path / "from-gguf"
    result = CliRunner().invoke(
        convert_cli,
        ["mha-to-gqa", "--groups", "3", str(smollm2_gguf_path()), str(out), "--no-check", "--method", "mean"]
    )
    assert result.exit_code == 0, result.output
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_key_value_heads == 3 and (out / "tokenizer.json").exists()


def test_streamed_check_equals_the_whole_model_on_smollm2(smollm2_dir):
    from kvshrink.convert.check import load_causal_lm, load_tokenizer, perplexity, token_windows
    from kvshrink.convert.checkpoint import open_source
    from kvshrink.convert.corpora import calibration_text
    from kvshrink.convert.layers import StockModel, stream_perplexity

    windows = token_windows(load_tokenizer(smollm2_dir), calibration_text(None), 1024, 512)
    with open_source(smollm2_dir) as checkpoint:
        streamed = stream_perplexity(StockModel.of_checkpoint(checkpoint, torch.device("cpu")), windows)
    whole = perplexity(load_causal_lm(smollm2_dir, "cpu"), windows, progress=False)
    # float32 through 30 layers by two kernel paths (per-layer sdpa with a built mask, chunked LM head against the
    # whole model): 1.9e-5 apart on one AMD EPYC, 1e-5 on another; a wrong mask, norm or RoPE is 1e-2 and more
    assert abs(streamed - whole) / whole < 1e-4
