"""The training loop on tiny models: objectives, what gets trained, stock-format output, failure on NaN."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kvshrink.convert.errors import KvshrinkError
from kvshrink.uptrain import load_recipe, uptrain
from kvshrink.uptrain.losses import distill_loss, lm_loss
from kvshrink.uptrain.recipe import Loss
from kvshrink.uptrain.trainable import select_trainable


def _weights(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def test_lm_loss_matches_transformers(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    assert torch.allclose(lm_loss(out.logits, ids, mask), out.loss, atol=1e-6)


def test_distill_loss_is_zero_for_identical_logits_and_positive_otherwise():
    logits = torch.randn(2, 8, 50, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 8, dtype=torch.long)
    assert distill_loss(logits, logits.clone(), mask, temperature=2.0).item() == 0.0
    assert distill_loss(logits, logits.flip(-1), mask, temperature=2.0).item() > 0.1


@pytest.mark.parametrize("padded", [False, True])
def test_distill_loss_averages_the_kl_of_real_positions(padded):
    """KL(p || q) = sum p (log p - log q) per position whose next token is real, averaged, times T²."""
    generator = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(2, 2, 6, 11, generator=generator)
    mask = torch.ones(2, 6, dtype=torch.long)
    if padded:
        mask[1, 3:] = 0
    p = torch.softmax(teacher[:, :-1] / 2.0, dim=-1)
    kl = (p * (p.log() - torch.log_softmax(student[:, :-1] / 2.0, dim=-1))).sum(-1)
    real = mask[:, 1:].bool()
    expected = kl[real].mean() * 4.0
    assert torch.allclose(distill_loss(student, teacher, mask, temperature=2.0), expected, atol=1e-6)


def test_loss_falls_on_a_repeated_batch(tmp_path, tiny_llama_dir, write_recipe):
    text = tmp_path / "one_block.txt"
    text.write_text("The quick brown fox jumps over the lazy dog.")  # one 32-token block of bytes
    report = uptrain(load_recipe(write_recipe(
        model=str(tiny_llama_dir), data=[{"path": str(text)}], validation={"sources": [{"path": str(text)}]},
        micro_batch_size=1, max_steps=12, optimizer={"lr": 1e-2}, schedule={"kind": "constant"},
    )))
    assert report["loss_end"] < 0.5 * report["loss_start"]
    assert report["val_perplexity_end"] < 0.5 * report["val_perplexity_start"]


def test_distillation_from_itself_starts_at_zero(tiny_llama_dir, write_recipe):
    """The teacher is the student, so the first step's KL objective is exactly zero."""
    report = uptrain(load_recipe(write_recipe(
        model=str(tiny_llama_dir), teacher=str(tiny_llama_dir), loss={"kind": "distill", "temperature": 2.0},
        max_steps=1,
    )))
    assert report["loss_start"] == 0.0


def test_learning_rate_schedules():
    from kvshrink.uptrain.recipe import Schedule
    from kvshrink.uptrain.trainer import lr_factor

    cosine = [lr_factor(Schedule(kind="cosine", warmup_steps=2), step, total_steps=6) for step in range(7)]
    assert cosine == pytest.approx([0.0, 0.5, 1.0, 0.85355339, 0.5, 0.14644661, 0.0])
    linear = [lr_factor(Schedule(kind="linear", warmup_steps=0), step, total_steps=4) for step in range(5)]
    assert linear == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    assert lr_factor(Schedule(kind="constant", warmup_steps=4), 2, total_steps=10) == 0.5
    assert lr_factor(Schedule(kind="constant", warmup_steps=4), 9, total_steps=10) == 1.0


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("all", None),
        ("attention", lambda name: ".self_attn." in name),
        ("new", lambda name: name.endswith(("k_proj.weight", "v_proj.weight"))),
    ],
)
def test_trainable_freezes_exactly_what_it_says(tiny_converted_dir, mode, expected):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_converted_dir)
    trained = select_trainable(model, mode, tiny_converted_dir)
    names = [name for name, _ in model.named_parameters()]
    wanted = names if expected is None else [name for name in names if expected(name)]
    assert [name for name, p in model.named_parameters() if p.requires_grad] == wanted
    assert set(wanted) <= set(trained)


def test_freeze_patterns_subtract_from_trainable(tiny_deepseek_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_deepseek_dir)
    trained = select_trainable(model, "attention", tiny_deepseek_dir, ["*.kv_a_proj_with_mqa.*", "*.o_proj.weight"])
    assert trained == [n for n in dict(model.named_parameters()) if ".self_attn." in n
                       and ".kv_a_proj_with_mqa." not in n and not n.endswith("o_proj.weight")]
    assert "model.layers.1.self_attn.kv_b_proj.weight" in trained
    with pytest.raises(KvshrinkError, match="freeze pattern '\\*.kv_proj.\\*' matches no parameter"):
        select_trainable(model, "all", tiny_deepseek_dir, ["*.kv_proj.*"])


def test_trainable_new_follows_tied_weights(tiny_converted_dir, tmp_path):
    """lm_head.weight is tied to the embedding: naming either trains the shared tensor."""
    import shutil

    from transformers import AutoModelForCausalLM

    folder = tmp_path / "tied"
    shutil.copytree(tiny_converted_dir, folder)
    (folder / "kvshrink_report.json").write_text(json.dumps({"new_parameters": ["lm_head.weight"]}))
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert select_trainable(model, "new", folder) == ["model.embed_tokens.weight", "lm_head.weight"]
    assert model.model.embed_tokens.weight.requires_grad
    (folder / "kvshrink_report.json").write_text(json.dumps({"new_parameters": ["model.layers.9.mlp.weight"]}))
    with pytest.raises(KvshrinkError, match="lists 'model.layers.9.mlp.weight'"):
        select_trainable(model, "new", folder)


