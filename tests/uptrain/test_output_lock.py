"""One run per output_dir: a second run refuses while the first lives, and a run killed with SIGKILL while it
saves a checkpoint leaves nothing that the next run does not remove (uptrain/checkpoints.py claim_output_dir)."""

from __future__ import annotations

import socket

from click.testing import CliRunner
from paused_runs import left_behind, start_paused, tree_digest

from kvshrink.uptrain.cli import uptrain_cli

CHECKPOINT_SAVE = "accelerate:Accelerator.save_state"  # paused once the state is in .step-N.partial, not renamed


def test_a_second_run_refuses_and_a_run_killed_while_saving_leaves_nothing(tmp_path, tiny_llama_dir, write_recipe):
    before = tree_digest(tiny_llama_dir)
    output = tmp_path / "out"
    recipe = write_recipe(model=str(tiny_llama_dir), max_steps=4, save_interval=2)
    first = start_paused(tmp_path / "control", CHECKPOINT_SAVE, 1, "uptrain", recipe)

    second = CliRunner().invoke(uptrain_cli, [str(recipe)])
    assert second.exit_code == 1 and "Traceback" not in second.output, second.output
    assert second.output.strip().splitlines() == [second.output.strip()]  # one line
    assert f"{output} is being written by process {first.pid} on {socket.gethostname()} since " in second.output
    assert "--break-lock" in second.output

    first.kill()
    partial = output / "checkpoints" / ".step-00000002.partial"
    assert partial.is_dir() and len(list(tmp_path.glob(".out.lock-*"))) == 1

    rerun = CliRunner().invoke(uptrain_cli, [str(recipe)])
    assert rerun.exit_code == 0, rerun.output
    assert f"left by process {first.pid} on {socket.gethostname()} since " in rerun.output
    assert f"removed {partial}, left by a run on this output_dir that no longer runs" in rerun.output
    assert (output / "uptrain_report.json").is_file() and (output / "checkpoints" / "step-00000004").is_dir()
    assert left_behind(tmp_path) == []
    assert tree_digest(tiny_llama_dir) == before
