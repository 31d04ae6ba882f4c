"""The uptraining run: accelerate does devices, precision, accumulation, sharding and checkpoint IO; this module
decides what to train on, in which order, and what to write at the end. It reads top to bottom as a run goes:
uptrain() -> the attention_transfer stage (its own module) -> setup() -> train(): train_step() and
evaluate_and_checkpoint() per step -> final_report() -> save_final_model()."""

from __future__ import annotations

import functools
import itertools
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import parse_flag_from_env, set_seed
from tqdm.auto import tqdm

from kvshrink.convert.errors import KvshrinkError
from kvshrink.uptrain.attention_transfer import TRANSFER_DIR, transfer_attention, transferred_weights
from kvshrink.uptrain.checkpoints import (
    FINAL_STAGING,
    checkpoint_dirs,
    claim_output_dir,
    newest_checkpoint,
    read_trainer_state,
    save_checkpoint,
)
from kvshrink.uptrain.data import Blocks, TrainingStream, build_data
from kvshrink.uptrain.host_memory import keep_freed_memory
from kvshrink.uptrain.losses import training_loss
from kvshrink.convert.optimizer import SizeScaledRows, off_scale_parameters, parameter_groups, reference_rms
from kvshrink.convert.precision import resolved_precision, running_precision
from kvshrink.uptrain.recipe import CONVERSION_REPORT, Recipe, Schedule, runs_attention_transfer
from kvshrink.uptrain.trackers import tracker_for
from kvshrink.uptrain.trainable import select_trainable
from kvshrink.uptrain.zero3 import (
    Zero3SizeScaledRows,
    configure_zero3,
    deepspeed_cpu_backend,
    elements_held,
    full_parameters,
    full_state_dict,
    load_tensors,
    numel,
    sharded_teacher,
    uses_deepspeed,
    whole_modules,
)

UPTRAIN_REPORT = "uptrain_report.json"
SKIPPED_TRANSFER = ("the conversion already fitted every converted layer to the source's (its report's \"fit\"); "
                    "set attention_transfer.after_fit=true to run it anyway")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def uptrain(recipe: Recipe, resume: bool | None = None, break_lock: bool = False) -> dict[str, Any]:
    """Run a recipe's stages to their budget and write the trained model into recipe.output_dir; return the report.

    resume (default: recipe.resume) continues where the run in output_dir stopped: at the next layer of
    attention transfer, or at the newest end-to-end checkpoint. Another run on output_dir meanwhile refuses;
    break_lock takes output_dir from one that seems to run (convert/staging.py).
    """
    _training_device()  # starts accelerate's process state as the run will, so the main process is known
    with claim_output_dir(recipe.output_dir, break_lock, PartialState().is_main_process):
        return _uptrain(recipe, recipe.resume if resume is None else resume)


def _uptrain(recipe: Recipe, resume: bool) -> dict[str, Any]:
    """The run itself, with output_dir claimed."""
    checkpoint = _checkpoint_to_resume(Path(recipe.output_dir), resume)
    session = Session(start=time.perf_counter())
    precision = resolved_precision(recipe.precision, _training_device())
    accelerator = Accelerator(
        gradient_accumulation_steps=recipe.gradient_accumulation,
        mixed_precision="bf16" if precision == "bf16" else "no",
        log_with=tracker_for(recipe.tracker, recipe.output_dir),
        project_dir=recipe.output_dir,
        step_scheduler_with_optimizer=False,  # stepped once per optimizer step, whatever the process count
    )
    if accelerator.gradient_accumulation_steps != recipe.gradient_accumulation:
        raise KvshrinkError(
            f"the accelerate setup asks for {accelerator.gradient_accumulation_steps} gradient accumulation steps "
            f"but the recipe for {recipe.gradient_accumulation}: remove gradient_accumulation_steps from the "
            "accelerate config or command line (the recipe decides)"
        )
    if uses_deepspeed(accelerator):
        configure_zero3(accelerator, recipe)
    if accelerator.device.type == "cpu":  # each step's large tensors: reuse their memory, do not fault it in again
        keep_freed_memory()
    accelerator.init_trackers("kvshrink-uptrain", config=_flat(recipe.model_dump()))
    transfer = None
    if runs_attention_transfer(recipe):
        with whole_modules(accelerator):
            transfer = transfer_attention(recipe, accelerator)
    elif "attention_transfer" in recipe.stages:
        transfer = {"skipped": SKIPPED_TRANSFER}
        accelerator.print(f"stage attention_transfer skipped: {SKIPPED_TRANSFER}")
    run = setup(recipe, accelerator, checkpoint, resume)
    train(run, session)
    report = final_report(run, session, transfer)
    save_final_model(accelerator, run.model, run.tokenizer, recipe, report)
    accelerator.print(
        f"uptrained model written to {recipe.output_dir}: {report['steps']} steps, {report['tokens_seen']} tokens, "
        f"{report['tokens_per_s']} tokens/s, validation perplexity {report['val_perplexity_start']:.3f} -> "
        f"{report['val_perplexity_end']:.3f}"
    )
    accelerator.end_training()
    return report


