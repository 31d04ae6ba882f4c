"""`eval compare`: side-by-side scores of evaluated models against the first (base) one, with the bytes they hold.

Reads what `eval run` wrote (lm-eval's results.json + kvshrink.json per model) and writes, under OUT:
    comparison.md    one table per task: score ± stderr, Δ vs base, retention %, bytes held per token at 32K tokens of
                     context (KV cache + recurrent state), reduction ×
    comparison.png   quality vs bytes held per token at 32K, one labelled point per model, one panel per task
    comparison.json  the same numbers for scripts
Retention is score/base for higher-is-better metrics and base/score for lower-is-better ones (perplexity,
bits per byte), so it is below 100% whenever a model is worse than the base.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kvshrink.convert.errors import KvshrinkError
from kvshrink.convert.kvcache import LONG_CONTEXTS, kv_bytes_at_context
from kvshrink.convert.outdir import atomic_output_dir, check_output_dir
from kvshrink.eval.offline_suite import OFFLINE_TASKS
from kvshrink.eval.run import METADATA_FILE, RESULTS_FILE, RUN_FILE

# Which metric a task is compared on when it reports several: accuracy first, then text-modelling metrics.
PREFERRED_METRICS = ("acc", "acc_norm", "exact_match", "f1", "bits_per_byte", "word_perplexity", "perplexity")
_NOT_METRICS = {"alias", "name", "sample_len", "samples"}
# MQA, MLA, sliding-window and linear hybrids are placed on one axis by what they hold for a sequence this long
COMPARED_CONTEXT = LONG_CONTEXTS[-1]


@dataclass(frozen=True)
class EvaluatedModel:
    label: str
    folder: Path
    results: dict[str, Any]
    metadata: dict[str, Any]


@dataclass(frozen=True)
class Row:
    model: str
    score: float
    stderr: float | None
    delta: float
    retention_percent: float
    bytes_held_per_token: float  # at COMPARED_CONTEXT tokens of context
    reduction: float
    items: int | None


@dataclass(frozen=True)
class TaskTable:
    task: str
    metric: str
    higher_is_better: bool
    rows: list[Row]


@dataclass(frozen=True)
class Comparison:
    tables: list[TaskTable]
    markdown_path: Path
    plot_path: Path
    json_path: Path

    def terminal_text(self) -> str:
        return "\n\n".join(render_table(table, markdown=False) for table in self.tables)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise KvshrinkError(f"cannot read {path} ({error}): rerun `kvshrink eval run` for it") from None


def load_evaluated(result_dirs: Sequence[str | Path]) -> list[EvaluatedModel]:
    """Each folder is one model's results, or a whole `eval run` output (its models in run order)."""
    if not result_dirs:
        raise KvshrinkError("no result folder given: pass folders written by `kvshrink eval run`")
    folders = []
    for result_dir in result_dirs:
        path = Path(result_dir).expanduser().resolve()
        if (path / RESULTS_FILE).is_file():
            folders.append(path)
        elif (path / RUN_FILE).is_file():
            folders.extend(path / label for label in _read_json(path / RUN_FILE)["models"])
        else:
            raise KvshrinkError(
                f"{result_dir} holds no {RESULTS_FILE} or {RUN_FILE}: pass an output folder of `kvshrink eval run`"
            )
    models, labels = [], set()
    for folder in folders:
        metadata = _read_json(folder / METADATA_FILE)
        label, suffix = metadata.get("label", folder.name), 2
        while label in labels:
            label, suffix = f"{metadata.get('label', folder.name)}-{suffix}", suffix + 1
        labels.add(label)
        models.append(EvaluatedModel(label, folder, _read_json(folder / RESULTS_FILE), metadata))
    return models


