"""Quality of kvshrink's conversions on SmolLM2-135M before any training: held-out perplexity per KV budget.

Rows: the source; every GQA method at MQA (SmolLM2 has 3 KV heads, so 1 KV head = 1/3 of the KV cache is its
only real GQA budget), the default also without its block-wise fit (--fit none); MLA's default (with and without
the fit) and its published baseline (MHA2MLA: partial RoPE + weight SVD) at 50% and 25%, and the 256+64 shape vLLM
serves; with --families linear, half the layers made Mamba-2 mixers (add-linear-attention) by each layer choice.
Every conversion calibrates on the converters' default text (pydoc and KJV train splits interleaved) and
is scored on the held-out split of each corpus (--heldout, default pydoc and KJV), which calibration never sees,
in 512-token windows. Conversion time includes calibration and the fit.

With `--uptrain-steps N`, the default and the published baseline of each family and budget are then distilled
from the source for N steps with the shipped CPU recipe of their family (recipes/smollm2-{mqa,mla}-cpu.yaml, same
data, seed and settings for both) and scored again on the same held-out windows.

Writes OUT/quality.md (markdown table), OUT/quality.png (plot) and OUT/quality.json; prints rows as they finish.
About 3-6 minutes per conversion on 2 busy CPU cores, plus about 8 s per uptraining step.

    python benchmarks/quality.py [--model DIR] [--out DIR] [--families gqa,mla] [--eval-tokens N]
                                 [--heldout pydoc,kjv] [--uptrain-steps N [--compared-only]]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from kvshrink.convert.check import load_causal_lm, load_tokenizer, perplexity, token_windows  # noqa: E402
from kvshrink.convert.corpora import corpus_text  # noqa: E402


@dataclass
class Row:
    family: str
    method: str
    convert: Callable[..., dict]  # convert(source, out) -> the conversion's report
    recipe: str | None = None  # the uptraining recipe of the rows compared after training (default and baseline)


def gqa_rows() -> list[Row]:
    from kvshrink.convert.gqa import DEFAULT_METHOD, method_names
    from kvshrink.convert.mha_to_gqa import mha_to_gqa
    from kvshrink.convert.options import GqaOptions

    names = [DEFAULT_METHOD, "mean"] + [name for name in method_names() if name not in ("mean", DEFAULT_METHOD)]
    rows = [
        Row("GQA", name + (" (default)" if name == DEFAULT_METHOD else " (GQA paper)" if name == "mean" else ""),
            partial(mha_to_gqa, options=GqaOptions(groups=1, method=name, check=False, progress=False)),
            GQA_RECIPE if name in (DEFAULT_METHOD, "mean") else None)
        for name in names
    ]
    closed = GqaOptions(groups=1, check=False, progress=False, fit="none")
    return rows[:1] + [Row("GQA", f"{DEFAULT_METHOD}, --fit none", partial(mha_to_gqa, options=closed))] + rows[1:]


def mla_rows(budgets: list[float]) -> list[Row]:
    from kvshrink.convert.mha_to_mla import mha_to_mla
    from kvshrink.convert.options import MlaOptions

    rows = []
    for budget in budgets:
        baseline = partial(mha_to_mla, options=MlaOptions(
            kv_budget=budget, rope_dim=64 if budget == 0.5 else 32, rope_method="partial",
            factorization="weight", distance_aware=False, target="transformers", check=False, progress=False,
            fit="none",
        ))
        rows.append(Row("MLA", "partial RoPE + weight SVD (MHA2MLA)", baseline, MLA_RECIPE))
        # SmolLM2 has no vLLM shape at these budgets: the serving layout at any shape is --target sglang
        default = partial(
            mha_to_mla, options=MlaOptions(kv_budget=budget, target="sglang", check=False, progress=False)
        )
        rows.append(Row("MLA", "default", default, MLA_RECIPE))
        closed = MlaOptions(kv_budget=budget, target="sglang", check=False, progress=False, fit="none")
        rows.append(Row("MLA", "default, --fit none", partial(mha_to_mla, options=closed)))
    for fit in ("attention", "none"):  # the shape vLLM serves (SmolLM2 keeps 256+64 of its 3 x 2 x 64 per token)
        servable = MlaOptions(mla_shape="256+64", check=False, progress=False, fit=fit)
        rows.append(
            Row(
                "MLA", "256+64 (vLLM)" + (", --fit none" if fit == "none" else ""),
                partial(mha_to_mla, options=servable)
            )
        )
    return rows


def linear_rows() -> list[Row]:
    """Half the layers made Mamba-2 mixers (add-linear-attention): each layer choice, and the default unfitted."""
    from kvshrink.convert.linear_attention import add_linear_attention
    from kvshrink.convert.options import LinearAttentionOptions

    default = LinearAttentionOptions.model_fields["layer_choice"].default
    rows = []
    for choice in ("calibrated", "even"):
        options = LinearAttentionOptions(layer_choice=choice, check=False, progress=False)
        label = f"50% Mamba-2, {choice}" + (" (default)" if choice == default else "")
        rows.append(Row("linear", label, partial(add_linear_attention, options=options)))
    closed = LinearAttentionOptions(check=False, progress=False, fit="none")
    rows.append(Row("linear", f"50% Mamba-2, {default}, --fit none", partial(add_linear_attention, options=closed)))
    return rows


REPOSITORY = Path(__file__).resolve().parent.parent
GQA_RECIPE = str(REPOSITORY / "recipes" / "smollm2-mqa-cpu.yaml")
MLA_RECIPE = str(REPOSITORY / "recipes" / "smollm2-mla-cpu.yaml")


def scores(folder: Path, windows: dict[str, list]) -> dict[str, float]:
    """Perplexity of the model in `folder` on each held-out split's windows."""
    model = load_causal_lm(folder)
    return {corpus: perplexity(model, split, progress=False) for corpus, split in windows.items()}


