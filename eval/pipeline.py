"""`kvshrink pipeline`: convert -> optional uptrain -> eval -> compare -> report.md, all in one output folder.

A pipeline file is plain YAML validated into the pydantic models below before any model is loaded. Each step writes
its own folder atomically, so `--resume` can skip every step whose folder is already complete.
"""

from __future__ import annotations

import importlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import click
import yaml
from pydantic import Field, model_validator

from kvshrink.convert.errors import KvshrinkError
from kvshrink.convert.model_card import REPORT_FILE
from kvshrink.convert.option_models import Naming, OptionsModel, build, build_options
from kvshrink.convert.outdir import check_output_dir
from kvshrink.convert.staging import break_lock_option, run_lock
from kvshrink.eval.models import ModelFolder, check_model_dirs
from kvshrink.eval.options import EvalOptions

EXAMPLE_PREFIX = "example:"
Command = Literal["mha-to-gqa", "mha-to-mqa", "mha-to-mla", "add-sliding-window", "add-linear-attention"]
# Each command's library function and options model (convert/options.py, the one its CLI flags come from), imported
# only when a pipeline runs or validates that command.
CONVERTERS: dict[str, tuple[str, str, str]] = {
    "mha-to-gqa": ("kvshrink.convert.mha_to_gqa", "mha_to_gqa", "GqaOptions"),
    "mha-to-mqa": ("kvshrink.convert.mha_to_gqa", "mha_to_gqa", "GqaOptions"),
    "mha-to-mla": ("kvshrink.convert.mha_to_mla", "mha_to_mla", "MlaOptions"),
    "add-sliding-window": ("kvshrink.convert.sliding_window", "add_sliding_window", "SlidingWindowOptions"),
    "add-linear-attention": ("kvshrink.convert.linear_attention", "add_linear_attention", "LinearAttentionOptions"),
}
# The stock classes MLA and linear hybrids are written in have no sliding window (add-sliding-window refuses them).
UNWINDOWABLE = {"mha-to-mla": "its DeepseekV3 output has no sliding window",
                "add-linear-attention": "its GraniteMoeHybrid output has no sliding window"}


class ConversionStep(OptionsModel):
    """One conversion a pipeline runs: a convert command and its options."""

    name: str  # folder name under models/ and the label in every table
    command: Command
    options: dict[str, Any] = Field(default_factory=dict)  # fields of the command's options model (convert/options.py)
    source: str | None = None  # the name of another conversion whose output this one converts; None: the source


class Uptraining(OptionsModel):
    conversion: str  # the name of the conversion to train; the result is labelled "<name>-uptrained"
    recipe: str  # a recipe YAML; its model, teacher and output_dir are set by the pipeline
    overrides: list[str] = Field(default_factory=list)  # extra `key=value` recipe overrides


class Pipeline(OptionsModel):
    source: str  # a model folder, hub id, .gguf file, or "example:smollm2"
    output_dir: str
    conversions: list[ConversionStep]
    uptraining: list[Uptraining] = Field(default_factory=list)
    evaluation: EvalOptions = Field(default_factory=EvalOptions)

    @model_validator(mode="after")
    def _steps_fit_together(self) -> Pipeline:
        """Names unique, references resolvable, each conversion's options valid for its command."""
        try:
            names = [c.name for c in self.conversions]
            if not names:
                raise KvshrinkError("`conversions` is empty: list at least one conversion")
            duplicates = {name for name in names if names.count(name) > 1} | ({"source"} & set(names))
            if duplicates:
                raise KvshrinkError(
                    f"conversion names must be unique and not 'source': rename {', '.join(sorted(duplicates))}"
                )
            for conversion in self.conversions:
                _options(conversion)
            in_source_order(self.conversions)
            for step in self.uptraining:
                if step.conversion not in names:
                    raise KvshrinkError(f"uptraining names conversion {step.conversion!r}, which is not listed: use "
                                        f"one of {', '.join(names)}")
            if self.source.startswith(EXAMPLE_PREFIX) and self.source != f"{EXAMPLE_PREFIX}smollm2":
                raise KvshrinkError(f"unknown example {self.source!r}: the embedded example is example:smollm2")
        except KvshrinkError as problem:
            raise ValueError(str(problem)) from None
        return self


def _converter(command: Command):
    """(library function, its options model) of a conversion command."""
    from kvshrink.convert import options

    module, function, model = CONVERTERS[command]
    return getattr(importlib.import_module(module), function), getattr(options, model)


def _options(conversion: ConversionStep, **given: Any):
    """The conversion's options validated by the command's options model (the one its CLI flags come from)."""
    from kvshrink.convert.options import FIXED_OPTIONS

    fixed = FIXED_OPTIONS.get(conversion.command, {})
    for key, value in fixed.items():
        if key in conversion.options:
            raise KvshrinkError(f"conversion {conversion.name!r}: {conversion.command} sets {key} to {value} itself: "
                                f"remove `{key}` from its options (mha-to-gqa takes any)")
    values = {**conversion.options, **fixed, **given}
    return build_options(_converter(conversion.command)[1], values, f"conversion {conversion.name!r}")