def _training_device() -> torch.device:
    """The device the Accelerator will train on, known before it exists (its precision is a constructor argument):
    the process state it would start (and will reuse), with ACCELERATE_USE_CPU read as AcceleratorState reads it."""
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"), backend=deepspeed_cpu_backend()).device


@dataclass
class Session:
    """What this process did since it started (a resumed run counts its own tokens and seconds)."""

    start: float
    tokens: int = 0
    train_seconds: float = 0.0


@dataclass
class Run:
    """The end-to-end stage's moving parts, built by setup(); `state` is what a checkpoint carries."""

    recipe: Recipe
    accelerator: Accelerator
    tokenizer: Any
    model: torch.nn.Module
    teacher: torch.nn.Module | None
    optimizer: Any
    scheduler: Any
    stream: TrainingStream
    validation: Blocks
    trained_names: list[str]
    total_steps: int
    per_step: int
    checkpoint: Path | None
    zero3_rows: Zero3SizeScaledRows | None = None  # size-scaled rows under DeepSpeed, redone after each step
    state: dict[str, Any] = field(default_factory=dict)


def _checkpoint_to_resume(output: Path, resume: bool) -> Path | None:
    if (
        not resume
        and (checkpoint_dirs(output) or (output / UPTRAIN_REPORT).exists() or (output / TRANSFER_DIR).exists())
    ):
        raise KvshrinkError(
            f"output_dir {output} already holds a run: pass --resume to continue it, or choose another output_dir"
        )
    return newest_checkpoint(output) if resume else None


def setup(recipe: Recipe, accelerator: Accelerator, checkpoint: Path | None, resume: bool) -> Run:
    """Data, student (with the attention transfer's result), teacher, optimizer and schedule, prepared by
    accelerate; then the trainer state from `checkpoint`, or a fresh one with the starting validation."""
    from transformers import AutoTokenizer

    set_seed(recipe.seed)
    tokenizer = AutoTokenizer.from_pretrained(recipe.model)
    with accelerator.main_process_first():
        stream, validation = build_data(recipe, tokenizer)
    model = _load_student(recipe)
    trained_names = select_trainable(model, recipe.trainable, recipe.model, recipe.freeze)
    teacher = _load_teacher(recipe, accelerator)
    optimizer = torch.optim.AdamW(
        parameter_groups(model, recipe.optimizer.weight_decay),
        lr=recipe.optimizer.lr, betas=recipe.optimizer.betas, eps=recipe.optimizer.eps, fused=_fused_step(accelerator),
    )
    total_steps = recipe.total_steps(accelerator.num_processes)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(lr_factor, recipe.schedule, total_steps=total_steps)
    )
    reference = reference_rms(parameter for _, parameter in full_parameters(model))
    off_scale = off_scale_parameters(full_parameters(model), reference) if recipe.optimizer.size_scaled_rows else []
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    teacher = _sharded_teacher(accelerator, teacher)
    by_name = dict(accelerator.unwrap_model(model).named_parameters())
    zero3_rows = None
    if off_scale and uses_deepspeed(accelerator):  # DeepSpeed steps its own flat copies, not these parameters
        zero3_rows = Zero3SizeScaledRows([by_name[name] for name in off_scale], reference)
    elif off_scale:
        SizeScaledRows([by_name[name] for name in off_scale], reference).attach(optimizer.optimizer)
    per_step = recipe.micro_batch_size * recipe.gradient_accumulation * accelerator.num_processes
    run = Run(recipe, accelerator, tokenizer, model, teacher, optimizer, scheduler, stream, validation,
              trained_names, total_steps, per_step, checkpoint, zero3_rows)
    run.state = _restored_state(run) if checkpoint is not None else _fresh_state(run, resume)
    return run


