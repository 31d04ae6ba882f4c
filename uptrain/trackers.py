"""Experiment trackers: accelerate's own (tensorboard, wandb) plus a plain CSV file that needs no package."""

from __future__ import annotations

import csv
from pathlib import Path

from accelerate.tracking import GeneralTracker, on_main_process


class CSVTracker(GeneralTracker):
    """Appends `step,name,value` rows to metrics.csv in the output folder (a resumed run keeps appending)."""

    name = "csv"
    requires_logging_directory = True

    def __init__(self, logging_dir: str | Path):
        super().__init__()
        self.path = Path(logging_dir) / "metrics.csv"

    @property
    def tracker(self) -> Path:
        return self.path

    @on_main_process
    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new_file = not self.path.exists()
        with self.path.open("a", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            if new_file:
                writer.writerow(["step", "name", "value"])
            for name, value in values.items():
                writer.writerow([step, name, value])


def tracker_for(kind: str, output_dir: str | Path) -> list[str | GeneralTracker] | None:
    """What to pass as Accelerator(log_with=...) for the recipe's `tracker`."""
    if kind == "none":
        return None
    if kind == "csv":
        return [CSVTracker(output_dir)]
    return [kind]
