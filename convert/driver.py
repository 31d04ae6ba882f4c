"""The one conversion driver: every converter runs the same visible sequence, one decoder layer in memory.

open the source -> refuse (the method's refusals; nothing is written) -> free space for everything it will write
(before any calibration) -> calibrate (the method's pass over calibration text, a value) -> plan (the target
configs, one or more target models, what the check scores) -> per layer: the layer's calibration inputs, the
method's tensors and report entry for each target, the fit (calibrated methods), the writers, the windows advanced
-> check (every model streamed) -> family support -> report.

A method (`Method`) supplies only what is its own: its refusals, the models it will write (for the free-space
check), its calibration, its plan and `convert_layer`. GQA/MQA (`mha_to_gqa`), MLA (`mha_to_mla`) and sliding
windows (`sliding_window`) are methods of this driver.
"""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm import tqdm

from kvshrink.convert.calibration import AttentionInputs, Calibration, calibration_windows
from kvshrink.convert.check import compare_perplexity
from kvshrink.convert.corpora import calibration_text, check_text
from kvshrink.convert.fitting import UNCHANGED, LayerFit, fit_converted_attention, fit_summary, require_fit_windows
from kvshrink.convert.frame import (
    Conversion, Derived, LayerWriter, finish, open_conversion, require_free_space, write_metadata,
)
from kvshrink.convert.layers import StockModel
from kvshrink.convert.options import ConvertOptions, FittedOptions

LayerResult = tuple[dict[str, torch.Tensor], dict[str, Any]]  # a layer's tensors (full names, float32), its report


@dataclass
class TargetPlan:
    """One checkpoint the conversion writes: the output, or a model the check scores beside it (`name`)."""

    name: str  # "converted" for the output; the check's name for a scored model
    config: dict[str, Any]
    layout: Any = None  # the method's own per-target decisions, handed back to `convert_layer`


@dataclass
class Plan:
    """Everything model-wide, decided before any layer is written."""

    method: str  # the report's method name
    targets: list[TargetPlan]  # the output first
    calibration: Calibration | None  # windows at layer 0 for the per-layer pass; None: layers need no inputs
    summary: dict[str, Any]  # the method's part of the report
    derived: Derived | None = None  # target tensors made of source rows: split, fused or renamed
    check_window: int | None = None  # tokens a check window holds (None: compare_perplexity's default)
    layer_summaries: list[Any] | None = None  # what calibration left of each layer for the per-layer pass
    scored_refusals: dict[str, str] = field(default_factory=dict)  # models the check would score, refused: why

    @property
    def output(self) -> TargetPlan:
        return self.targets[0]


class Method(Protocol):
    """What a converter supplies to the driver."""

    support: str  # its key in the family specs' support matrix ("gqa", "mla", "window")
    fits_every_tensor: bool  # the fit trains all of a layer's converted tensors, whatever --fit-scope says
    options: ConvertOptions

    def refuse(self, conversion: Conversion) -> None:
        """Raise KvshrinkError for what this method cannot do with the source, before anything is read or written."""

    def sized_targets(self, conversion: Conversion) -> list[StockModel]:
        """The models it will write, at their final sizes (their values may still depend on calibration)."""

    def calibrate(self, conversion: Conversion) -> Any:
        """The method's calibration, as a value for `plan` (None when it needs none)."""

    def plan(self, conversion: Conversion, calibration: Any) -> Plan: ...

    def convert_layer(self, conversion: Conversion, plan: Plan, layer: int,
                      inputs: AttentionInputs | None) -> list[LayerResult]:
        """Layer `layer` for each of `plan.targets`, in order; `inputs` are what its attention received from the
        calibration windows (None when the plan has no calibration)."""

    def report_check(self, plan: Plan, check: dict[str, Any]) -> dict[str, Any]:
        """The check's result as the report gives it (e.g. the scored models' part moved into its own entry)."""


def calibration_inputs(conversion: Conversion, options: FittedOptions) -> list[torch.Tensor]:
    """The calibration windows of a calibrated method (its closed form and the fit read them)."""
    windows = calibration_windows(conversion.checkpoint.folder, calibration_text(options.calibration),
                                  options.calibration_tokens)
    if options.fit != "none":
        require_fit_windows(len(windows), options.fit_heldout_windows)
    return windows


@dataclass
class _Target:
    """A planned target being written: its folder, its stock model (for the fit and error feedback), its writer."""

    plan: TargetPlan
    folder: Path
    model: StockModel
    writer: LayerWriter
    layers: list[dict[str, Any]] = field(default_factory=list)  # the report entries of the layers written
    new_parameters: list[str] = field(default_factory=list)  # names created or changed, once every layer is written


def _fitting(options: ConvertOptions) -> bool:
    return isinstance(options, FittedOptions) and options.fit != "none"


def _fit(conversion: Conversion, method: Method, calibration: Calibration, target: _Target, layer: int,
         inputs: AttentionInputs, result: LayerResult, changed: list[str]) -> LayerResult:
    """The layer's converted attention fitted to the source attention's output on its calibration inputs (`changed`:
    the names among its tensors that differ from the source's)."""
    tensors, report = result
    options = conversion.options
    every = method.fits_every_tensor or options.fit_scope == "attention"
    trainable = list(tensors) if every else changed
    fitted, report["fit"] = fit_converted_attention(LayerFit(
        calibration.model, target.model, conversion.spec.attention_module, layer, inputs.inputs, tensors, trainable,
        options.fit_settings(conversion.device), options.fit_heldout_windows,
    ))
    return fitted, report


