"""Two CPU processes (gloo) through `accelerate launch`, data parallel or DeepSpeed ZeRO-3, train like one process
accumulating two micro-batches."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kvshrink.uptrain import load_recipe, uptrain

ZERO3_CONFIG = Path(__file__).parents[2] / "recipes" / "accelerate" / "deepspeed-zero3.yaml"


def _launch_two_processes(recipe) -> None:
    """`uptrain recipe` on 2 gloo CPU processes: `--cpu` alone would need mpirun; torchrun's launcher plus
    ACCELERATE_USE_CPU gives gloo processes."""
    launched = _launch(recipe, "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                       "--dynamo_backend", "no", environment={"ACCELERATE_USE_CPU": "1"})
    assert launched.returncode == 0, launched.stdout + launched.stderr


def _launch(recipe, *launcher_arguments: str, environment: dict[str, str] | None = None,
            resume: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", *launcher_arguments, "-m", "kvshrink.uptrain", str(recipe),
         *(["--resume"] if resume else [])],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **(environment or {})}, timeout=300,
    )


def _launch_zero3(recipe, mixed_precision: str = "no") -> None:
    """`uptrain recipe` under the shipped DeepSpeed ZeRO-3 config on 2 CPU processes (DeepSpeed's CPU accelerator,
    gloo), in fp32 unless asked."""
    launched = _launch(recipe, "--config_file", str(ZERO3_CONFIG), "--num_processes", "2", "--mixed_precision",
                       mixed_precision)
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
                                                                             mla_converted_dir, write_recipe):
    """The MLA recipe's stages on 2 CPU processes (gloo, DDP): attention transfer split over the processes, then
    distillation with every parameter trained (size-scaled latent rows, no freeze). accelerate 1.15 runs FSDP on
    accelerators only (on CPU its state falls back to MULTI_CPU), so FSDP2 itself is not exercised here."""
    recipe = _mla_stages_one_process(tmp_path, mla_source_dir, mla_converted_dir, write_recipe, "ddp")
    _launch_two_processes(recipe)
    _assert_like_one_process(tmp_path / "ddp", tmp_path / "single", "MULTI_CPU")


def _mla_stages_one_process(tmp_path, mla_source_dir, mla_converted_dir, write_recipe, name: str, **extra) -> Path:
    """Run the MLA stages in one process accumulating 2 micro-batches into tmp_path/single; return the recipe of
    the same run for 2 processes, writing into tmp_path/name."""
    keys = dict(model=str(mla_converted_dir), teacher=str(mla_source_dir), stages=["attention_transfer", "end_to_end"],
                attention_transfer={"steps": 10, "sequences": 4, "micro_batch_size": 2}, loss={"kind": "distill"},
                trainable="all", max_steps=3, micro_batch_size=2, optimizer={"lr": 1e-3}, **extra)
    uptrain(load_recipe(write_recipe(**keys, gradient_accumulation=2, output_dir=str(tmp_path / "single"))))
    return write_recipe(**keys, gradient_accumulation=1, output_dir=str(tmp_path / name))


def _assert_like_one_process(output: Path, single: Path, distributed_type: str) -> None:
    report = json.loads((output / "uptrain_report.json").read_text())
    expected = json.loads((single / "uptrain_report.json").read_text())
    assert report["distributed_type"] == distributed_type and report["num_processes"] == 2
    assert report["trained_parameters"] == expected["trained_parameters"]
    assert report["attention_transfer"]["layers"] == expected["attention_transfer"]["layers"]
    assert report["loss_start"] == pytest.approx(expected["loss_start"], rel=1e-4)
    assert report["loss_end"] == pytest.approx(expected["loss_end"], rel=1e-3)
    assert report["val_perplexity_end"] == pytest.approx(expected["val_perplexity_end"], rel=1e-4)
    single_weights, weights = load_file(single / "model.safetensors"), load_file(output / "model.safetensors")
    assert sorted(weights) == sorted(single_weights)
    for name in single_weights:
        torch.testing.assert_close(weights[name], single_weights[name], rtol=1e-3, atol=1e-5)


def test_deepspeed_zero3_runs_the_mla_stages_like_one_process(
    tmp_path, mla_source_dir, mla_converted_dir, write_recipe
):
    """The shipped ZeRO-3 config on 2 CPU processes: the student and the teacher partitioned, attention transfer,
    then distillation with the size-scaled latent rows redone on ZeRO-3's slices (the tiny model's matrices stay
    whole between steps, under DeepSpeed's persistence threshold)."""
    recipe = _mla_stages_one_process(tmp_path, mla_source_dir, mla_converted_dir, write_recipe, "zero3")
    _launch_zero3(recipe)
    _assert_like_one_process(tmp_path / "zero3", tmp_path / "single", "DEEPSPEED")
    single = json.loads((tmp_path / "single" / "uptrain_report.json").read_text())["parameters_held_by_main_process"]
    assert single["student_held"] == single["student_total"] and single["teacher_held"] == single["teacher_total"]