def _fused_step(accelerator: Accelerator) -> bool:
    # AdamW's fused kernel makes one pass over each tensor instead of a dozen: about 0.17 s instead of 1 s a step
    # for SmolLM2's 135M parameters on two CPU cores
    return accelerator.device.type in ("cpu", "cuda")


def _load_student(recipe: Recipe) -> torch.nn.Module:
    """The converted model, with the tensors the attention_transfer stage trained (if it ran)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(recipe.model, dtype=torch.float32)
    if runs_attention_transfer(recipe):
        transferred = transferred_weights(Path(recipe.output_dir))
        unexpected = sorted(set(transferred) - {name for name, _ in model.named_parameters()})
        if unexpected:
            raise KvshrinkError(
                f"{Path(recipe.output_dir) / TRANSFER_DIR} holds {unexpected[0]!r}, which {type(model).__name__} "
                "does not have: it was written for another model; use a fresh output_dir"
            )
        load_tensors(model, transferred)  # one parameter at a time: under ZeRO-3 the model is partitioned
    if recipe.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _load_teacher(recipe: Recipe, accelerator: Accelerator) -> torch.nn.Module | None:
    """The teacher in eval mode without gradients (under ZeRO-3 it loads partitioned, like the student)."""
    if recipe.loss.kind == "lm":
        return None
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if running_precision(accelerator.mixed_precision) == "bf16" else torch.float32
    teacher = AutoModelForCausalLM.from_pretrained(recipe.teacher, dtype=dtype)
    return teacher.requires_grad_(False).eval()


def _sharded_teacher(accelerator: Accelerator, teacher: torch.nn.Module | None) -> torch.nn.Module | None:
    """The teacher sharded like the student, not registered with the accelerator (checkpoints hold the student
    only): under FSDP2 by accelerate's own fsdp2_prepare_model, under ZeRO-3 as its own engine; else moved whole."""
    if teacher is None:
        return None
    if accelerator.is_fsdp2:
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        return fsdp2_prepare_model(accelerator, teacher).eval()
    if uses_deepspeed(accelerator):
        return sharded_teacher(accelerator, teacher)
    return teacher.to(accelerator.device)


def _restored_state(run: Run) -> dict[str, Any]:
    state = read_trainer_state(run.checkpoint)
    if state["sequences_per_step"] != run.per_step:
        raise KvshrinkError(
            f"{run.checkpoint} was trained with {state['sequences_per_step']} sequences per step, this run would "
            f"use {run.per_step}: resume with the same micro_batch_size x gradient_accumulation x processes"
        )
    run.accelerator.load_state(str(run.checkpoint))
    run.accelerator.print(f"resuming from {run.checkpoint} (step {state['step']} of {run.total_steps})")
    return state


def _fresh_state(run: Run, resume: bool) -> dict[str, Any]:
    if resume:
        run.accelerator.print(f"no checkpoint in {Path(run.recipe.output_dir) / 'checkpoints'}: starting from step 0")
    start = validation_perplexity(run.accelerator, run.model, run.validation, run.recipe.micro_batch_size)
    run.accelerator.log({"val/perplexity": start}, step=0)
    return {"step": 0, "sequences_per_step": run.per_step, "tokens_seen": 0, "train_seconds": 0.0,
            "wall_seconds": 0.0, "loss_start": None, "val_perplexity_start": start}


def train(run: Run, session: Session) -> None:
    """Optimizer steps until the budget, each followed by logging, validation and checkpoints when due."""
    blocks = run.stream.blocks_from(run.state["step"] * run.per_step)
    progress = tqdm(total=run.total_steps, initial=run.state["step"], unit="step",
                    disable=not run.accelerator.is_local_main_process)
    loop_start = time.perf_counter()
    run.model.train()
    while run.state["step"] < run.total_steps:
        step_start = time.perf_counter()
        step_blocks = list(itertools.islice(blocks, run.per_step))
        losses = train_step(run, step_blocks)
        tokens = int(sum(int(mask.sum()) for _, mask in step_blocks))
        _count_step(run, session, losses["loss"], tokens, time.perf_counter() - step_start)
        progress.update(1)
        progress.set_postfix(loss=f"{losses['loss']:.4f}", tok_s=f"{session.tokens / session.train_seconds:.0f}")
        loop_start = evaluate_and_checkpoint(run, session, losses, progress, loop_start)
    progress.close()
    run.state["wall_seconds"] += time.perf_counter() - loop_start