def _check_same_tasks(models: list[EvaluatedModel]) -> list[str]:
    base = models[0]
    tasks = list(base.results["results"])
    for model in models[1:]:
        missing = sorted(set(tasks) - set(model.results["results"]))
        extra = sorted(set(model.results["results"]) - set(tasks))
        if missing or extra:
            differences = "; ".join(
                part
                for part in (
                    f"{model.label} lacks {', '.join(missing)}" if missing else "",
                    f"{model.label} has {', '.join(extra)} which {base.label} lacks" if extra else "",
                )
                if part
            )
            raise KvshrinkError(
                f"the results cover different tasks ({differences}): evaluate every model with the same --tasks"
            )
    if any(task in OFFLINE_TASKS for task in tasks):
        suites = {model.label: model.metadata.get("offline_suite") for model in models}
        if len(set(suites.values())) > 1:
            raise KvshrinkError(
                f"the offline suite's data differ between the results ({suites}): "
                "evaluate every model on the same machine set-up, or rerun `kvshrink eval run` for all of them"
            )
    return tasks


def _metrics(task_results: dict[str, Any]) -> dict[str, tuple[float, float | None]]:
    """{metric: (value, stderr)} from lm-eval's "metric,filter" keys (the first filter of each metric)."""
    metrics: dict[str, tuple[float, float | None]] = {}
    for key, value in task_results.items():
        name, _, filter_name = key.partition(",")
        if name in _NOT_METRICS or name.endswith("_stderr") or name in metrics or not isinstance(value, (int, float)):
            continue
        stderr = task_results.get(f"{name}_stderr,{filter_name}")
        metrics[name] = (float(value), float(stderr) if isinstance(stderr, (int, float)) else None)
    return metrics


def _primary_metric(task: str, metrics: dict[str, tuple[float, float | None]]) -> str:
    if not metrics:
        raise KvshrinkError(f"task {task} has no numeric metric in its results: rerun `kvshrink eval run` for it")
    return next((name for name in PREFERRED_METRICS if name in metrics), next(iter(metrics)))


def _bytes_held(model: EvaluatedModel) -> float:
    """Bytes held per token at COMPARED_CONTEXT; results of an older `eval run` lack them, so they come from the
    model's config.json where it is still there."""
    held = model.metadata.get("bytes_held_per_token_at_context") or {}
    if str(COMPARED_CONTEXT) in held:
        return held[str(COMPARED_CONTEXT)]
    config = Path(model.metadata.get("model") or "") / "config.json"
    if not config.is_file():
        raise KvshrinkError(f"{model.label}'s results predate bytes held at {COMPARED_CONTEXT:,} tokens of context and "
                            f"its model folder is gone: rerun `kvshrink eval run` on it")
    return kv_bytes_at_context(_read_json(config), COMPARED_CONTEXT)


def _task_table(task: str, models: list[EvaluatedModel]) -> TaskTable:
    base_metrics = _metrics(models[0].results["results"][task])
    metric = _primary_metric(task, base_metrics)
    higher_is_better = bool(models[0].results.get("higher_is_better", {}).get(task, {}).get(metric, True))
    base_score = base_metrics[metric][0]
    base_bytes = _bytes_held(models[0])
    rows = []
    for model in models:
        metrics = _metrics(model.results["results"][task])
        if metric not in metrics:
            raise KvshrinkError(
                f"{model.label} has no {metric} for {task}: evaluate every model with the same lm-eval version"
            )
        score, stderr = metrics[metric]
        numerator, denominator = (score, base_score) if higher_is_better else (base_score, score)
        retention = 100 * numerator / denominator if denominator else math.nan
        samples = model.results.get("n-samples", {}).get(task, {})
        rows.append(
            Row(
                model=model.label,
                score=score,
                stderr=stderr,
                delta=score - base_score,
                retention_percent=retention,
                bytes_held_per_token=_bytes_held(model),
                reduction=base_bytes / _bytes_held(model),
                items=samples.get("effective"),
            )
        )
    if len({row.items for row in rows}) > 1:
        counts = ", ".join(f"{row.model}: {row.items}" for row in rows)
        raise KvshrinkError(
            f"{task} was scored on different numbers of items ({counts}): evaluate every model with the same --limit"
        )
    return TaskTable(task, metric, higher_is_better, rows)


