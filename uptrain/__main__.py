"""`python -m kvshrink.uptrain` / `accelerate launch -m kvshrink.uptrain`: the `uptrain` command."""

from kvshrink.uptrain.cli import uptrain_cli

uptrain_cli(prog_name="uptrain")