def train_step(run: Run, step_blocks: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """One optimizer step over this process's share of `step_blocks`; the loss and its parts, averaged
    over micro-steps and processes."""
    recipe, accelerator = run.recipe, run.accelerator
    ids = torch.stack([b[0] for b in step_blocks])
    masks = torch.stack([b[1] for b in step_blocks])
    totals: dict[str, torch.Tensor] = {}
    for micro in range(recipe.gradient_accumulation):
        # this process's rows of this micro-step: a pure function of (step, micro, rank)
        start = (micro * accelerator.num_processes + accelerator.process_index) * recipe.micro_batch_size
        rows = slice(start, start + recipe.micro_batch_size)
        with accelerator.accumulate(run.model):
            loss, parts = _micro_step_loss(run, ids[rows].to(accelerator.device), masks[rows].to(accelerator.device))
            _backward(run, loss)
            if accelerator.sync_gradients and recipe.optimizer.grad_clip is not None:
                accelerator.clip_grad_norm_(run.model.parameters(), recipe.optimizer.grad_clip)
            run.optimizer.step()
            run.optimizer.zero_grad()
        for name, value in {"loss": loss.detach(), **parts}.items():
            totals[name] = totals.get(name, 0) + value / recipe.gradient_accumulation
    run.scheduler.step()
    names = list(totals)
    reduced = accelerator.reduce(torch.stack([totals[n] for n in names]), "mean").tolist()
    losses = dict(zip(names, reduced))
    if not math.isfinite(losses["loss"]):
        last = newest_checkpoint(Path(recipe.output_dir))
        raise KvshrinkError(
            f"training loss became {losses['loss']} at step {run.state['step'] + 1}: lower optimizer.lr or use "
            f"precision=fp32; the last good checkpoint is {last if last else 'none (nothing was saved)'}"
        )
    return losses


def _backward(run: Run, loss: torch.Tensor) -> None:
    """accelerator.backward; under DeepSpeed it also takes the optimizer step when accumulation ends, so the
    ZeRO-3 size-scaled rows are remembered before and redone after it."""
    stepping = run.zero3_rows is not None and run.accelerator.sync_gradients
    if stepping:
        run.zero3_rows.remember()
    run.accelerator.backward(loss)
    if stepping:
        run.zero3_rows.rescale(run.optimizer.param_groups[0], step=run.state["step"] + 1)


def _micro_step_loss(run: Run, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    # a full mask lets attention take its fast causal path
    mask_arg = None if bool(attention_mask.all()) else attention_mask
    logits = run.model(input_ids=input_ids, attention_mask=mask_arg, use_cache=False).logits
    teacher_logits = None
    if run.teacher is not None:
        with torch.no_grad():
            teacher_logits = run.teacher(input_ids=input_ids, attention_mask=mask_arg, use_cache=False).logits
    return training_loss(run.recipe.loss, logits, input_ids, attention_mask, teacher_logits)


def _count_step(run: Run, session: Session, loss: float, tokens: int, seconds: float) -> None:
    run.state["step"] += 1
    run.state["tokens_seen"] += tokens
    run.state["train_seconds"] += seconds
    if run.state["loss_start"] is None:
        run.state["loss_start"] = loss
    session.tokens += tokens
    session.train_seconds += seconds


def evaluate_and_checkpoint(run: Run, session: Session, losses: dict[str, float], progress, loop_start: float) -> float:
    """Log, validate and save when the recipe's intervals say so; return when the next wall-time span starts."""
    recipe, state, step = run.recipe, run.state, run.state["step"]
    if step % recipe.log_interval == 0 or step == run.total_steps:
        run.accelerator.log(
            {**{f"train/{name}": value for name, value in losses.items()}, "train/lr": run.scheduler.get_last_lr()[0],
             "train/tokens_per_s": session.tokens / session.train_seconds, "train/tokens_seen": state["tokens_seen"]},
            step=step,
        )
    if recipe.eval_interval and step % recipe.eval_interval == 0 and step < run.total_steps:
        perplexity = validation_perplexity(run.accelerator, run.model, run.validation, recipe.micro_batch_size)
        run.accelerator.log({"val/perplexity": perplexity}, step=step)
        progress.write(f"step {step}: validation perplexity {perplexity:.3f}")
    if (recipe.save_interval and step % recipe.save_interval == 0) or step == run.total_steps:
        state["loss_end"] = losses["loss"]
        state["loss_parts_end"] = {name: value for name, value in losses.items() if name != "loss"}
        state["wall_seconds"] += time.perf_counter() - loop_start
        save_checkpoint(run.accelerator, recipe.output_dir, step, state, recipe.keep_last)
        return time.perf_counter()
    return loop_start


def final_report(run: Run, session: Session, transfer: dict[str, Any] | None) -> dict[str, Any]:
    """The run's numbers: budget spent, speed, loss and validation perplexity at both ends, the recipe."""
    accelerator, state, recipe = run.accelerator, run.state, run.recipe
    val_perplexity_end = validation_perplexity(accelerator, run.model, run.validation, recipe.micro_batch_size)
    accelerator.log({"val/perplexity": val_perplexity_end}, step=run.total_steps)
    unwrapped = accelerator.unwrap_model(run.model)
    return {
        "model": recipe.model,
        "teacher": recipe.teacher,
        "architecture": type(unwrapped).__name__,
        "stages": list(recipe.stages),
        "precision": running_precision(accelerator.mixed_precision),
        "attention_transfer": transfer,
        "steps": state["step"],
        "tokens_seen": state["tokens_seen"],
        "training_data": run.stream.mix(),
        "num_processes": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type.value) + ("2" if accelerator.is_fsdp2 else ""),
        "trained_parameters": sum(numel(p) for p in unwrapped.parameters() if p.requires_grad),
        "parameters_held_by_main_process": _parameters_held(run),
        "trained_tensors": len(run.trained_names),
        "wall_time_s": round(state["wall_seconds"], 3),
        "train_time_s": round(state["train_seconds"], 3),
        "tokens_per_s": round(state["tokens_seen"] / state["train_seconds"], 3) if state["train_seconds"] else None,
        "this_session": {
            "resumed_from": str(run.checkpoint) if run.checkpoint else None,
            "seconds": round(time.perf_counter() - session.start, 3),
            "tokens_per_s": round(session.tokens / session.train_seconds, 3) if session.train_seconds else None,
        },
        "loss_start": state["loss_start"],
        "loss_end": state.get("loss_end"),
        "loss_parts_end": state.get("loss_parts_end", {}),
        "val_perplexity_start": state["val_perplexity_start"],
        "val_perplexity_end": val_perplexity_end,
        "val_tokens": int(run.validation.lengths.sum()),
        "recipe": recipe.model_dump(),
    }


def _parameters_held(run: Run) -> dict[str, int | None]:
    """How much of the student and the teacher the main process keeps between steps, against their sizes: a
    sharded engine keeps about 1/processes of each."""
    teacher = getattr(run.teacher, "module", run.teacher)  # a DeepSpeed engine wraps the model
    counts: dict[str, int | None] = {}
    for name, model in {"student": run.accelerator.unwrap_model(run.model), "teacher": teacher}.items():
        counts[f"{name}_held"] = elements_held(model) if model is not None else None
        counts[f"{name}_total"] = sum(numel(p) for p in model.parameters()) if model is not None else None
    return counts


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
    # every process: FSDP and ZeRO-3 gather collectively; ZeRO-3 one parameter at a time, whatever the DeepSpeed
    # config's stage3_gather_16bit_weights_on_model_save (accelerate's get_state_dict needs it true)
    if uses_deepspeed(accelerator):
        state_dict = full_state_dict(accelerator.unwrap_model(model), keep=accelerator.is_main_process)
    else:
        state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        source = Path(recipe.model)
        output = Path(recipe.output_dir)
        config = json.loads((source / "config.json").read_text(encoding="utf-8"))
        dtype = _DTYPES.get(config.get("dtype") or config.get("torch_dtype") or "float32", torch.float32)
        staging = output / FINAL_STAGING
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
