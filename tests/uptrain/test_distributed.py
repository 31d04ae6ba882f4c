"""Two CPU processes (gloo) through `accelerate launch` train like one process accumulating two micro-batches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kvshrink.convert.errors import KvshrinkError
from kvshrink.uptrain import load_recipe, uptrain


def _launch_two_processes(recipe) -> None:
    """`uptrain recipe` on 2 gloo CPU processes: `--cpu` alone would need mpirun; torchrun's launcher plus
    ACCELERATE_USE_CPU gives gloo processes."""
    launched = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "kvshrink.uptrain", str(recipe)],
        capture_output=True, text=True, env={**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}, timeout=300,
    )  # fmt: skip
    assert launched.returncode == 0, launched.stdout + launched.stderr


def test_two_processes_match_one_process_with_accumulation(tmp_path, tiny_llama_dir, write_recipe):
    keys = dict(model=str(tiny_llama_dir), max_steps=3, micro_batch_size=2, optimizer={"lr": 1e-2})
    single = load_recipe(write_recipe(**keys, gradient_accumulation=2, output_dir=str(tmp_path / "single")))
    uptrain(single)

    recipe = write_recipe(**keys, gradient_accumulation=1, output_dir=str(tmp_path / "ddp"))
    _launch_two_processes(recipe)
    report = json.loads((tmp_path / "ddp" / "uptrain_report.json").read_text())
    assert report["num_processes"] == 2 and report["tokens_seen"] == 3 * 4 * 32
    expected = load_file(Path(single.output_dir) / "model.safetensors")
    actual = load_file(tmp_path / "ddp" / "model.safetensors")
    changed = [n for n in expected if not torch.equal(expected[n], load_file(tiny_llama_dir / "model.safetensors")[n])]
    assert changed
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-5)


def test_two_processes_split_attention_transfer_and_distil_mla_like_one_process(tmp_path, mla_source_dir,
                                                                             mla_converted_dir, write_recipe):  # fmt: skip
    """The MLA recipe's stages on 2 CPU processes (gloo, DDP): attention transfer split over the processes, then
    distillation with every parameter trained (size-scaled latent rows, no freeze). accelerate 1.15 runs FSDP on
    accelerators only (on CPU its state falls back to MULTI_CPU), so FSDP2 itself is not exercised here."""
    keys = dict(model=str(mla_converted_dir), teacher=str(mla_source_dir), stages=["attention_transfer", "end_to_end"],
                attention_transfer={"steps": 10, "sequences": 4, "micro_batch_size": 2}, loss={"kind": "distill"},
                trainable="all", max_steps=3, micro_batch_size=2, optimizer={"lr": 1e-3})  # fmt: skip
    single = load_recipe(write_recipe(**keys, gradient_accumulation=2, output_dir=str(tmp_path / "single")))
    uptrain(single)

    recipe = write_recipe(**keys, gradient_accumulation=1, output_dir=str(tmp_path / "ddp"))
    _launch_two_processes(recipe)
    ddp = json.loads((tmp_path / "ddp" / "uptrain_report.json").read_text())
    expected = json.loads((tmp_path / "single" / "uptrain_report.json").read_text())
    assert ddp["distributed_type"] == "MULTI_CPU" and ddp["num_processes"] == 2
    assert ddp["attention_transfer"]["layers"] == expected["attention_transfer"]["layers"]
    assert ddp["loss_start"] == pytest.approx(expected["loss_start"], rel=1e-4)
    assert ddp["loss_end"] == pytest.approx(expected["loss_end"], rel=1e-3)
    assert ddp["val_perplexity_end"] == pytest.approx(expected["val_perplexity_end"], rel=1e-4)
    single_weights, ddp_weights = load_file(tmp_path / "single" / "model.safetensors"), load_file(tmp_path / "ddp" / "model.safetensors")
    for name in single_weights:
        torch.testing.assert_close(ddp_weights[name], single_weights[name], rtol=1e-3, atol=1e-5)


def test_a_deepspeed_launch_is_refused_before_any_model_loads(monkeypatch, tiny_llama_dir, write_recipe):
    """accelerate launch with a DeepSpeed config sets ACCELERATE_USE_DEEPSPEED in every process."""
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    recipe = load_recipe(write_recipe(model=str(tiny_llama_dir)))
    with pytest.raises(KvshrinkError, match="uptrain does not run under DeepSpeed: launch with recipes/accelerate/fsdp.yaml"):
        uptrain(recipe)
    assert not Path(recipe.output_dir).exists()
