"""Every bad input stops with one line naming the problem and the fix, a non-zero exit, and no OUT on disk."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from click.testing import CliRunner

from kvshrink.convert.cli import convert_cli, kvshrink_cli


def run_convert(*args):
    return CliRunner().invoke(convert_cli, [str(a) for a in args])


def assert_refused(result, *fragments, out=None):
    assert result.exit_code != 0, result.output
    message = result.output.strip().splitlines()
    assert len(message) == 1 and message[0].startswith("Error: "), result.output
    for fragment in fragments:
        assert fragment in message[0], message[0]
    if out is not None:
        assert not out.exists()
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.partial")]


@pytest.fixture
def source(tiny_checkpoint):
    return tiny_checkpoint("llama", num_heads=4, num_kv_heads=4)


def test_missing_source(tmp_path):
    out = tmp_path / "out"
    assert_refused(run_convert("mha-to-mqa", tmp_path / "nowhere", out, "--no-check"), "does not exist", out=out)


def test_source_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    assert_refused(run_convert("mha-to-mqa", tmp_path / "empty", out, "--no-check"), "has no config.json", out=out)


def test_unsupported_model_type(source, tmp_path):
    config = json.loads((source / "config.json").read_text())
    config["model_type"] = "gpt2"
    (source / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    assert_refused(run_convert("mha-to-mqa", source, out, "--no-check"), "'gpt2' is not supported", "llama", out=out)


@pytest.mark.parametrize(
    "command", [["mha-to-mqa"], ["mha-to-mla", "--kv-budget", "0.5"], ["add-sliding-window", "-w", "16"]]
)
def test_an_mla_source_is_refused_by_every_converter(tiny_checkpoint, tmp_path, command):
    """What mha-to-mla writes has no KV heads to merge and no windowed stock class: one rule in the driver's frame."""
    source, out = tiny_checkpoint("deepseek_v3", 4, 4, tokenizer=True), tmp_path / "out"
    assert_refused(
        run_convert(*command, source, out), "is an MLA checkpoint (DeepseekV3ForCausalLM)", "source model", out=out
    )