def in_source_order(conversions: list[ConversionStep]) -> list[ConversionStep]:
    """`conversions` ordered so each runs after the conversion it names as `source`; a one-line error for an
    unknown name, a cycle, or a window over an output that cannot have one."""
    by_name = {conversion.name: conversion for conversion in conversions}
    ordered: list[ConversionStep] = []
    for conversion in conversions:
        chain: list[str] = []
        step: ConversionStep | None = conversion
        while step is not None and step not in ordered:
            if step.name in chain:
                cycle = " -> ".join([*chain[chain.index(step.name):], step.name])
                raise KvshrinkError(
                    f"conversion sources form a cycle ({cycle}): let one of them read the pipeline's source"
                )
            chain.append(step.name)
            if step.source is not None and step.source not in by_name:
                raise KvshrinkError(
                    f"conversion {step.name!r} names source {step.source!r}, which is not listed: use one of "
                    f"{', '.join(by_name)} or leave source out"
                )
            upstream = by_name.get(step.source) if step.source else None
            if upstream and step.command == "add-sliding-window" and upstream.command in UNWINDOWABLE:
                raise KvshrinkError(
                    f"conversion {step.name!r} cannot window {upstream.name!r} ({upstream.command}): "
                    f"{UNWINDOWABLE[upstream.command]}; window the source or a GQA/MQA conversion"
                )
            step = upstream
        ordered += [by_name[name] for name in reversed(chain) if by_name[name] not in ordered]
    return ordered


def load_pipeline(path: str | Path) -> Pipeline:
    """Read and validate a pipeline YAML file (names unique, references resolvable, options known); its
    conversions come back in the order they run."""
    path = Path(path)
    if not path.is_file():
        raise KvshrinkError(
            f"pipeline file {path} does not exist: pass a YAML file such as recipes/pipeline-smollm2-cpu.yaml"
        )
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise KvshrinkError(f"{path} is not valid YAML ({str(error).splitlines()[0]}): fix the file") from None
    pipeline = build(Pipeline, raw, Naming("pipeline key", scope=str(path), style="dotted"))
    for step in pipeline.uptraining:
        if not Path(step.recipe).is_file():
            raise KvshrinkError(f"{path}: uptraining recipe {step.recipe} does not exist: fix the path")
    return pipeline.model_copy(update={"conversions": in_source_order(pipeline.conversions)})


@dataclass
class _Layout:
    """Where each step of a pipeline writes, under its output folder."""

    root: Path

    @property
    def source(self) -> Path:
        return self.root / "models" / "source"

    def model(self, name: str) -> Path:
        return self.root / "models" / name

    def uptrained(self, name: str) -> Path:
        return self.root / "models" / f"{name}-uptrained"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def compare(self) -> Path:
        return self.root / "compare"

    @property
    def report(self) -> Path:
        return self.root / "report.md"


def _announce(step: str) -> None:
    click.secho(f"==> {step}", bold=True, err=True)


def _source_folder(source: str, layout: _Layout, resume: bool, break_lock: bool) -> Path:
    """A Hugging Face folder for the source: given, or materialized from the example or a .gguf file."""
    from kvshrink.convert.checkpoint import open_source
    from kvshrink.convert.example import materialize_gguf, smollm2_gguf_path
    from kvshrink.convert.outdir import atomic_output_dir

    if Path(source).is_dir():
        return Path(source).resolve()
    if source.startswith(EXAMPLE_PREFIX) or Path(source).is_file():
        if not (resume and layout.source.is_dir()):
            _announce(f"materializing {source}")
            gguf = smollm2_gguf_path() if source.startswith(EXAMPLE_PREFIX) else Path(source)
            with atomic_output_dir(layout.source, overwrite=True, break_lock=break_lock) as staging:
                materialize_gguf(gguf, staging)
        return layout.source
    with open_source(source) as checkpoint:  # a hub id: the cached snapshot folder stays after closing
        return checkpoint.folder


def _uptrain(step: Uptraining, model: Path, teacher: Path, out: Path, resume: bool, break_lock: bool) -> None:
    from kvshrink.uptrain import load_recipe, uptrain

    distills = (yaml.safe_load(Path(step.recipe).read_text()) or {}).get("teacher") is not None
    overrides = [f"teacher={teacher}"] if distills else []
    overrides += [*step.overrides, f"model={model}", f"output_dir={out}", f"resume={str(resume).lower()}"]
    uptrain(load_recipe(step.recipe, overrides), break_lock=break_lock)