def uptrained_perplexity(recipe: str, steps: int, converted: Path, source: Path, windows) -> dict[str, float]:
    from kvshrink.uptrain import load_recipe, uptrain

    trained = converted.parent / "uptrained"
    overrides = [f"model={converted}", f"teacher={source}", f"output_dir={trained}", f"max_steps={steps}",
                 "eval_interval=0", "save_interval=0", "tracker=none"]
    uptrain(load_recipe(recipe, overrides))
    return scores(trained, windows)


def measure(row: Row, model: Path, windows, uptrain_steps: int) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        converted = Path(scratch) / "out"
        started = time.perf_counter()
        report = row.convert(model, converted)
        seconds = time.perf_counter() - started
        value = scores(converted, windows)
        trained = None
        if uptrain_steps and row.recipe:
            trained = uptrained_perplexity(row.recipe, uptrain_steps, converted, model, windows)
    return {
        "family": row.family,
        "method": row.method,
        "kv_fraction": report["kv_fraction"],
        "perplexity": next(iter(value.values())),  # the first --heldout split
        "heldout": value,
        "uptrained_perplexity": trained and next(iter(trained.values())),
        "uptrained_heldout": trained,
        "convert_seconds": round(seconds, 1),
        "calibration_seconds": (report.get("calibration") or {}).get("seconds"),
    }


def _pair(values: dict[str, float] | None, source: dict[str, float] | None = None) -> str:
    if values is None:
        return ""
    if source is None:
        return " / ".join(f"{values[c]:,.2f}" for c in values)
    return " / ".join(f"{values[c] / source[c]:,.2f}" for c in values)


