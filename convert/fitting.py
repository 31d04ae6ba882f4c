"""Block-wise fitting: a converted attention module, alone, fitted to reproduce its source attention's output.

The closed-form conversions (gqa/, mla/) keep second moments of the calibration inputs; what the model needs is
each layer's output. Here the converted layer's own stock attention module (LlamaAttention with fewer KV heads,
DeepseekV3Attention, ...) is fitted by AdamW on the mean squared error to what the source attention gave on the
same inputs: attention transfer (LoLCATs, arXiv 2410.10254), as AutoRound and OmniQuant fit each block to its
float output when quantizing. One layer is in memory, on the layer's device, in float32 whatever the source dtype.

`fit_attention` is the one loop: the conversions' per-layer step (`fit_converted_attention`, early-stopped on
calibration windows held out of the fit) and uptrain's attention_transfer stage both run it.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kvshrink.convert.errors import KvshrinkError
from kvshrink.convert.layers import AttentionTables, StockModel
from kvshrink.convert.optimizer import SizeScaledRows, off_scale_parameters, reference_rms
from kvshrink.convert.precision import Precision

# fitted windows the fitting error is measured on before and after: measured over all 128 of the shipped uptrain
# recipes, the two passes were about a fifth of the stage's work
MEASURED_WINDOWS = 16
EXACT = 1e-6  # held-out relative error of a closed form that already reproduces the source: nothing to fit
MIN_GAIN = 0.01  # least relative drop of the held-out error for a fit to replace the closed form
# a layer whose tensors are the source's (new ones all zero, e.g. a bias the output class needs): nothing to fit,
# and left out of the fit's summary (a linear hybrid's kept attention layers)
UNCHANGED = "unchanged from the source"


@dataclass(frozen=True)
class FitSettings:
    """How one attention module is fitted."""

    steps: int  # optimizer steps at most
    lr: float  # AdamW, constant after a 10% warmup (halved at each backtrack), no weight decay
    micro_batch_size: int  # windows a step
    checks: int = 0  # held-out checks over the steps (early stopping); 0: none, every step runs
    # bf16: the optimizer steps' forward and backward under bf16 autocast (float32 master weights); the errors
    # measured before, during and after stay float32. fp32: no autocast of its own (a caller's still applies)
    precision: Precision = "fp32"


@dataclass
class WindowPairs:
    """What an attention received on each window ([T, hidden]) and what the source attention gave ([T, hidden])."""

    inputs: list[torch.Tensor]
    targets: list[torch.Tensor]

    def __len__(self) -> int:
        return len(self.inputs)

    def first(self, count: int) -> WindowPairs:
        return WindowPairs(self.inputs[:count], self.targets[:count])


class AttentionRunner:
    """Runs the attention module (or the recurrent mixer that stands in for it) of decoder layer `index` on unpadded
    windows of one length, with the rotary embedding and mask that the stock forward of the model `tables` belong
    to gives that layer."""

    def __init__(self, tables: AttentionTables, index: int):
        self.tables, self.index = tables, index

    def __call__(self, attention: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """[T, hidden] -> [T, hidden], or a batch of windows [B, T, hidden] -> [B, T, hidden]."""
        states = hidden if hidden.dim() == 3 else hidden[None]
        embeddings, mask = self.tables(self.index, states[:1])  # one window's tables broadcast over the batch
        rotary = {"position_embeddings": embeddings} if _takes_rotary(type(attention)) else {}
        output = attention(hidden_states=states, attention_mask=mask, **rotary)
        output = output[0] if isinstance(output, tuple) else output  # attention: (output, weights); a mixer: output
        return output if hidden.dim() == 3 else output[0]


@functools.cache
def _takes_rotary(module_class: type) -> bool:
    """Attention takes the rotary embedding; a Mamba-2 mixer, which has no positions, does not."""
    return "position_embeddings" in inspect.signature(module_class.forward).parameters


def _squared_error(attention: nn.Module, runner: AttentionRunner, hidden: torch.Tensor,
                   target: torch.Tensor) -> torch.Tensor:
    return (runner(attention, hidden).float() - target).pow(2).mean()


def _batch_loss(attention: nn.Module, runner: AttentionRunner, pairs: WindowPairs, chosen: list[int],
                precision: Precision) -> torch.Tensor:
    """The mean over the `chosen` windows of each one's mean squared error, windows of one length run as one batch
    (a step's matrix products over 2 windows at once: about 1.2x faster on CPU than one window at a time)."""
    lengths: dict[int, list[int]] = {}
    for index in chosen:
        lengths.setdefault(pairs.inputs[index].shape[0], []).append(index)
    autocast = (torch.autocast(pairs.inputs[chosen[0]].device.type, dtype=torch.bfloat16)
                if precision == "bf16" else contextlib.nullcontext())
    total = 0.0
    with autocast:
        for group in lengths.values():
            inputs = torch.stack([pairs.inputs[i] for i in group])
            targets = torch.stack([pairs.targets[i] for i in group])
            total = total + _squared_error(attention, runner, inputs, targets) * len(group)
    return total / len(chosen)


@torch.no_grad()
def output_errors(attention: nn.Module, runner: AttentionRunner, pairs: WindowPairs) -> tuple[float, float]:
    """(mean squared error, that error over the targets' mean square) over every window of `pairs`, measured in
    eval mode (no attention dropout) whatever mode the module is in."""
    training = attention.training
    attention.eval()
    squared = [float(_squared_error(attention, runner, x, y)) for x, y in zip(pairs.inputs, pairs.targets)]
    error = sum(squared) / len(pairs)
    attention.train(training)
    energy = sum(float(y.pow(2).mean()) for y in pairs.targets) / len(pairs)
    return error, error / energy


def window_batches(count: int, size: int, generator: torch.Generator) -> Iterator[list[int]]:
    """Batches of `size` window indices from shuffled passes over the windows, none repeated within a pass (a
    remainder under `size` waits for the next pass; fewer windows than `size`: all of them each step). 64 steps of
    2 then fit each of 128 windows once, where independent draws left about 37% unseen."""
    while True:
        order = torch.randperm(count, generator=generator).tolist()
        for start in range(0, count - size + 1, size):
            yield order[start : start + size]
        if count < size:
            yield order


def _optimizer(parameters: dict[str, nn.Parameter], settings: FitSettings, reference: float):
    optimizer = torch.optim.AdamW(parameters.values(), lr=settings.lr, weight_decay=0.0)
    off_scale = off_scale_parameters(parameters.items(), reference)
    if off_scale:  # MLA's shrunken latent rows: plain Adam steps would throw them out of the norm's linear range
        SizeScaledRows([parameters[name] for name in off_scale], reference).attach(optimizer)
    warmup = max(1, settings.steps // 10)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))


@dataclass(frozen=True)
class HeldOut:
    """Windows a fit is checked on instead of fitted, and the relative error the attention starts from on them."""

    pairs: WindowPairs
    start: float

    @classmethod
    def measured(cls, attention: nn.Module, runner: AttentionRunner, pairs: WindowPairs) -> HeldOut:
        return cls(pairs, output_errors(attention, runner, pairs)[1])


class _Best:
    """The trained tensors at the lowest held-out error seen so far (the starting point counts)."""

    def __init__(self, parameters: dict[str, nn.Parameter], error: float):
        self.parameters, self.error, self.stale = parameters, error, 0
        self.saved = {name: p.detach().clone() for name, p in parameters.items()}

    def offer(self, error: float) -> None:
        if error < self.error:
            self.error, self.stale = error, 0
            self.saved = {name: p.detach().clone() for name, p in self.parameters.items()}
        else:
            self.stale += 1

    @torch.no_grad()
    def restore(self) -> None:
        for name, parameter in self.parameters.items():
            parameter.copy_(self.saved[name])


def fit_attention(attention: nn.Module, parameters: dict[str, nn.Parameter], runner: AttentionRunner,
                  fitting: WindowPairs, settings: FitSettings, generator: torch.Generator, reference: float,
                  heldout: HeldOut | None = None) -> dict[str, Any]:
    """AdamW on the mean squared error between attention(inputs) and targets over `fitting`, micro_batch_size
    windows a step, training `parameters` only (rows far off `reference` size-scaled). With `heldout` and
    `settings.checks`, the held-out error is measured every ceil(steps / checks) steps and after the last: a check
    without a new best sends the tensors back to the best point and halves the learning rate (a backtrack), two in
    a row stop the fit, as does a non-finite loss, and it ends at the best tensors seen (the start included);
    without checks a non-finite loss or end ends at the start. Returns the errors before and after on the first
    MEASURED_WINDOWS fitting windows (and on `heldout`), the steps run, the backtracks and why it stopped."""
    for parameter in attention.parameters():
        parameter.requires_grad_(False)
    for parameter in parameters.values():
        parameter.requires_grad_(True)
    attention.train()
    optimizer, scheduler = _optimizer(parameters, settings, reference)
    measured = fitting.first(MEASURED_WINDOWS)
    start = output_errors(attention, runner, measured)
    checking = heldout is not None and settings.checks > 0
    best = _Best(parameters, heldout.start if checking else math.inf)
    interval = max(1, math.ceil(settings.steps / settings.checks)) if checking else 0
    order, steps_run, stopped = window_batches(len(fitting), settings.micro_batch_size, generator), 0, "steps"
    backtracks = 0
    for step in range(settings.steps):
        loss = _batch_loss(attention, runner, fitting, next(order), settings.precision)
        if not torch.isfinite(loss):
            stopped = "diverged"
            break
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        steps_run = step + 1
        if checking and (steps_run % interval == 0 or steps_run == settings.steps):
            best.offer(_finite_or_inf(output_errors(attention, runner, heldout.pairs)[1]))
            if best.stale >= 2:
                stopped = "early"
                break
            if best.stale:  # overshot: back to the best point, at half the step size, with fresh moments
                _backtrack(best, optimizer, scheduler)
                backtracks += 1
    attention.eval()
    if checking or stopped == "diverged":  # the best held-out point; without checks, a divergence ends at the start
        best.restore()
    end = output_errors(attention, runner, measured)
    if not math.isfinite(end[0]):  # the last step blew up, after the last loss was seen
        best.restore()
        stopped, end = "diverged", output_errors(attention, runner, measured)
    result = {"mse_start": start[0], "mse_end": end[0], "relative_start": start[1], "relative_end": end[1],
              "steps": steps_run, "stopped": stopped, "backtracks": backtracks}
    if heldout is not None:  # with checks the fit ends at the best point, whose held-out error `best` holds
        end_heldout = best.error if checking else output_errors(attention, runner, heldout.pairs)[1]
        result.update(heldout_relative_start=heldout.start, heldout_relative_end=end_heldout)
    return result


def _backtrack(best: _Best, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    """The trained tensors back at their best point and the learning rate halved from here on: a step size that
    suits a closed form far from the source overshoots one that is nearly exact."""
    best.restore()
    optimizer.state.clear()
    scheduler.base_lrs = [lr / 2 for lr in scheduler.base_lrs]
    for group in optimizer.param_groups:
        group["lr"] /= 2


def _finite_or_inf(value: float) -> float:
    return value if math.isfinite(value) else math.inf


def attention_module(tensor_name: str, prefix: str) -> str:
    """The attention module's path inside a decoder layer, from one of its tensors' full names ('self_attn')."""
    return tensor_name[len(prefix) :].split(".", 1)[0]


@dataclass(frozen=True)
class LayerFit:
    """One converted layer's fit: `inputs` ([windows, T, hidden]) are what the source attention of decoder layer
    `layer` received on the calibration windows; `tensors` the converted attention (full names, float32), of which
    `trainable` are fitted; every `heldout`-th window decides early stopping instead of being fitted.
    `source_module` is the source layer's attention module ('self_attn'), which the converted one (the module
    holding `tensors`: attention, or a Mamba-2 mixer) is fitted to."""

    source: StockModel
    target: StockModel
    source_module: str
    layer: int
    inputs: torch.Tensor
    tensors: dict[str, torch.Tensor]
    trainable: Collection[str]
    settings: FitSettings
    heldout_windows: int


def heldout_indices(windows: int, heldout: int) -> list[int]:
    """`heldout` window indices spread evenly over `windows` (calibration text changes along its length)."""
    return sorted({min(windows - 1, int((i + 0.5) * windows / heldout)) for i in range(heldout)})


def _source_pairs(fit: LayerFit) -> WindowPairs:
    """The windows on the layer's device and what the source attention gave on them."""
    source_attention = fit.source.layer(fit.layer).get_submodule(fit.source_module)
    runner = AttentionRunner(AttentionTables(fit.source), fit.layer)
    inputs = [window.to(fit.source.device) for window in fit.inputs]
    with torch.no_grad():
        targets = [runner(source_attention, window).float() for window in inputs]
    return WindowPairs(inputs, targets)


def fit_converted_attention(fit: LayerFit) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The layer's converted attention tensors fitted to the source attention's output, and the fit's report entry
    (errors before and after on fitted and held-out windows, steps, seconds). The closed-form tensors are returned
    unchanged, the report saying why, where they are already exact (nothing to fit), or where the fit diverges or
    lowers the held-out error by less than MIN_GAIN."""
    started = time.perf_counter()
    prefix = fit.target.path(fit.target.decoder.layers[fit.layer]) + "."
    module = attention_module(next(iter(fit.tensors)), prefix)
    fitting, heldout_pairs = _split(_source_pairs(fit), fit.heldout_windows)
    layer = fit.target.layer(fit.layer, fit.tensors)
    attention, runner = layer.get_submodule(module), AttentionRunner(AttentionTables(fit.target), fit.layer)
    heldout = HeldOut.measured(attention, runner, heldout_pairs)
    closed_form = heldout.start
    if closed_form < EXACT:
        return fit.tensors, {"heldout_relative_start": closed_form, "kept_closed_form": "already exact", "seconds": 0.0}
    parameters = _trainable(attention, f"{prefix}{module}.", fit.trainable)
    generator = torch.Generator().manual_seed(fit.layer)
    result = fit_attention(attention, parameters, runner, fitting, fit.settings, generator,
                           reference_rms(layer.parameters()), heldout=heldout)
    seconds = round(time.perf_counter() - started, 2)
    if result["stopped"] == "diverged" or result["heldout_relative_end"] > (1 - MIN_GAIN) * closed_form:
        reason = "the fit diverged" if result["stopped"] == "diverged" else "no held-out gain"
        # the written tensors are the closed form's: its errors stand as the layer's, the discarded fit's apart
        return fit.tensors, {"heldout_relative_start": closed_form, "kept_closed_form": reason, "tried": result,
                             "seconds": seconds}
    report = {**result, "windows": len(fitting), "heldout_windows": len(heldout_pairs), "trained": sorted(parameters),
              "seconds": seconds}
    fitted = {name: p.detach().to("cpu", torch.float32).clone() for name, p in parameters.items()}
    return {**fit.tensors, **fitted}, report


def _trainable(attention: nn.Module, prefix: str, names: Collection[str]) -> dict[str, nn.Parameter]:
    """The attention's parameters named (with `prefix`, their full checkpoint names) in `names`, all of them."""
    parameters = {prefix + key: p for key, p in attention.named_parameters() if prefix + key in names}
    missing = sorted(set(names) - set(parameters))
    if missing or not parameters:
        raise KvshrinkError(
            f"the fit would train {missing[0] if missing else 'nothing'}, which the converted attention module does "
            "not hold as a parameter: pass --fit none (and report this as a bug)"
        )
    return parameters


def _split(pairs: WindowPairs, heldout: int) -> tuple[WindowPairs, WindowPairs]:
    """(fitted, held-out) windows, the held-out ones spread evenly over the calibration text."""
    held = set(heldout_indices(len(pairs), heldout))
    sides = [[i for i in range(len(pairs)) if (i in held) == side] for side in (False, True)]
    return tuple(WindowPairs([pairs.inputs[i] for i in s], [pairs.targets[i] for i in s]) for s in sides)


def fit_summary(settings: dict[str, Any], layers: list[dict[str, Any]]) -> dict[str, Any]:
    """The report's summary of every layer's fit (`layers`: per-layer report entries, with a "fit" where one was
    tried) beside the `settings` it ran with: the mean held-out error before and after (closed-form layers count
    with their own error), the layers that kept their closed form and why, seconds."""
    fits = {entry["layer"]: entry["fit"] for entry in layers
            if "fit" in entry and entry["fit"].get("kept_closed_form") != UNCHANGED}
    kept = {str(layer): fit["kept_closed_form"] for layer, fit in fits.items() if "kept_closed_form" in fit}
    summary = {**settings, "layers_fitted": len(fits) - len(kept), "kept_closed_form": kept,
               "seconds": round(sum(fit.get("seconds", 0.0) for fit in fits.values()), 1)}
    if fits:
        start = [fit["heldout_relative_start"] for fit in fits.values()]
        end = [fit.get("heldout_relative_end", fit["heldout_relative_start"]) for fit in fits.values()]
        summary.update(heldout_relative_start_mean=round(sum(start) / len(start), 6),
                       heldout_relative_end_mean=round(sum(end) / len(end), 6))
    return summary


def require_fit_windows(windows: int, heldout: int) -> None:
    """Refuse a fit that would have no calibration window left to fit once `heldout` are held out."""
    if windows <= heldout:
        raise KvshrinkError(
            f"the fit holds out {heldout} of the {windows} calibration windows, leaving none to fit: pass more "
            "--calibration-tokens (512 a window), fewer --fit-heldout-windows, or --fit none"
        )