def test_deepspeed_zero3_in_bf16_keeps_the_latent_rows_in_range(tmp_path, mla_source_dir, mla_converted_dir,
                                                                 write_recipe):
    """The shipped config's precision: DeepSpeed holds bf16 weights with fp32 master copies, where one process runs
    bf16 autocast on fp32 weights, so the two agree to bf16's precision only; the ~1e-8 latent rows of
    kv_a_proj_with_mqa keep their size (a plain Adam step at lr 1e-3 would make them ~1e-3)."""
    recipe = _mla_stages_one_process(
        tmp_path, mla_source_dir, mla_converted_dir, write_recipe, "zero3", precision="bf16"
    )
    _launch_zero3(recipe, mixed_precision="bf16")
    report = json.loads((tmp_path / "zero3" / "uptrain_report.json").read_text())
    expected = json.loads((tmp_path / "single" / "uptrain_report.json").read_text())
    assert report["distributed_type"] == "DEEPSPEED" and report["precision"] == "bf16"
    assert report["loss_end"] == pytest.approx(expected["loss_end"], rel=2e-2)
    assert report["val_perplexity_end"] == pytest.approx(expected["val_perplexity_end"], rel=1e-2)
    latent = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
    source_rows = load_file(mla_converted_dir / "model.safetensors")[latent].float().pow(2).mean(1).sqrt()
    trained_rows = load_file(tmp_path / "zero3" / "model.safetensors")[latent].float().pow(2).mean(1).sqrt()
    shrunk = source_rows < 1e-6
    assert shrunk.any()
    torch.testing.assert_close(trained_rows[shrunk], source_rows[shrunk], rtol=0.05, atol=0.0)


def test_deepspeed_zero3_with_every_parameter_sliced_resumes_exactly(tmp_path, mla_source_dir, mla_converted_dir,
                                                                    write_recipe):
    """With the persistence threshold at 0 no parameter stays whole between steps; a run resumed from its
    step-2 DeepSpeed checkpoint ends bit-identical to the uninterrupted one, and both like one process."""
    config = tmp_path / "zero3.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                                  "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
                                  "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}))
    recipe = _mla_stages_one_process(tmp_path, mla_source_dir, mla_converted_dir, write_recipe, "zero3",
                                     save_interval=1, keep_last=3)
    output = tmp_path / "zero3"
    launcher = ("--use_deepspeed", "--deepspeed_config_file", str(config), "--num_processes", "2")
    launched = _launch(recipe, *launcher)
    assert launched.returncode == 0, launched.stdout + launched.stderr
    _assert_like_one_process(output, tmp_path / "single", "DEEPSPEED")
    _assert_each_process_holds_half(output)
    uninterrupted = load_file(output / "model.safetensors")

    shutil.rmtree(output / "checkpoints" / "step-00000003")
    for name in ("model.safetensors", "uptrain_report.json"):
        (output / name).unlink()
    resumed = _launch(recipe, *launcher, resume=True)
    assert (
        resumed.returncode == 0 and "resuming from" in resumed.stdout + resumed.stderr
    ), resumed.stdout + resumed.stderr
    final = load_file(output / "model.safetensors")
    assert all(torch.equal(final[name], uninterrupted[name]) for name in uninterrupted)
    _assert_each_process_holds_half(output)


def _assert_each_process_holds_half(output: Path) -> None:
    held = json.loads((output / "uptrain_report.json").read_text())["parameters_held_by_main_process"]
    for model in ("student", "teacher"):  # half of each, give or take DeepSpeed's padding of each slice
        assert 0.45 < held[f"{model}_held"] / held[f"{model}_total"] < 0.55


@pytest.mark.parametrize(
    ("launcher_arguments", "message"),
    [
        (["--zero_stage", "2"], "uptrain runs DeepSpeed at ZeRO stage 3 only, this config asks for stage 2"),
        (["--zero_stage", "3", "--gradient_clipping", "0.5"],
         "the DeepSpeed config sets gradient_clipping to 0.5 but the recipe asks for 1.0"),
    ],
)
def test_a_deepspeed_config_uptrain_cannot_honour_is_refused_in_one_line(tmp_path, tiny_llama_dir, write_recipe,
                                                                       launcher_arguments, message):
    recipe = write_recipe(model=str(tiny_llama_dir), output_dir=str(tmp_path / "out"))
    launched = _launch(
        recipe, "--use_deepspeed", "--num_processes", "1", "--mixed_precision", "no", *launcher_arguments
    )
    assert launched.returncode != 0
    assert f"Error: {message}" in launched.stderr
    assert "KvshrinkError" not in launched.stderr  # no traceback of ours (torchrun adds its own about the exit code)
    assert not (tmp_path / "out").exists()