def render_table(table: TaskTable, markdown: bool = False) -> str:
    """One task's comparison as a markdown table or as aligned text for a terminal."""
    direction = "higher is better" if table.higher_is_better else "lower is better"
    header = ["model", table.metric, "Δ vs base", "retention", f"bytes held/token at {COMPARED_CONTEXT // 1024}K",
              "reduction", "items"]
    lines = [
        [
            row.model,
            f"{row.score:.4f}" + (f" ± {row.stderr:.4f}" if row.stderr is not None else ""),
            f"{row.delta:+.4f}",
            f"{row.retention_percent:.1f}%",
            f"{row.bytes_held_per_token:,.0f}",
            f"{row.reduction:.2f}×",
            "" if row.items is None else str(row.items),
        ]
        for row in table.rows
    ]
    title = f"{table.task} — {table.metric} ({direction})"
    if markdown:
        body = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        body += ["| " + " | ".join(line) + " |" for line in lines]
        return f"### {title}\n\n" + "\n".join(body)
    widths = [max(len(cell) for cell in column) for column in zip(header, *lines)]
    body = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in [header, *lines]]
    return title + "\n" + "\n".join(body)


def _plot(tables: list[TaskTable], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(2, len(tables))
    rows = math.ceil(len(tables) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(6 * columns, 4 * rows), squeeze=False)
    for axis, table in zip(axes.flat, tables):
        held = [row.bytes_held_per_token for row in table.rows]
        scores = [row.score for row in table.rows]
        errors = [row.stderr or 0.0 for row in table.rows]
        axis.errorbar(held, scores, yerr=errors, fmt="o", capsize=3)
        for row in table.rows:
            axis.annotate(row.model, (row.bytes_held_per_token, row.score), textcoords="offset points", xytext=(5, 5))
        arrow = "↑" if table.higher_is_better else "↓"
        axis.set_title(f"{table.task}")
        axis.set_xlabel(f"bytes held per token at {COMPARED_CONTEXT:,} tokens (KV cache + recurrent state)")
        axis.set_ylabel(f"{table.metric} {arrow}")
        axis.set_xlim(0, max(held) * 1.15)
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(tables) :]:
        axis.set_visible(False)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def comparison_tables(result_dirs: Sequence[str | Path]) -> tuple[list[EvaluatedModel], list[TaskTable]]:
    """The evaluated models (first = base) and one table per task, without writing anything."""
    models = load_evaluated(result_dirs)
    return models, [_task_table(task, models) for task in _check_same_tasks(models)]


def compare_results(
    result_dirs: Sequence[str | Path], out: Path, *, overwrite: bool = False, break_lock: bool = False
) -> Comparison:
    """Compare `eval run` results (the first model is the base) and write comparison.md/.png/.json under `out`."""
    out = Path(out)
    check_output_dir(out, overwrite, break_lock=break_lock)
    models, tables = comparison_tables(result_dirs)
    with atomic_output_dir(out, overwrite=overwrite, break_lock=break_lock) as staging:
        intro = (
            f"# kvshrink evaluation\n\nBase: {models[0].label}. Scores from lm-evaluation-harness; "
            "± is lm-eval's standard error; retention is relative to the base (below 100% = worse).\n\n"
        )
        markdown = "\n\n".join(render_table(table, markdown=True) for table in tables)
        (staging / "comparison.md").write_text(intro + markdown + "\n")
        _plot(tables, staging / "comparison.png")
        (staging / "comparison.json").write_text(json.dumps([asdict(table) for table in tables], indent=2) + "\n")
    out = out.resolve()
    return Comparison(tables, out / "comparison.md", out / "comparison.png", out / "comparison.json")
