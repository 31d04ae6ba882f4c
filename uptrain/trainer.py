"""The uptraining loop: accelerate does devices, precision, accumulation, sharding and checkpoint IO;
this module decides what to train on, in which order, and what to write at the end."""

from __future__ import annotations

import functools
import itertools
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from kvshrink.convert.errors import KvshrinkError
from kvshrink.uptrain.checkpoints import checkpoint_dirs, newest_checkpoint, read_trainer_state, save_checkpoint
from kvshrink.uptrain.data import Blocks, build_data
from kvshrink.uptrain.losses import training_loss
from kvshrink.uptrain.recipe import CONVERSION_REPORT, Recipe, Schedule
from kvshrink.uptrain.trackers import tracker_for
from kvshrink.uptrain.trainable import select_trainable

UPTRAIN_REPORT = "uptrain_report.json"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def uptrain(recipe: Recipe, resume: bool | None = None) -> dict[str, Any]:
    """Run a recipe to its budget and write the trained model into recipe.output_dir; return the report.

    resume (default: recipe.resume) continues from the newest checkpoint in output_dir, if there is one.
    """
    resume = recipe.resume if resume is None else resume
    output = Path(recipe.output_dir)
    checkpoint = newest_checkpoint(output) if resume else None
    if not resume and (checkpoint_dirs(output) or (output / UPTRAIN_REPORT).exists()):
        raise KvshrinkError(
            f"output_dir {output} already holds a run: pass --resume to continue it, or choose another output_dir"
        )
    session_start = time.perf_counter()
    accelerator = Accelerator(
        gradient_accumulation_steps=recipe.gradient_accumulation,
        mixed_precision="bf16" if recipe.precision == "bf16" else "no",
        log_with=tracker_for(recipe.tracker, output),
        project_dir=str(output),
        step_scheduler_with_optimizer=False,  # stepped once per optimizer step, whatever the process count
    )
    if accelerator.gradient_accumulation_steps != recipe.gradient_accumulation:
        raise KvshrinkError(
            f"the accelerate setup asks for {accelerator.gradient_accumulation_steps} gradient accumulation steps "
            f"but the recipe for {recipe.gradient_accumulation}: remove gradient_accumulation_steps from the "
            "accelerate config or command line (the recipe decides)"
        )
    set_seed(recipe.seed)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(recipe.model)
    with accelerator.main_process_first():
        stream, validation = build_data(recipe, tokenizer)
    model = AutoModelForCausalLM.from_pretrained(recipe.model, dtype=torch.float32)
    trained_names = select_trainable(model, recipe.trainable, recipe.model, recipe.freeze)
    if recipe.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    teacher = None
    if recipe.teacher is not None:
        teacher_dtype = torch.bfloat16 if recipe.precision == "bf16" else torch.float32
        teacher = AutoModelForCausalLM.from_pretrained(recipe.teacher, dtype=teacher_dtype)
        teacher.requires_grad_(False).eval().to(accelerator.device)
    optimizer = torch.optim.AdamW(
        _parameter_groups(model, recipe.optimizer.weight_decay),
        lr=recipe.optimizer.lr,
        betas=recipe.optimizer.betas,
        eps=recipe.optimizer.eps,
    )
    total_steps = recipe.total_steps(accelerator.num_processes)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(lr_factor, recipe.schedule, total_steps=total_steps)
    )
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    accelerator.init_trackers("kvshrink-uptrain", config=_flat(recipe.to_dict()))

    per_step = recipe.micro_batch_size * recipe.gradient_accumulation * accelerator.num_processes
    if checkpoint is not None:
        state = read_trainer_state(checkpoint)
        if state["sequences_per_step"] != per_step:
            raise KvshrinkError(
                f"{checkpoint} was trained with {state['sequences_per_step']} sequences per step, this run would "
                f"use {per_step}: resume with the same micro_batch_size x gradient_accumulation x processes"
            )
        accelerator.load_state(str(checkpoint))
        accelerator.print(f"resuming from {checkpoint} (step {state['step']} of {total_steps})")
    else:
        if resume:
            accelerator.print(f"no checkpoint in {output / 'checkpoints'}: starting from step 0")
        state = {"step": 0, "sequences_per_step": per_step, "tokens_seen": 0, "train_seconds": 0.0,
                 "wall_seconds": 0.0, "loss_start": None}
        state["val_perplexity_start"] = validation_perplexity(accelerator, model, validation, recipe.micro_batch_size)
        accelerator.log({"val/perplexity": state["val_perplexity_start"]}, step=0)

    blocks = stream.blocks_from(state["step"] * per_step)
    progress = tqdm(
        total=total_steps, initial=state["step"], unit="step", disable=not accelerator.is_local_main_process
    )
    session_tokens, session_train_seconds, loss_value = 0, 0.0, float("nan")
    loop_start = time.perf_counter()
    model.train()
    while state["step"] < total_steps:
        step_start = time.perf_counter()
        step_blocks = list(itertools.islice(blocks, per_step))
        ids = torch.stack([b[0] for b in step_blocks])
        masks = torch.stack([b[1] for b in step_blocks])
        step_loss = torch.zeros((), device=accelerator.device)
        for micro in range(recipe.gradient_accumulation):
            # this process's rows of this micro-step: a pure function of (step, micro, rank)
            start = (micro * accelerator.num_processes + accelerator.process_index) * recipe.micro_batch_size
            rows = slice(start, start + recipe.micro_batch_size)
            input_ids = ids[rows].to(accelerator.device)
            attention_mask = masks[rows].to(accelerator.device)
            with accelerator.accumulate(model):
                loss, _ = _micro_step_loss(model, teacher, recipe, input_ids, attention_mask)
                accelerator.backward(loss)
                if accelerator.sync_gradients and recipe.optimizer.grad_clip is not None:
                    accelerator.clip_grad_norm_(model.parameters(), recipe.optimizer.grad_clip)
                optimizer.step()
                optimizer.zero_grad()
            step_loss += loss.detach() / recipe.gradient_accumulation
        scheduler.step()
        loss_value = accelerator.reduce(step_loss, "mean").item()
        if not math.isfinite(loss_value):
            last = newest_checkpoint(output)
            raise KvshrinkError(
                f"training loss became {loss_value} at step {state['step'] + 1}: lower optimizer.lr or use "
                f"precision=fp32; the last good checkpoint is {last if last else 'none (nothing was saved)'}"
            )
        step_seconds = time.perf_counter() - step_start
        step_tokens = int(masks.sum())
        state["step"] += 1
        state["tokens_seen"] += step_tokens
        state["train_seconds"] += step_seconds
        if state["loss_start"] is None:
            state["loss_start"] = loss_value
        session_tokens += step_tokens
        session_train_seconds += step_seconds
        tokens_per_s = session_tokens / session_train_seconds
        progress.update(1)
        progress.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tokens_per_s:.0f}")
        if state["step"] % recipe.log_interval == 0 or state["step"] == total_steps:
            accelerator.log(
                {"train/loss": loss_value, "train/lr": scheduler.get_last_lr()[0], "train/tokens_per_s": tokens_per_s,
                 "train/tokens_seen": state["tokens_seen"]},
                step=state["step"],
            )
        if recipe.eval_interval and state["step"] % recipe.eval_interval == 0 and state["step"] < total_steps:
            perplexity = validation_perplexity(accelerator, model, validation, recipe.micro_batch_size)
            accelerator.log({"val/perplexity": perplexity}, step=state["step"])
            progress.write(f"step {state['step']}: validation perplexity {perplexity:.3f}")
        if (recipe.save_interval and state["step"] % recipe.save_interval == 0) or state["step"] == total_steps:
            state["loss_end"] = loss_value
            state["wall_seconds"] += time.perf_counter() - loop_start
            loop_start = time.perf_counter()
            save_checkpoint(accelerator, output, state["step"], state, recipe.keep_last)
    progress.close()
    state["wall_seconds"] += time.perf_counter() - loop_start

    val_perplexity_end = validation_perplexity(accelerator, model, validation, recipe.micro_batch_size)
    accelerator.log({"val/perplexity": val_perplexity_end}, step=total_steps)
    report = {
        "model": recipe.model,
        "teacher": recipe.teacher,
        "architecture": type(accelerator.unwrap_model(model)).__name__,
        "steps": state["step"],
        "tokens_seen": state["tokens_seen"],
        "num_processes": accelerator.num_processes,
        "trained_parameters": sum(p.numel() for p in accelerator.unwrap_model(model).parameters() if p.requires_grad),
        "trained_tensors": len(trained_names),
        "wall_time_s": round(state["wall_seconds"], 3),
        "train_time_s": round(state["train_seconds"], 3),
        "tokens_per_s": round(state["tokens_seen"] / state["train_seconds"], 3) if state["train_seconds"] else None,
        "this_session": {
            "resumed_from": str(checkpoint) if checkpoint else None,
            "seconds": round(time.perf_counter() - session_start, 3),
            "tokens_per_s": round(session_tokens / session_train_seconds, 3) if session_train_seconds else None,
        },
        "loss_start": state["loss_start"],
        "loss_end": state.get("loss_end", loss_value),
        "val_perplexity_start": state["val_perplexity_start"],
        "val_perplexity_end": val_perplexity_end,
        "val_tokens": int(validation.lengths.sum()),
        "recipe": recipe.to_dict(),
    }
    save_final_model(accelerator, model, tokenizer, recipe, report)
    accelerator.print(
        f"uptrained model written to {output}: {report['steps']} steps, {report['tokens_seen']} tokens, "
        f"{report['tokens_per_s']} tokens/s, validation perplexity {report['val_perplexity_start']:.3f} -> "
        f"{report['val_perplexity_end']:.3f}"
    )
    accelerator.end_training()
    return report


