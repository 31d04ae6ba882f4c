"""Checkpoints that appear whole or not at all: accelerate's save_state into a hidden folder, then a rename.

A run killed at any moment leaves either complete `checkpoints/step-NNNNNNNN` folders or a hidden
`.step-NNNNNNNN.partial` one, which resuming ignores. While a run lasts it holds a lock beside its output_dir
(claim_output_dir), so a second run on the same output_dir refuses, and the next run removes what a killed one
left half-written: partial checkpoints, the final model's staging folder, a partial attention-transfer layer.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from kvshrink.convert.staging import remove_left_over, run_lock
from kvshrink.uptrain.attention_transfer import TRANSFER_DIR

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.json"
PARTIAL = ".partial"  # the suffix of everything written under another name until complete
FINAL_STAGING = f".final{PARTIAL}"  # the final model's staging folder inside output_dir
_NAME = re.compile(r"^step-(\d{8})$")


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in output_dir, oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.match(p.name) and (p / TRAINER_STATE).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def newest_checkpoint(output_dir: str | Path) -> Path | None:
    found = checkpoint_dirs(output_dir)
    return found[-1] if found else None


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / TRAINER_STATE).read_text(encoding="utf-8"))


def save_checkpoint(
    accelerator: Accelerator, output_dir: str | Path, step: int, trainer_state: dict[str, Any], keep_last: int
) -> Path:
    """Save model, optimizer, scheduler and RNG states plus `trainer_state`; keep the newest `keep_last`.

    Every process calls this (FSDP writes shards from each rank); the main one renames and prunes.
    """
    final = Path(output_dir) / CHECKPOINTS / f"step-{step:08d}"
    partial = final.with_name(f".{final.name}{PARTIAL}")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.parent.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (partial / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2), encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
        for old in checkpoint_dirs(output_dir)[:-keep_last]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def _half_written(output_dir: Path) -> list[Path]:
    """What a run killed in output_dir leaves under temporary names."""
    return [
        *[path for path in [output_dir / FINAL_STAGING] if path.exists()],
        *sorted((output_dir / CHECKPOINTS).glob(f".step-*{PARTIAL}")),
        *sorted((output_dir / TRANSFER_DIR).glob(f"layer-*{PARTIAL}")),
    ]


@contextlib.contextmanager
def claim_output_dir(output_dir: str | Path, break_lock: bool, main_process: bool) -> Iterator[None]:
    """Hold the run's lock beside output_dir (the main process only: one lock per run) and remove what a killed
    run left in it; another run on output_dir meanwhile refuses (convert/staging.py), unless break_lock."""
    if not main_process:
        yield
        return
    with run_lock(output_dir, break_lock) as output:
        for path in _half_written(output):
            remove_left_over(path, "a run on this output_dir that no longer runs")
        yield
