"""Crashes leave nothing behind: a run killed with SIGKILL at any point leaves staging that the next run removes,
and a run to an OUT that a live run is writing refuses in one line (convert/staging.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from paused_runs import left_behind, start_paused, tree_digest

from kvshrink.convert.cli import kvshrink_cli
from kvshrink.convert.outdir import atomic_output_dir
from kvshrink.convert.staging import OWNER_FILE, OWNERLESS_STALE_AFTER, Owner

QUICK = ["--calibration", "pydoc", "--calibration-tokens", "2048", "--check-tokens", "256"]
CALIBRATION = "kvshrink.convert.calibration:Calibration.attention_inputs"
SHARD_WRITE = "kvshrink.convert.safetensors_io:ShardedSafetensorsWriter.add_copy"
CHECK = "kvshrink.convert.layers:LayerStream.negative_log_likelihood"


def kvshrink(*args):
    return CliRunner().invoke(kvshrink_cli, [str(a) for a in args])


def error_line(result) -> str:
    """The refusal: a non-zero exit and one `Error:` line (after any notes on stderr), never a traceback."""
    assert result.exit_code == 1, result.output
    assert result.output.count("Error") == 1 and "Traceback" not in result.output, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("Error: "), result.output
    return last


@pytest.fixture
def source(tiny_checkpoint) -> Path:
    return tiny_checkpoint("llama", num_heads=4, num_kv_heads=4, tokenizer=True)


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])


@pytest.fixture
def live_owner() -> Iterator[Owner]:
    """The owner record of a process that runs while the test does."""
    process = _sleeper()
    yield Owner.of(process.pid)
    process.kill()
    process.wait()


@pytest.fixture
def dead_owner() -> Owner:
    """The owner record of a process that ran and is gone."""
    process = _sleeper()
    owner = Owner.of(process.pid)
    process.kill()
    process.wait()
    return owner


def staging_of(out: Path, owner: Owner | None, tag: str = "x") -> Path:
    """A staging folder of `out` as a run of `owner` leaves it (none: as an older kvshrink leaves it)."""
    staging = out.parent / f".{out.name}.partial-{tag}"
    staging.mkdir(parents=True)
    (staging / "model-00001-of-00002.safetensors").write_bytes(b"\0" * 4096)
    if owner is not None:
        owner.write(staging / OWNER_FILE)
    return staging


@pytest.mark.parametrize(
    ("point", "nth", "options"),
    [(CALIBRATION, 1, ["--method", "grouped"]), (SHARD_WRITE, 3, ["--method", "mean", "--no-check"]),
     (CHECK, 1, ["--method", "mean"])],
    ids=["during-calibration", "while-a-shard-is-written", "during-the-check"],
)
def test_a_conversion_killed_at_any_point_leaves_nothing_after_a_rerun(source, tmp_path, point, nth, options):
    before = tree_digest(source)
    out = tmp_path / "out"
    run = start_paused(tmp_path / "control", point, nth, "convert", "mha-to-mqa", source, out, *QUICK, *options)
    run.kill()
    assert left_behind(tmp_path) and not out.exists()
    if point == SHARD_WRITE:
        assert list(tmp_path.glob(".out.partial-*/shard-*.tmp")), "killed before the shard was opened"

    result = kvshrink("convert", "mha-to-mqa", source, out, "--method", "mean", "--no-check")  # the quickest rerun
    assert result.exit_code == 0, result.output
    assert f"left by process {run.pid} on {socket.gethostname()} since " in result.output
    assert "which no longer runs: freed " in result.output
    assert left_behind(tmp_path) == [] and (out / "model.safetensors").is_file()
    assert tree_digest(source) == before


def test_a_second_conversion_refuses_while_the_first_runs(source, tmp_path):
    out = tmp_path / "out"
    command = ["convert", "mha-to-mqa", source, out, *QUICK, "--method", "mean"]
    first = start_paused(tmp_path / "control", SHARD_WRITE, 3, *command)
    try:
        refusal = error_line(kvshrink(*command))
        assert f"{out} is being written by process {first.pid} on {socket.gethostname()} since " in refusal
        assert "--break-lock" in refusal and not out.exists()
    finally:
        assert first.finish() == 0, first.log.read_text()
    report = json.loads((out / "kvshrink_report.json").read_text())
    assert report["check"]["converted_perplexity"] > 0 and (out / "model.safetensors").is_file()
    assert left_behind(tmp_path) == []


def _writers(source: Path, tmp_path: Path) -> dict[str, tuple[list, Path]]:
    """Each command that writes a folder: its arguments and the folder it writes."""
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump({"source": str(source), "output_dir": str(tmp_path / "run"),
                                        "conversions": [{"name": "mqa", "command": "mha-to-mqa"}]}))
    return {
        "convert": (["convert", "mha-to-mqa", source, tmp_path / "out", "--no-check"], tmp_path / "out"),
        "example": (["example", "smollm2", tmp_path / "example"], tmp_path / "example"),
        "eval-run": (["eval", "run", source, "--tasks", "offline", "--out", tmp_path / "eval"], tmp_path / "eval"),
        "eval-compare": (["eval", "compare", tmp_path / "eval", "--out", tmp_path / "compare"], tmp_path / "compare"),
        "pipeline": (["pipeline", pipeline], tmp_path / "run"),
    }


@pytest.mark.parametrize("writer", ["convert", "example", "eval-run", "eval-compare", "pipeline"])
def test_every_writer_refuses_an_out_a_live_run_writes_and_removes_a_dead_runs_staging(
    source, tmp_path, live_owner, dead_owner, writer
):
    arguments, out = _writers(source, tmp_path)[writer]
    dead = staging_of(out, dead_owner)
    live = out.parent / f".{out.name}.lock-live.json"  # a pipeline's or uptrain's lock
    live_owner.write(live)
    refusal = error_line(kvshrink(*arguments))
    assert f"is being written by process {live_owner.pid} on {socket.gethostname()}" in refusal
    assert not dead.exists() and live.is_file() and not out.exists()


def test_a_reused_pid_is_not_taken_for_the_owner(source, tmp_path, live_owner):
    out = tmp_path / "out"
    staging = staging_of(out, Owner(live_owner.pid, live_owner.host, "another-boot:1", live_owner.since))
    result = kvshrink("convert", "mha-to-mqa", source, out, "--no-check", "--method", "mean")
    assert result.exit_code == 0, result.output
    assert f"removed {staging}, left by process {live_owner.pid}" in result.output and "freed 4.2 kB" in result.output


def test_another_hosts_run_is_refused_unless_the_lock_is_broken(source, tmp_path):
    out = tmp_path / "out"
    staging = staging_of(out, Owner(4242, "elsewhere", "1", time.time()))
    command = ["convert", "mha-to-mqa", source, out, "--no-check", "--method", "mean"]
    refusal = error_line(kvshrink(*command))
    assert "process 4242 on elsewhere since" in refusal and "another host" in refusal and "--break-lock" in refusal
    assert staging.is_dir()
    result = kvshrink(*command, "--break-lock")
    assert result.exit_code == 0, result.output
    assert "(--break-lock)" in result.output and left_behind(tmp_path) == []


def test_staging_without_an_owner_record_is_refused_until_it_is_a_day_old(source, tmp_path):
    out = tmp_path / "out"
    staging = staging_of(out, None)
    command = ["convert", "mha-to-mqa", source, out, "--no-check", "--method", "mean"]
    assert ".out.partial-x without an owner record" in error_line(kvshrink(*command))
    long_ago = time.time() - OWNERLESS_STALE_AFTER - 60
    for path in (staging, *staging.iterdir()):
        os.utime(path, (long_ago, long_ago))
    result = kvshrink(*command)
    assert result.exit_code == 0, result.output
    assert f"removed {staging}, left by an older kvshrink's run" in result.output and left_behind(tmp_path) == []


def test_a_shared_cache_leaves_live_writers_alone(tmp_path, live_owner, dead_owner):
    out = tmp_path / "cache"
    live, dead = staging_of(out, live_owner, "live"), staging_of(out, dead_owner, "dead")
    with atomic_output_dir(out, shared=True) as staging:
        (staging / "suite.json").write_text("{}")
    assert (out / "suite.json").is_file() and not (out / OWNER_FILE).exists()
    assert live.is_dir() and not dead.exists()