def test_frozen_weights_stay_bitwise_and_output_keeps_the_report(tiny_converted_dir, write_recipe):
    recipe = load_recipe(write_recipe(model=str(tiny_converted_dir), trainable="new", max_steps=2))
    uptrain(recipe)
    output = Path(recipe.output_dir)
    before, after = _weights(tiny_converted_dir), _weights(output)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == {f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(2) for p in ("k", "v")}
    assert (output / "kvshrink_report.json").read_text() == (tiny_converted_dir / "kvshrink_report.json").read_text()


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_deepseek_dir"])
def test_output_loads_in_the_stock_class(request, fixture, write_recipe, tiny_llama_teacher_dir):
    from transformers import AutoModelForCausalLM

    source = request.getfixturevalue(fixture)
    teacher = {"teacher": str(tiny_llama_teacher_dir), "loss": {"kind": "mix", "distill_weight": 0.5}} \
        if fixture == "tiny_llama_dir" else {}
    recipe = load_recipe(write_recipe(model=str(source), tracker="csv", **teacher))
    report = uptrain(recipe)
    output = Path(recipe.output_dir)
    original = AutoModelForCausalLM.from_pretrained(source)
    trained = AutoModelForCausalLM.from_pretrained(output)
    assert type(trained) is type(original)
    assert json.loads((output / "config.json").read_text()) == json.loads((source / "config.json").read_text())
    assert (output / "tokenizer.json").is_file()
    saved = json.loads((output / "uptrain_report.json").read_text())
    assert saved["steps"] == 4 and saved["tokens_seen"] == 4 * 2 * 32
    assert [(row["source"], row["share"]) for row in saved["training_data"]] == [("corpus pydoc", 1.0)]
    assert saved["recipe"]["model"] == str(source) and saved == json.loads(json.dumps(report))
    assert "train/loss" in (output / "metrics.csv").read_text()
    ids = torch.arange(20)[None] % trained.config.vocab_size
    assert not torch.equal(trained(ids).logits, original(ids).logits)


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(tiny_llama_dir, write_recipe):
    recipe = load_recipe(write_recipe(
        model=str(tiny_llama_dir), max_steps=30, save_interval=1, keep_last=30,
        optimizer={"lr": 1e30, "grad_clip": None},
        schedule={"kind": "constant"},
    ))
    with pytest.raises(KvshrinkError, match=r"training loss became nan at step (\d+): lower optimizer.lr") as error:
        uptrain(recipe)
    step = int(error.value.args[0].split("at step ")[1].split(":")[0])
    checkpoints = sorted((Path(recipe.output_dir) / "checkpoints").iterdir())
    assert checkpoints[-1].name == f"step-{step - 1:08d}"
    assert f"the last good checkpoint is {checkpoints[-1]}" in str(error.value)


def test_an_existing_run_needs_resume(tiny_llama_dir, write_recipe):
    recipe = load_recipe(write_recipe(model=str(tiny_llama_dir), max_steps=1))
    uptrain(recipe)
    with pytest.raises(KvshrinkError, match="already holds a run: pass --resume"):
        uptrain(recipe)


def test_a_windowed_conversion_distils_and_stays_windowed(tmp_path, tiny_llama_teacher_dir, write_recipe):
    """A sliding-window output (convert add-sliding-window) trains end to end against its source on blocks longer
    than the window: distillation starts above zero (the windows drop context), the weights move, and the output
    is the same stock class with the same per-layer windows."""
    from transformers import AutoConfig

    from kvshrink.convert.options import SlidingWindowOptions
    from kvshrink.convert.sliding_window import add_sliding_window

    windowed = tmp_path / "windowed"
    add_sliding_window(tiny_llama_teacher_dir, windowed, SlidingWindowOptions(
        window=8, full_layers=0.5, calibration_tokens=512, calibration_length=64, check=False, progress=False))
    report = uptrain(load_recipe(write_recipe(
        model=str(windowed), teacher=str(tiny_llama_teacher_dir), loss={"kind": "distill"}, trainable="all",
        seq_len=64, max_steps=3,
    )))
    assert report["loss_start"] > 0.0 and math.isfinite(report["loss_end"])
    start, end = _weights(windowed), _weights(tmp_path / "out")
    assert not torch.equal(
        start["model.layers.0.self_attn.q_proj.weight"], end["model.layers.0.self_attn.q_proj.weight"]
    )
    before, after = AutoConfig.from_pretrained(windowed), AutoConfig.from_pretrained(tmp_path / "out")
    assert type(after).__name__ == type(before).__name__ == "MinistralConfig"
    assert after.layer_types == before.layer_types and after.sliding_window == before.sliding_window == 8
    assert "sliding_attention" in after.layer_types


def test_freed_host_memory_is_reused_without_page_faults():
    """After keep_freed_memory() a tensor made where a larger one was freed reuses malloc's memory instead of
    mapping fresh pages (glibc alone would fault in each of its 64,512 pages again). Smaller, because a request of
    exactly the freed size does not fit the freed chunk once malloc adds its alignment padding."""
    script = """
import resource, sys, torch
from kvshrink.uptrain.host_memory import keep_freed_memory
kept = keep_freed_memory()

def faults_making(elements):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(elements)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults_making(64 * 2**20)  # 256 MiB, freed at once
print(kept, faults_making(63 * 2**20))  # 252 MiB
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    kept, faults = result.stdout.split()
    if kept == "False":
        pytest.skip("the C library is not glibc: malloc is left as it is")
    assert int(faults) < 645  # under 1% of the tensor's pages
