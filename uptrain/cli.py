"""Command line: `uptrain RECIPE.yaml [key=value ...]` (also `kvshrink uptrain` and `python -m kvshrink.uptrain`)."""

from __future__ import annotations

from pathlib import Path

import click

from kvshrink.convert.errors import KvshrinkError
from kvshrink.convert.staging import break_lock_option

HELP = """Uptrain a converted checkpoint as RECIPE.yaml says; key=value pairs override recipe keys.

\b
Dotted keys reach nested ones and values are read as YAML:
  uptrain recipes/smollm2-mqa-cpu.yaml max_steps=20 optimizer.lr=3e-4 teacher=null loss.kind=lm
\b
On GPUs, launch the same command through accelerate (one GPU, DDP, FSDP2, DeepSpeed ZeRO-3, several nodes):
  accelerate launch --config_file recipes/accelerate/fsdp.yaml -m kvshrink.uptrain RECIPE.yaml
\b
The trained model, in the input's stock transformers format, and uptrain_report.json are written to the
recipe's output_dir; checkpoints go to output_dir/checkpoints.
"""


@click.command(help=HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("recipe", type=click.Path(path_type=Path))
@click.argument("overrides", nargs=-1)
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in output_dir (if there is one).")
@break_lock_option
def uptrain_cli(recipe: Path, overrides: tuple[str, ...], resume: bool, break_lock: bool):
    from kvshrink.uptrain.recipe import load_recipe

    try:
        loaded = load_recipe(recipe, overrides)
        from kvshrink.uptrain.trainer import uptrain

        uptrain(loaded, resume=resume or None, break_lock=break_lock)
    except KvshrinkError as error:
        raise click.ClickException(str(error)) from None
