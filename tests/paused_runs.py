"""Real `kvshrink` commands in a child process that stops at a chosen point, so a test can SIGKILL it there or
run a second command against it while it lives (imported by the tests; pytest puts this folder on sys.path)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# The child wraps one function or method (module:qualified.name): the wrapper's nth call runs the original, then
# touches the marker file and waits for the release file. The command line follows the wrapper's settings.
_CHILD = """
import functools, importlib, sys, time
from pathlib import Path

marker, release, target, nth = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
module_name, qualified_name = target.split(":")
holder = importlib.import_module(module_name)
*outer, name = qualified_name.split(".")
for part in outer:
    holder = getattr(holder, part)
original, calls = getattr(holder, name), []

@functools.wraps(original)
def paused(*args, **kwargs):
    result = original(*args, **kwargs)
    calls.append(1)
    if len(calls) == nth:
        marker.touch()
        while not release.exists():
            time.sleep(0.02)
    return result

setattr(holder, name, paused)
from kvshrink.convert.cli import kvshrink_cli
kvshrink_cli(sys.argv[5:], prog_name="kvshrink")
"""
START_TIMEOUT = 180  # seconds for the child to reach its pause on two busy cores


@dataclass
class PausedRun:
    process: subprocess.Popen
    release: Path
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def kill(self) -> None:
        """SIGKILL: no handler, no cleanup, as the OOM killer or a power cut would end it."""
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def finish(self) -> int:
        """Let the run go on from its pause; its exit code."""
        self.release.touch()
        return self.process.wait(timeout=START_TIMEOUT)


def start_paused(control: Path, target: str, nth: int, *command: str | Path) -> PausedRun:
    """`kvshrink COMMAND...` in a child process, returned once it waits after the `nth` call of `target`
    (files it needs go to the folder `control`)."""
    control.mkdir(parents=True, exist_ok=True)
    marker, release, log = control / "paused", control / "release", control / "child.log"
    with log.open("w") as handle:  # a file, not a pipe: a full pipe would stall the child
        process = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(marker), str(release), target, str(nth), *map(str, command)],
            stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, "TQDM_DISABLE": "1"},
        )
    deadline = time.monotonic() + START_TIMEOUT
    while not marker.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"the child never reached {target}:\n{log.read_text()}")
        time.sleep(0.02)
    return PausedRun(process, release, log)


def left_behind(folder: Path) -> list[Path]:
    """Staging folders, locks and owner records anywhere under `folder`."""
    return [path for path in folder.rglob("*") if ".partial" in path.name or ".lock-" in path.name
            or path.name == ".kvshrink-owner.json"]


def tree_digest(folder: Path) -> dict[str, str]:
    """Every file under `folder` with the SHA-256 of its bytes, to show a folder was not touched."""
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}