def _models_table(models: list[ModelFolder]) -> str:
    from kvshrink.convert.kvcache import LONG_CONTEXTS, bytes_held_per_token

    held_columns = " | ".join(f"bytes held/token at {context // 1024}K" for context in LONG_CONTEXTS)
    lines = [
        f"| model | method | {held_columns} | reduction at {LONG_CONTEXTS[-1] // 1024}K | check perplexity "
        "(source → converted) | uptrain val. perplexity (start → end) |",
        "|---|---|" + "---:|" * (len(LONG_CONTEXTS) + 1) + "---|---|",
    ]
    base_held = None
    for model in models:
        held = list(bytes_held_per_token(model.config).values())
        base_held = base_held or held[-1]
        conversion = _read_optional(model.path / REPORT_FILE)
        uptrained = _read_optional(model.path / "uptrain_report.json")
        check = conversion.get("check", {})
        check_text = f"{check['source_perplexity']:.2f} → {check['converted_perplexity']:.2f}" if check else ""
        up_text = ""
        if uptrained:
            up_text = f"{uptrained['val_perplexity_start']:.2f} → {uptrained['val_perplexity_end']:.2f}"
        method = conversion.get("method", "source") + (" + uptrain" if uptrained else "")
        held_text = " | ".join(f"{value:,.0f}" for value in held)
        lines.append(f"| {model.label} | {method} | {held_text} | {base_held / held[-1]:.2f}× | {check_text} "
                     f"| {up_text} |")
    return "\n".join(lines)


def _read_optional(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def run_pipeline(
    pipeline: Pipeline, *, overwrite: bool = False, resume: bool = False, break_lock: bool = False
) -> Path:
    """Run every step of `pipeline`; returns the path of the report.md it writes. A lock beside the output folder,
    held meanwhile, makes a second pipeline (or any writer) that targets it refuse."""
    started = time.perf_counter()
    with run_lock(pipeline.output_dir, break_lock) as root:
        layout = _Layout(root)
        if layout.root.exists() and not resume:
            check_output_dir(layout.root, overwrite)
            shutil.rmtree(layout.root)
        return _run_steps(pipeline, layout, resume, break_lock, started)


def _run_steps(pipeline: Pipeline, layout: _Layout, resume: bool, break_lock: bool, started: float) -> Path:
    """Convert, uptrain, evaluate, compare and report into `layout`; with `resume`, skip the finished steps."""
    from kvshrink.eval.compare import compare_results
    from kvshrink.eval.run import run_eval

    source = _source_folder(pipeline.source, layout, resume, break_lock)
    models: list[Path] = [source]
    for conversion in in_source_order(pipeline.conversions):
        out = layout.model(conversion.name)
        if not (resume and out.is_dir()):
            origin = layout.model(conversion.source) if conversion.source else source
            _announce(f"converting {conversion.name} ({conversion.command} of {conversion.source or 'the source'})")
            _converter(conversion.command)[0](origin, out, _options(conversion, overwrite=True, break_lock=break_lock))
        models.append(out)
    for step in pipeline.uptraining:
        out = layout.uptrained(step.conversion)
        if not (resume and (out / "uptrain_report.json").is_file()):
            _announce(f"uptraining {step.conversion} with {step.recipe}")
            _uptrain(step, layout.model(step.conversion), source, out, resume and out.is_dir(), break_lock)
        models.append(out)
    evaluation = pipeline.evaluation
    if not (resume and layout.eval.is_dir()):
        _announce(f"evaluating {len(models)} models on {', '.join(evaluation.tasks)}")
        run_eval(models, layout.eval, evaluation, overwrite=True, break_lock=break_lock)
    _announce("comparing")
    labelled = check_model_dirs(models)
    comparison = compare_results([layout.eval / model.label for model in labelled], layout.compare, overwrite=True,
                                 break_lock=break_lock)
    report = (
        f"# kvshrink pipeline report\n\nSource: `{pipeline.source}`. Output folder: `{layout.root}`. "
        f"Wall time {time.perf_counter() - started:.0f} s.\n\n## Models\n\n{_models_table(labelled)}\n\n"
        f"## Quality vs bytes held at 32K tokens of context\n\n![quality vs bytes held](compare/comparison.png)\n\n"
        + comparison.markdown_path.read_text().split("\n", 2)[2]
    )
    layout.report.write_text(report)
    click.echo(comparison.terminal_text())
    return layout.report


@click.command("pipeline")
@click.argument("pipeline_file", metavar="PIPELINE.yaml", type=click.Path(path_type=Path))
@click.option("--overwrite", is_flag=True, help="Delete the pipeline's output folder first if it exists.")
@click.option("--resume", is_flag=True, help="Keep finished steps in the output folder and run only the rest.")
@break_lock_option
def pipeline_cli(pipeline_file: Path, overwrite: bool, resume: bool, break_lock: bool):
    """Convert, optionally uptrain, evaluate and compare in one go; writes report.md and a plot.

    The output folder holds models/ (source, conversions, uptrained models), eval/ (lm-eval results),
    compare/ (tables and comparison.png) and report.md.
    """
    if overwrite and resume:
        raise KvshrinkError("--overwrite and --resume contradict each other: pass one of them")
    pipeline = load_pipeline(pipeline_file)
    report = run_pipeline(pipeline, overwrite=overwrite, resume=resume, break_lock=break_lock)
    click.echo(f"\nreport: {report}")