def _approximate(tensors: dict[str, torch.Tensor], changed: list[str]) -> bool:
    """Whether a converted layer differs from the source: a `changed` tensor that is not all zero (a linear hybrid's
    kept attention layer only gains the zero biases its class needs)."""
    return any(bool(tensors[name].abs().max() > 0) for name in changed)


def _convert_layer(conversion: Conversion, method: Method, plan: Plan, targets: list[_Target], layer: int) -> None:
    """Layer `layer` converted (and fitted) for every target and written; the windows advance past it, through the
    output's converted layer with error feedback. Its inputs and tensors die here, before the next layer runs."""
    calibration = plan.calibration
    inputs = calibration.attention_inputs(layer) if calibration is not None else None
    feedback = None
    for target, result in zip(targets, method.convert_layer(conversion, plan, layer, inputs), strict=True):
        if inputs is not None and _fitting(conversion.options):
            changed = conversion.changed_tensors(result[0])
            if _approximate(result[0], changed):
                result = _fit(conversion, method, calibration, target, layer, inputs, result, changed)
            else:
                result = (result[0], {**result[1], "fit": {"kept_closed_form": UNCHANGED}})
        tensors, report = result
        target.writer.write_layer(layer, tensors)
        target.layers.append(report)
        if feedback is None and isinstance(conversion.options, FittedOptions) and conversion.options.error_feedback:
            feedback = tensors
        del tensors, result
    del inputs
    if calibration is not None and feedback is not None:
        output = targets[0].model
        calibration.advance(layer, output.layer(layer, feedback), output)
    elif calibration is not None:
        calibration.advance(layer)


def _write(conversion: Conversion, method: Method, plan: Plan, folders: list[Path]) -> list[_Target]:
    """Every layer of every target converted and written, then each target's remaining tensors and metadata."""
    targets = [
        _Target(target, folder, conversion.target_model(target.config, plan.derived),
                LayerWriter(conversion, folder, plan.derived))
        for target, folder in zip(plan.targets, folders, strict=True)
    ]
    steps = "converting" if plan.calibration is not None else "writing"
    for layer in tqdm(range(conversion.counts.num_layers), desc=steps, unit="layer",
                      disable=not conversion.options.progress):
        _convert_layer(conversion, method, plan, targets, layer)
    for target in targets:
        target.new_parameters = target.writer.finish(conversion.counts.num_layers)
        write_metadata(conversion, target.plan.config, target.folder)
    return targets


def _check(conversion: Conversion, method: Method, plan: Plan, targets: list[_Target]) -> dict[str, Any]:
    """Source, output and every scored model's perplexity on the calibration corpus's held-out text."""
    options = conversion.options
    folders = {"source": conversion.checkpoint.folder} | {target.plan.name: target.folder for target in targets}
    window = {} if plan.check_window is None else {"window": plan.check_window}
    result = compare_perplexity(conversion.checkpoint.folder, folders, check_text(options.calibration),
                                options.check_tokens, conversion.device, progress=options.progress, **window)
    return method.report_check(plan, result)


def _summary(conversion: Conversion, method: Method, plan: Plan, layers: list[dict[str, Any]]) -> dict[str, Any]:
    support = conversion.spec.support(method.support)
    summary = {**plan.summary, "family_support": {"family": conversion.spec.model_type, "level": support.level,
                                                  "why": support.why}}
    options = conversion.options
    if plan.calibration is not None and isinstance(options, FittedOptions):
        summary["fit"] = fit_summary(options.fit_report(conversion.device), layers) if options.fit != "none" else None
    return summary


def _scored_folders(conversion: Conversion, plan: Plan, scratch: contextlib.ExitStack) -> list[Path]:
    """A scratch folder for each model the check scores beside the output, inside the staging folder (so it is
    gone on success, on error and on Ctrl-C alike) and removed when `scratch` closes."""
    return [
        Path(scratch.enter_context(tempfile.TemporaryDirectory(prefix=f".{target.name}-", dir=conversion.staging)))
        for target in plan.targets[1:]
    ]


def convert(source: str | Path, out: str | Path, method: Method) -> dict[str, Any]:
    """Run `method` on `source` and write its output to `out` (staged beside it, renamed into place when complete);
    returns the report also written to OUT/kvshrink_report.json."""
    with open_conversion(source, out, method.options) as conversion:
        method.refuse(conversion)
        require_free_space(conversion, *method.sized_targets(conversion))
        calibration = method.calibrate(conversion)
        plan = method.plan(conversion, calibration)
        del calibration  # what the plan keeps of it is in the plan
        with contextlib.ExitStack() as scratch:
            folders = [conversion.staging] + _scored_folders(conversion, plan, scratch)
            targets = _write(conversion, method, plan, folders)
            check = _check(conversion, method, plan, targets) if conversion.options.check else None
        output = targets[0]
        return finish(conversion, method=plan.method, config=output.plan.config,
                      summary=_summary(conversion, method, plan, output.layers), layers=output.layers,
                      new_parameters=output.new_parameters, check=check)