def lr_factor(schedule: Schedule, step: int, total_steps: int) -> float:
    """Multiplier of the peak learning rate at `step`: linear warmup from 0, then the schedule's decay to 0
    at `total_steps` (the same curves as transformers' get_scheduler, without importing its trainer)."""
    if step < schedule.warmup_steps:
        return step / schedule.warmup_steps
    if schedule.kind == "constant":
        return 1.0
    progress = (step - schedule.warmup_steps) / max(1, total_steps - schedule.warmup_steps)
    if schedule.kind == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def _micro_step_loss(model, teacher, recipe: Recipe, input_ids, attention_mask):
    # a full mask lets attention take its fast causal path
    mask_arg = None if bool(attention_mask.all()) else attention_mask
    logits = model(input_ids=input_ids, attention_mask=mask_arg, use_cache=False).logits
    teacher_logits = None
    if recipe.loss.kind != "lm":
        with torch.no_grad():
            teacher_logits = teacher(input_ids=input_ids, attention_mask=mask_arg, use_cache=False).logits
    return training_loss(recipe.loss, logits, input_ids, attention_mask, teacher_logits)


def _parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters, with weight decay on matrices only (norm gains and biases are 1-d)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]


@torch.no_grad()
def validation_perplexity(accelerator: Accelerator, model, blocks: Blocks, batch_size: int) -> float:
    """exp(mean next-token NLL) over the validation blocks, split across processes.

    Every process runs the same number of forward passes (a spare one scores nothing), because sharded
    models (FSDP, ZeRO-3) gather weights collectively inside forward.
    """
    was_training = model.training
    model.eval()
    processes, rank = accelerator.num_processes, accelerator.process_index
    rounds = math.ceil(len(blocks) / (batch_size * processes))
    totals = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    for round_index in range(rounds):
        start = (round_index * processes + rank) * batch_size
        indices = list(range(start, min(start + batch_size, len(blocks))))
        ids, mask = blocks.batch(indices or [0])
        ids, mask = ids.to(accelerator.device), mask.to(accelerator.device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum"
        )
        if indices:
            totals += torch.stack([nll.double(), (targets != -100).sum().double()])
    totals = accelerator.reduce(totals, "sum")
    model.train(was_training)
    return math.exp(totals[0].item() / totals[1].item())


