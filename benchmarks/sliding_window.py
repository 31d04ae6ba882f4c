"""Hybrid sliding-window SmolLM2 before any training: held-out perplexity at long context against KV bytes at 8K.

For each source (SmolLM2, and its MQA conversion with `--mqa`) and each window, `convert add-sliding-window` runs
once (it calibrates on the default text, the train split of pydoc topics, in `--calibration-length`-token windows,
and reports each layer's attention mass beyond the window). Every layout is then scored from that one output
folder: the same weights under each config's `layer_types` — calibration-chosen and evenly spaced full layers at
each fraction — on the held-out KJV split in 4096-token windows, the whole model at once (stock class, sdpa).
KV bytes per token at 8,192 tokens come from the config (a sliding layer holds window - 1 tokens; the test suite
checks that this is what transformers' cache holds).

Writes OUT/sliding_window.md, OUT/sliding_window.json and OUT/sliding_window.png; prints rows as they finish.
With `--score DIR...` it only scores those folders as saved (e.g. windowed outputs before and after uptraining) on
the same held-out windows, writes OUT/sliding_window_scored.json, and redraws OUT/sliding_window.png with them
(triangles) when OUT/sliding_window.json holds the untrained rows.

    python benchmarks/sliding_window.py --model DIR [--mqa DIR] [--out DIR] [--windows 512,1024]
                                        [--fractions 0.25,0.5] [--eval-tokens 8192] [--keep DIR]
    python benchmarks/sliding_window.py --model DIR --score DIR [DIR ...] --eval-tokens 4096
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from kvshrink.convert.check import load_tokenizer, perplexity, token_windows  # noqa: E402
from kvshrink.convert.corpora import corpus_text  # noqa: E402
from kvshrink.convert.kvcache import kv_bytes_at_context  # noqa: E402

EVAL_WINDOW = 4096
KV_CONTEXT = 8192


def _layouts(report: dict, fractions: list[float]) -> dict[str, list[int]]:
    """Full-attention layers per (fraction, choice), from the converter's per-layer masses."""
    from kvshrink.convert.window_reach import LayerReach, evenly_spaced, most_reaching

    reaches = [LayerReach(r["layer"], r["mass_beyond_window"], r["worst_head_mass_beyond_window"],
                          r["sink_mass_dropped"])
               for r in report["layers"]]
    every = list(range(len(reaches)))
    layouts = {}
    for fraction in fractions:
        keep = round(fraction * len(reaches))
        layouts[f"{fraction:.0%} full, calibrated"] = most_reaching(reaches, keep, every)
        layouts[f"{fraction:.0%} full, even"] = evenly_spaced(len(reaches), keep, every)
    return layouts


