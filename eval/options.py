"""What an evaluation run takes, declared once: `eval run`'s flags, a pipeline file's `evaluation:` section and
`run_eval`'s options all come from `EvalOptions` (its descriptions are the `--help` text)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from kvshrink.convert.option_models import OptionsModel
from kvshrink.eval.offline_suite import OFFLINE_ALIAS, OFFLINE_TASKS


class EvalOptions(OptionsModel):
    """`kvshrink eval run`, and the evaluation step of `kvshrink pipeline`."""

    tasks: list[str] = Field(
        [OFFLINE_ALIAS], description=f"Comma-separated lm-eval task names; '{OFFLINE_ALIAS}' is kvshrink's offline "
        f"suite ({', '.join(OFFLINE_TASKS)}), which needs no download.", json_schema_extra={"metavar": "T1,T2"},
    )
    limit: int | None = Field(None, ge=1, description="Only the first N items of each task (faster, wider error "
                              "bars; use the same N for every model you compare).")
    batch_size: Annotated[int, Field(gt=0)] | Literal["auto"] = Field(
        8, description="Items per forward pass, or 'auto'."
    )
    device: str | None = Field(None, description="torch device, e.g. cpu or cuda:0  [default: cuda if available, "
                               "else cpu]")

    @field_validator("tasks", mode="before")
    @classmethod
    def _comma_separated(cls, tasks: object) -> object:
        """The command line (and a pipeline file, if it likes) gives the tasks as one comma-separated text."""
        if isinstance(tasks, str):
            tasks = tasks.split(",")
        if isinstance(tasks, list) and all(isinstance(task, str) for task in tasks):
            tasks = [task.strip() for task in tasks if task.strip()]
            if not tasks:
                raise ValueError(f"names no task: pass e.g. {OFFLINE_ALIAS} or arc_easy,piqa")
        return tasks