def save_final_model(accelerator: Accelerator, model, tokenizer, recipe: Recipe, report: dict[str, Any]) -> None:
    """Write the trained weights in the input's own stock format: the input's config.json and
    generation_config.json are copied, so only the weights change (cast back to the input's dtype)."""
    state_dict = accelerator.get_state_dict(model)  # every process: FSDP/ZeRO-3 gather collectively
    if accelerator.is_main_process:
        source = Path(recipe.model)
        output = Path(recipe.output_dir)
        config = json.loads((source / "config.json").read_text(encoding="utf-8"))
        dtype = _DTYPES.get(config.get("dtype") or config.get("torch_dtype") or "float32", torch.float32)
        staging = output / ".final.partial"
        shutil.rmtree(staging, ignore_errors=True)
        accelerator.unwrap_model(model).save_pretrained(
            staging, state_dict={name: tensor.to(dtype) for name, tensor in state_dict.items()}
        )
        tokenizer.save_pretrained(staging)
        for name in ("config.json", "generation_config.json", CONVERSION_REPORT):
            if (source / name).is_file():
                shutil.copyfile(source / name, staging / name)
        (staging / UPTRAIN_REPORT).write_text(json.dumps(report, indent=2), encoding="utf-8")
        # the report moves last: its presence marks a complete output
        for path in sorted(staging.iterdir(), key=lambda p: p.name == UPTRAIN_REPORT):
            path.replace(output / path.name)
        staging.rmdir()
    accelerator.wait_for_everyone()


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested recipe values as flat scalars, the form trackers accept for hyperparameters."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[f"{prefix}{key}"] = value
        else:
            flat[f"{prefix}{key}"] = json.dumps(value)
    return flat