def _score(folder: Path, full: list[int] | None, windows) -> tuple[float, float]:
    """(perplexity, KV bytes/token at 8K) of `folder` with `full` layers at full attention (None: as saved)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    if full is not None:
        config.layer_types = [
            "full_attention" if i in full else "sliding_attention" for i in range(config.num_hidden_layers)
        ]
    model = AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=torch.float32).eval()
    kv = kv_bytes_at_context(config.to_dict(), KV_CONTEXT)
    return perplexity(model, windows, progress=False), kv


def main() -> None:
    from kvshrink.convert.options import SlidingWindowOptions
    from kvshrink.convert.sliding_window import add_sliding_window

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--mqa", type=Path, help="the source converted by `convert mha-to-mqa`")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--windows", default="512,1024")
    parser.add_argument("--fractions", default="0.25,0.5")
    parser.add_argument("--eval-tokens", type=int, default=2 * EVAL_WINDOW)
    parser.add_argument("--calibration-tokens", type=int, default=EVAL_WINDOW)
    parser.add_argument("--keep", type=Path, help="keep the converted folders here (default: a temporary folder)")
    parser.add_argument("--score", type=Path, nargs="+", help="only score these folders as saved, then stop")
    args = parser.parse_args()
    windows_tokens = [int(w) for w in args.windows.split(",")]
    fractions = [float(f) for f in args.fractions.split(",")]
    text = corpus_text("kjv", "heldout")
    windows = token_windows(load_tokenizer(args.model), text, args.eval_tokens, EVAL_WINDOW)
    if args.score:
        _score_folders(args.score, windows, args.out)
        return
    sources = {"SmolLM2": args.model, **({"SmolLM2 MQA": args.mqa} if args.mqa else {})}
    rows, masses = [], {}
    with tempfile.TemporaryDirectory() as temporary:
        scratch = args.keep or temporary
        for name, source in sources.items():
            ppl, kv = _score(source, None, windows)
            rows.append({"source": name, "window": None, "layout": "full attention", "full_layers": None,
                         "perplexity": round(ppl, 3), "kv_bytes_per_token_8k": kv})
            print(rows[-1], flush=True)
            for window in windows_tokens:
                out = Path(scratch) / f"{name}-{window}".replace(" ", "_")
                started = time.perf_counter()
                report = add_sliding_window(source, out, SlidingWindowOptions(
                    window=window, calibration_tokens=args.calibration_tokens, check=False, progress=False))
                masses[f"{name}, window {window}"] = [r["mass_beyond_window"] for r in report["layers"]]
                print(f"{name} window {window}: converted in {time.perf_counter() - started:.0f} s", flush=True)
                for layout, full in _layouts(report, fractions).items():
                    ppl, kv = _score(out, full, windows)
                    rows.append({"source": name, "window": window, "layout": layout, "full_layers": full,
                                 "perplexity": round(ppl, 3), "kv_bytes_per_token_8k": kv})
                    print(rows[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sliding_window.json").write_text(
        json.dumps({"rows": rows, "mass_beyond_window": masses}, indent=2) + "\n"
    )
    (args.out / "sliding_window.md").write_text(_table(rows, len(windows) * EVAL_WINDOW))
    _plot(rows, args.out / "sliding_window.png")


def _score_folders(folders: list[Path], windows, out: Path) -> None:
    """Score each folder as saved; redraw the plot with them when OUT holds the untrained rows."""
    rows = []
    for folder in folders:
        ppl, kv = _score(folder, None, windows)
        rows.append({"model": str(folder), "perplexity": round(ppl, 3), "kv_bytes_per_token_8k": kv})
        print(rows[-1], flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sliding_window_scored.json").write_text(
        json.dumps({"eval_window": EVAL_WINDOW, "rows": rows}, indent=2) + "\n"
    )
    untrained = out / "sliding_window.json"
    if untrained.is_file():
        _plot(json.loads(untrained.read_text())["rows"], out / "sliding_window.png", scored=rows)


def _table(rows: list[dict], tokens: int) -> str:
    lines = [f"Held-out KJV perplexity in {EVAL_WINDOW}-token windows ({tokens} tokens), no training; KV bytes per "
             f"token at {KV_CONTEXT} tokens of context.", "",
             "| source | window | layout | full layers | perplexity | KV bytes/token at 8K |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        full = "all" if row["full_layers"] is None else ", ".join(map(str, row["full_layers"]))
        lines.append(f"| {row['source']} | {row['window'] or '-'} | {row['layout']} | {full} | "
                     f"{row['perplexity']:.2f} | {row['kv_bytes_per_token_8k']:,.0f} |")
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict], path: Path, scored: list[dict] = ()) -> None:
    """Perplexity against KV bytes: untrained layouts, and `scored` folders (e.g. after uptraining) as triangles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(11, 5))
    for row in rows:
        marker = "*" if row["window"] is None else "o" if "calibrated" in row["layout"] else "x"
        label = f"{row['source']}, {row['layout']}" + (f", w={row['window']}" if row["window"] else "")
        axis.scatter(row["kv_bytes_per_token_8k"], row["perplexity"], marker=marker, s=60, label=label)
    for row in scored:
        axis.scatter(row["kv_bytes_per_token_8k"], row["perplexity"], marker="^", s=60, label=Path(row["model"]).name)
    axis.set_xlabel(f"KV cache bytes per token at {KV_CONTEXT} tokens")
    axis.set_ylabel(f"held-out KJV perplexity ({EVAL_WINDOW}-token windows)")
    axis.set_yscale("log")
    axis.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: points sit everywhere
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
