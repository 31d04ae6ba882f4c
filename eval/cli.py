"""`kvshrink eval ...`: run lm-eval on model folders, compare the results, measure the KV cache. Parsing only."""

from __future__ import annotations

from pathlib import Path

import click

from kvshrink.convert.cli import KvshrinkGroup, options_from
from kvshrink.convert.option_models import build_options
from kvshrink.convert.staging import break_lock_option, overwrite_option
from kvshrink.eval.options import EvalOptions


def _int_list(value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        numbers = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers, e.g. 512,2048") from None
    if not numbers or min(numbers) < 1:
        raise click.BadParameter(f"{value!r} must list positive context lengths, e.g. 512,2048")
    return numbers


@click.group(cls=KvshrinkGroup, context_settings={"help_option_names": ["-h", "--help"]})
def eval_cli():
    """Evaluate model folders with lm-evaluation-harness, compare them, and measure their KV cache."""


@eval_cli.command("run")
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder for the results (must not exist).")
@options_from(EvalOptions)
@overwrite_option
@break_lock_option
def run_command(models, out, overwrite, break_lock, **fields):
    """Score MODELS (Hugging Face folders; the first is the base) on lm-eval tasks; write results to OUT."""
    from kvshrink.eval.compare import comparison_tables, render_table
    from kvshrink.eval.run import run_eval

    run_eval(models, out, build_options(EvalOptions, fields, cli=True), overwrite=overwrite, break_lock=break_lock)
    _, tables = comparison_tables([out])
    click.echo("\n\n".join(render_table(table) for table in tables))
    click.echo(f"\nResults written to {out.resolve()}; compare runs with `kvshrink eval compare {out} ... --out DIR`")


@eval_cli.command("compare")
@click.argument("result_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Folder for comparison.md, comparison.png and comparison.json (must not exist).")
@overwrite_option
@break_lock_option
def compare_command(result_dirs, out, overwrite, break_lock):
    """Compare RESULT_DIRS written by `eval run` (the first model is the base): tables and a plot of quality
    against bytes held per token at 32K tokens of context."""
    from kvshrink.eval.compare import compare_results

    comparison = compare_results(result_dirs, out, overwrite=overwrite, break_lock=break_lock)
    click.echo(comparison.terminal_text())
    click.echo(f"\nTable: {comparison.markdown_path}\nPlot:  {comparison.plot_path}")


@eval_cli.command("kv")
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--contexts", callback=lambda _c, _p, v: _int_list(v),
              help="Comma-separated context lengths  [default: 512,2048 on cpu, 2048,8192,32768 on a GPU; "
                   "each cut to what every model's max_position_embeddings leaves for the decode steps]")
@click.option("--decode-tokens", default=32, show_default=True, type=click.IntRange(min=1),
              help="Timed decode steps per context length.")
@click.option("--device", help="torch device, e.g. cpu or cuda:0  [default: cuda if available, else cpu]")
def kv_command(models, contexts, decode_tokens, device):
    """Measure the bytes MODELS hold per token (KV cache + recurrent state) from the real cache object, and decode
    speed, vs the first model."""
    from kvshrink.eval.kv import kv_table, measure_kv

    click.echo(kv_table(measure_kv(models, contexts, decode_tokens=decode_tokens, device=device)))