def test_tensors_that_do_not_match_the_config(tiny_checkpoint, tmp_path):
    source = tiny_checkpoint("llama", tokenizer=True)
    config = json.loads((source / "config.json").read_text())
    config["intermediate_size"] += 8
    (source / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    result = run_convert("mha-to-mqa", source, out)
    error = result.output.strip().splitlines()[-1]  # after the progress bar
    assert result.exit_code == 1 and error.startswith("Error: model.layers.0.mlp.gate_proj.weight has shape [96, 64]")
    assert "does not match its config.json" in error and not out.exists()


@pytest.mark.parametrize(
    ("groups", "fragment"),
    [("3", "does not divide the source's 4 KV heads: choose one of 1, 2, 4"), ("0", "positive"),
     ("-2", "positive"), ("8", "more than the source's 4 KV heads")],
)
def test_bad_group_counts(source, tmp_path, groups, fragment):
    out = tmp_path / "out"
    assert_refused(run_convert("mha-to-gqa", "--groups", groups, source, out, "--no-check"), fragment, out=out)


def test_existing_output_is_refused_unless_overwrite(source, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_refused(run_convert("mha-to-mqa", source, out, "--no-check"), "already exists", "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"
    result = run_convert("mha-to-mqa", source, out, "--no-check", "--overwrite", "--method", "mean")
    assert result.exit_code == 0, result.output
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()


def test_output_inside_source(source):
    out = source / "converted"
    assert_refused(run_convert("mha-to-mqa", source, out, "--no-check"), "inside the source", out=out)


def test_truncated_shard(tiny_checkpoint, tmp_path):
    source = tiny_checkpoint("llama", shard_size="40KB")
    shard = sorted(source.glob("model-*.safetensors"))[-1]
    with open(shard, "r+b") as handle:
        handle.truncate(os.path.getsize(shard) - 100)
    out = tmp_path / "out"
    assert_refused(run_convert("mha-to-mqa", source, out, "--no-check"), shard.name, "truncated", out=out)


def test_garbage_shard(source, tmp_path):
    (source / "model.safetensors").write_bytes(b"\xff" * 64)
    out = tmp_path / "out"
    assert_refused(run_convert("mha-to-mqa", source, out, "--no-check"), "model.safetensors", "re-download", out=out)


def test_index_naming_a_missing_tensor(tiny_checkpoint, tmp_path):
    source = tiny_checkpoint("llama", shard_size="40KB")
    index_file = source / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shard = index["weight_map"]["model.layers.0.self_attn.k_proj.weight"]
    index["weight_map"]["model.layers.0.self_attn.k_proj.weight"] = next(
        name for name in set(index["weight_map"].values()) if name != shard
    )
    index_file.write_text(json.dumps(index))
    out = tmp_path / "out"
    assert_refused(
        run_convert("mha-to-mqa", source, out, "--no-check"), "model.layers.0.self_attn.k_proj.weight", "lacks it",
        out=out,
    )


def test_checkpoint_missing_an_attention_tensor(tiny_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    source = tiny_checkpoint("llama")
    tensors = load_file(source / "model.safetensors")
    del tensors["model.layers.1.self_attn.v_proj.weight"]
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    assert_refused(run_convert("mha-to-mqa", source, out, "--no-check"), "v_proj", "lacks", out=out)


def test_pickle_is_refused_without_opt_in_and_read_safely_with_it(tiny_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    safe = tiny_checkpoint("llama")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(safe / "config.json", pickled)
    state = AutoModelForCausalLM.from_pretrained(safe).state_dict()
    torch.save(state, pickled / "pytorch_model.bin")
    out = tmp_path / "out"
    assert_refused(run_convert("mha-to-mqa", pickled, out, "--no-check"), "--allow-pickle", out=out)
    result = run_convert("mha-to-mqa", pickled, out, "--no-check", "--allow-pickle", "--method", "mean")
    assert result.exit_code == 0, result.output
    assert AutoModelForCausalLM.from_pretrained(out).config.num_key_value_heads == 1


def test_uncached_hub_id_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    out = tmp_path / "out"
    assert_refused(
        run_convert("mha-to-mqa", "kvshrink-test/not-cached-model", out, "--no-check"),
        "not in the local Hugging Face cache", out=out,
    )


@pytest.mark.parametrize("content", [b"not a gguf model at all", b""])
def test_gguf_file_that_is_not_gguf(tmp_path, content):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(content)
    out = tmp_path / "out"
    assert_refused(run_convert("mha-to-mqa", fake, out, "--no-check"), "not a GGUF file", out=out)


def test_bad_shard_size(source, tmp_path):
    out = tmp_path / "out"
    assert_refused(run_convert("mha-to-mqa", source, out, "--no-check", "--out-shard-size", "lots"), "5GB", out=out)


def test_check_without_tokenizer_says_to_skip_it(source, tmp_path):
    out = tmp_path / "out"
    assert_refused(run_convert("mha-to-mqa", source, out), "--no-check", out=out)


def test_umbrella_command_reaches_the_same_converter(source, tmp_path):
    result = CliRunner().invoke(
        kvshrink_cli, ["convert", "mha-to-mqa", str(source), str(tmp_path / "o"), "--no-check", "--method", "mean"]
    )
    assert result.exit_code == 0, result.output
    assert "KV heads 4 -> 1" in result.output


def test_checkpoint_missing_a_tensor_of_its_stock_class(tiny_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    source = tiny_checkpoint("llama", tokenizer=True)
    tensors = load_file(source / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    assert_refused(run_convert("mha-to-mqa", source, out), "model.layers.1.mlp.up_proj.weight", "re-download", out=out)


def test_a_disk_too_small_for_the_output_is_refused_before_writing(tiny_checkpoint, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    source, out = tiny_checkpoint("llama", tokenizer=True), tmp_path / "out"
    assert_refused(run_convert("mha-to-mqa", source, out, "--method", "mean"), "GB free", "needs about", out=out)


def test_mla_refuses_a_disk_too_small_before_calibrating(tiny_checkpoint, tmp_path, monkeypatch):
    """The size of what MLA writes (the output and the checked other target) is known from the shape alone, so a
    small disk is refused before the calibration pass, which on a 70B takes an hour."""
    import shutil
    from collections import namedtuple

    from kvshrink.convert import driver

    def calibration_started(*args, **kwargs):
        raise AssertionError("calibration started before the free-space check")

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    monkeypatch.setattr(driver, "calibration_windows", calibration_started)
    source, out = tiny_checkpoint("llama", tokenizer=True), tmp_path / "out"
    assert_refused(
        run_convert("mha-to-mla", "--kv-budget", "0.5", "--target", "sglang", source, out), "GB free", "needs about",
        out=out
    )


@pytest.mark.parametrize(
    "command", [["mha-to-mqa"], ["mha-to-mla", "--kv-rank", "32", "--rope-dim", "8", "--target", "transformers"]]
)
def test_a_disk_with_room_for_a_bfloat16_output_is_not_refused(tiny_checkpoint, tmp_path, monkeypatch, command):
    """The space needed is counted in the dtype written (the source's bfloat16), not the float32 layers compute in:
    a disk with room for 1.2 times the source's size per output (plus the fixed margin) is enough."""
    import shutil
    from collections import namedtuple

    from kvshrink.convert import frame

    source, out = tiny_checkpoint("llama", tokenizer=True, dtype=torch.bfloat16), tmp_path / "out"
    source_bytes = sum(path.stat().st_size for path in source.glob("*.safetensors"))
    outputs = 2 if command[0] == "mha-to-mla" else 1  # the MLA check also writes the other target, then deletes it
    free = outputs * (int(1.2 * source_bytes) + frame._FREE_SPACE_MARGIN)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 10**12 - free, free))
    result = run_convert(*command, "--calibration-tokens", "512", "--check-tokens", "512", "--fit", "none", source, out)
    assert result.exit_code == 0, result.output
    assert (out / "kvshrink_report.json").is_file()


def test_a_tensor_holding_inf_is_refused_by_name(tiny_checkpoint, tmp_path):
    def corrupt(model):
        model.model.layers[0].self_attn.k_proj.weight[3, 1] = float("inf")

    source, out = tiny_checkpoint("llama", tokenizer=True, edit=corrupt), tmp_path / "out"
    result = run_convert("mha-to-mqa", source, out, "--method", "mean")
    error = result.output.strip().splitlines()[-1]  # after the progress bar of the layers before it
    assert result.exit_code == 1 and error.startswith("Error: tensor model.layers.0.self_attn.k_proj.weight")
    assert "NaN or inf" in error and not out.exists()
