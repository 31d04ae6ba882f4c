"""SmolLM2 perplexity of MLA conversions: every method combination at 50% and 25% of the source KV cache, or at
one shape (--shape 256+64: SmolLM2's only vLLM-servable shape, 83% KV).

Calibration on the train split of pydoc topics (the default), perplexity on its held-out split, no training.
Prints a markdown table whose last column lists the engines each checkpoint is valid in (from the report). Each
row calibrates anew (a conversion streams its calibration layer by layer); about 2 minutes per row on 2 CPU cores.

    python benchmarks/mla_quality.py [--model DIR] [--rows all|1,2,...] [--shape R+D]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import kvshrink.convert.mha_to_mla as conversion  # noqa: E402
from kvshrink.convert.check import load_causal_lm, load_tokenizer, perplexity, token_windows  # noqa: E402
from kvshrink.convert.corpora import corpus_text  # noqa: E402
from kvshrink.convert.options import MlaOptions  # noqa: E402

EVAL_TOKENS = 4096
# (rope method, factorization, distance aware, target, rope dim at 50%, rope dim at 25%). At these budgets SmolLM2 has
# no shape vLLM runs, so the serving layout is measured under --target sglang (same layout, any shape).
ROWS = [
    ("partial", "weight", False, "transformers", 64, 32),
    ("partial", "activation", False, "transformers", 64, 32),
    ("rotate", "weight", False, "transformers", 64, 32),
    ("rotate", "activation", False, "transformers", 64, 32),
    ("partial", "activation", True, "transformers", 32, 32),
    ("rotate", "activation", True, "transformers", 32, 32),
    ("rotate", "activation", True, "transformers", 64, 16),
    ("rotate", "activation", False, "sglang", 64, 32),
    ("rotate", "activation", True, "sglang", 32, 32),
    ("rotate", "activation", True, "sglang", 64, 16),
    ("rotate", "output", True, "transformers", 32, 32),
    ("rotate", "output", True, "sglang", 32, 32),
    ("rotate", "output", False, "transformers", 64, 32),
    ("rotate", "activation", True, "transformers", 16, 16),
    ("rotate", "activation", True, "sglang", 16, 16),
    ("rotate", "balanced", True, "sglang", 32, 32),
    ("rotate", "balanced", True, "vllm", None, None),  # for --shape 256+64
    ("rotate", "balanced", True, "transformers", None, None),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="runs/smollm2", help="SmolLM2 folder (kvshrink example smollm2 runs/smollm2)"
    )
    parser.add_argument("--rows", default="all", help="'all' or comma-separated row numbers (1-based)")
    parser.add_argument("--shape", help="convert every row at this R+D instead of at 50%% and 25%%")
    args = parser.parse_args()
    rows = ROWS if args.rows == "all" else [ROWS[int(i) - 1] for i in args.rows.split(",")]
    windows = token_windows(load_tokenizer(Path(args.model)), corpus_text("pydoc", "heldout"), EVAL_TOKENS, 512)
    source = perplexity(load_causal_lm(Path(args.model)), windows, progress=False)
    print(f"source perplexity (pydoc held-out, {EVAL_TOKENS} tokens): {source:.2f}", flush=True)
    print("| rope | factorization | distance-aware | target | KV | R+D | perplexity | valid in |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    for rope, factorization, distance, target, rope_50, rope_25 in rows:
        sizes = [dict(mla_shape=args.shape)] if args.shape else [
            dict(kv_budget=0.5, rope_dim=rope_50), dict(kv_budget=0.25, rope_dim=rope_25)]
        for size in sizes:
            with tempfile.TemporaryDirectory() as folder:
                options = MlaOptions(
                    **size, rope_method=rope, factorization=factorization,
                    distance_aware=distance, target=target, check=False, progress=False,
                )
                report = conversion.mha_to_mla(args.model, Path(folder) / "out", options)
                value = perplexity(load_causal_lm(Path(folder) / "out"), windows, progress=False)
            shape = report["mla"]
            print(
                f"| {rope} | {factorization} | {'yes' if distance else 'no'} | {target} | {report['kv_fraction']:.0%} "
                f"| {shape['kv_lora_rank']}+{shape['qk_rope_head_dim']} | {value:.1f} | "
                f"{', '.join(report['valid_engines'])} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
