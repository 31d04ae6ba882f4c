"""`eval run`: score model folders with lm-evaluation-harness (standard tasks and kvshrink's offline suite).

lm-eval does all the scoring; this module only resolves task names, loads each model once with stock
transformers, hands it to lm-eval's HFLM with an explicit tokenizer (so nothing is fetched from the hub), and
writes lm-eval's results JSON next to kvshrink's metadata for `eval compare`.

Output layout (written whole or not at all):
    OUT/run.json               {"models": [label, ...], "tasks": [...]} in the order given (first = base)
    OUT/<label>/results.json   lm-eval's results, as `simple_evaluate` returns them (no per-sample logs)
    OUT/<label>/kvshrink.json  model path, architecture, bytes held per token at 8K and 32K tokens of context,
                               conversion/uptrain reports
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import json
import os
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from kvshrink.convert.errors import KvshrinkError
from kvshrink.convert.outdir import atomic_output_dir, check_output_dir
from kvshrink.eval.models import (
    ModelFolder, check_model_dirs, default_device, load_model, load_tokenizer, model_metadata
)
from kvshrink.eval.options import EvalOptions
from kvshrink.eval.offline_suite import OFFLINE_ALIAS, OFFLINE_TASKS, build_offline_suite, suite_hash

RESULTS_FILE = "results.json"
METADATA_FILE = "kvshrink.json"
RUN_FILE = "run.json"


def expand_tasks(tasks: Sequence[str]) -> list[str]:
    """Task names in order, `offline` replaced by the whole offline suite, duplicates dropped."""
    expanded = []
    for task in tasks:
        for name in OFFLINE_TASKS if task == OFFLINE_ALIAS else [task]:
            if name not in expanded:
                expanded.append(name)
    return expanded


def _check_known(tasks: list[str], known: list[str]) -> None:
    for task in tasks:
        if task not in known:
            close = difflib.get_close_matches(task, known, n=5)
            hint = f"did you mean {', '.join(close)}?" if close else "see `lm-eval ls tasks` for the full list"
            raise KvshrinkError(
                f"unknown task {task!r}: {hint} (or `{OFFLINE_ALIAS}` for kvshrink's offline suite)"
            )


@functools.cache
def _task_manager(include_path: str):
    """lm-eval's index of its ~15k task files takes seconds to build; one per process is enough."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


@contextlib.contextmanager
def _offline_for_local_tasks(tasks: list[str]):
    """While the offline suite runs alone, tell the hub and datasets libraries to stay offline (it reads local files
    only, and without these the datasets library still tries the network); the variables are restored after, but a
    library first imported here keeps what it read at import (the datasets library reads them once)."""
    local_only = all(task in OFFLINE_TASKS for task in tasks)
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"} if local_only else {}
    saved = {name: os.environ.get(name) for name in offline}
    os.environ.update({name: value for name, value in offline.items() if saved[name] is None})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)


def run_eval(
    models: Sequence[str | Path],
    out: str | Path,
    options: EvalOptions = EvalOptions(),
    *,
    overwrite: bool = False,
    break_lock: bool = False,
) -> list[Path]:
    """Evaluate each model folder with lm-eval as `options` say; return the per-model result folders under `out`.

    `options.limit` keeps the first N items of each task (faster, wider standard errors; use the same N for every
    model you compare); `options.batch_size` may be "auto".
    """
    folders = check_model_dirs(list(models))
    task_names = expand_tasks(options.tasks)
    out = Path(out)
    check_output_dir(out, overwrite, break_lock=break_lock)
    with _offline_for_local_tasks(task_names):
        return _evaluate(folders, task_names, out, options, overwrite, break_lock)


def _evaluate(folders: list[ModelFolder], task_names: list[str], out: Path, options: EvalOptions, overwrite: bool,
              break_lock: bool) -> list[Path]:
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.utils import handle_non_serializable

    suite_dir = build_offline_suite()
    task_manager = _task_manager(str(suite_dir))
    _check_known(task_names, task_manager.all_tasks)
    device = options.device or default_device()

    # described before any scoring, so a config kvshrink cannot size stops the run before lm-eval's hours
    described = {folder.label: model_metadata(folder) for folder in folders}
    with atomic_output_dir(out, overwrite=overwrite, break_lock=break_lock) as staging:
        for folder in tqdm(folders, desc="models", unit="model"):
            model = load_model(folder, device)
            lm = HFLM(pretrained=model, tokenizer=load_tokenizer(folder), batch_size=options.batch_size)
            results = lm_eval.simple_evaluate(
                model=lm, tasks=task_names, task_manager=task_manager, limit=options.limit, log_samples=False
            )
            del lm, model  # free one model before loading the next
            target = staging / folder.label
            target.mkdir()
            (target / RESULTS_FILE).write_text(json.dumps(results, indent=2, default=handle_non_serializable))
            metadata = {
                **described[folder.label],
                "tasks": task_names,
                "limit": options.limit,
                "device": device,
                "offline_suite": suite_hash(suite_dir),
            }
            (target / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
        (staging / RUN_FILE).write_text(
            json.dumps({"models": [folder.label for folder in folders], "tasks": task_names}, indent=2) + "\n"
        )
    return [out.resolve() / folder.label for folder in folders]