def markdown(results: list[dict], source: dict[str, float], tokens: int, uptrain_steps: int) -> str:
    trained = f"after {uptrain_steps} uptraining steps" if uptrain_steps else "after uptraining (not run)"
    splits = " / ".join(source)
    lines = [
        f"SmolLM2-135M, perplexity on {tokens} held-out tokens of each of {splits} (512-token windows). "
        f"Source: {_pair(source)}.",
        "",
        f"| family | method | KV cache | perplexity, no training ({splits}) | × source | {trained} | convert s | of "
        "which calibration s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        calibration = "n/r" if r["calibration_seconds"] is None else f"{r['calibration_seconds']:.0f}"
        lines.append(
            f"| {r['family']} | {r['method']} | {r['kv_fraction']:.0%} | {_pair(r['heldout'])} | "
            f"{_pair(r['heldout'], source)} | {_pair(r['uptrained_heldout'])} | {r['convert_seconds']:.0f} | "
            f"{calibration} |"
        )
    lines += ["", "n/r: the conversion's report has no separate calibration time (mean-pooling calibrates nothing; "
              "the MLA converter reports only its total)."]
    return "\n".join(lines) + "\n"


def plot(results: list[dict], source: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['family']} {r['method']}\n{r['kv_fraction']:.0%} KV" for r in results]
    colors = ["tab:blue" if r["family"] == "GQA" else "tab:orange" for r in results]
    figure, axes = plt.subplots(figsize=(8, 0.55 * len(results) + 1.5))
    bars = axes.barh(range(len(results)), [r["perplexity"] for r in results], color=colors)
    axes.bar_label(bars, labels=[f"{r['perplexity']:,.0f}" for r in results], padding=3, fontsize=8)
    trained = [(i, r["uptrained_perplexity"]) for i, r in enumerate(results) if r["uptrained_perplexity"] is not None]
    if trained:
        axes.scatter([p for _, p in trained], [i for i, _ in trained], marker="D", color="black", zorder=3,
                     label="after uptraining")
    axes.axvline(source, color="black", linestyle="--", label=f"source {source:.1f}")
    axes.set_xscale("log")
    axes.set_xlim(right=max(r["perplexity"] for r in results) * 5)
    axes.set_yticks(range(len(results)), labels, fontsize=8)
    axes.invert_yaxis()
    axes.set_xlabel("held-out perplexity (log scale, lower is better)")
    axes.set_title("SmolLM2-135M converted" + (" (bars) and uptrained (diamonds)" if trained else ", no training"))
    axes.legend(loc="best")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", type=Path, default=Path("runs/smollm2"),
        help="SmolLM2 folder (kvshrink example smollm2 runs/smollm2)"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/quality"), help="folder for quality.md/png/json")
    parser.add_argument("--families", default="gqa,mla", help="comma-separated: gqa, mla, linear")
    parser.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens scored per model")
    parser.add_argument("--uptrain-steps", type=int, default=0, help="also score default and baseline after N steps")
    parser.add_argument("--compared-only", action="store_true", help="only the default and baseline rows")
    parser.add_argument(
        "--heldout", default="pydoc,kjv",
        help="comma-separated corpora whose held-out splits are scored (the first is plotted)"
    )
    parser.add_argument("--mla-budgets", default="0.5,0.25", help="comma-separated KV fractions of the MLA rows")
    args = parser.parse_args()
    families = {"gqa": gqa_rows, "mla": partial(mla_rows, [float(b) for b in args.mla_budgets.split(",")]),
                "linear": linear_rows}
    rows = [row for family in args.families.split(",") for row in families[family.strip()]()]
    rows = [row for row in rows if row.recipe or not args.compared_only]
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(args.model)
    windows = {corpus: token_windows(tokenizer, corpus_text(corpus, "heldout"), args.eval_tokens, 512)
               for corpus in args.heldout.split(",")}
    tokens = sum(w.numel() for w in next(iter(windows.values())))
    source = scores(args.model, windows)
    print(f"source perplexity: {_pair(source)} ({tokens} held-out tokens each)", flush=True)
    results = []
    for row in rows:
        results.append(measure(row, args.model, windows, args.uptrain_steps))
        print(json.dumps(results[-1]), flush=True)
        (args.out / "quality.json").write_text(
            json.dumps({"source": source, "tokens": tokens, "rows": results}, indent=2)
        )
        (args.out / "quality.md").write_text(markdown(results, source, tokens, args.uptrain_steps))
        plot(results, next(iter(source.values())), args.out / "quality.png")
    print(markdown(results, source, tokens, args.uptrain_steps))


if __name__ == "__main__":
    main()
