"""Error feedback on SmolLM2: each layer calibrated on the converted model's hidden states, or on the source's.

Converts SmolLM2 to MQA (default method) and to MLA at 50% and 25% of the source KV cache (serving layout,
`--target sglang`, since vLLM has no MLA shape at those widths for SmolLM2), once with and once without error
feedback, and prints the held-out perplexity of each (pydoc topics' held-out split, 8,192 tokens, no training).

    python benchmarks/error_feedback.py [--model runs/smollm2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from kvshrink.convert.check import load_causal_lm, load_tokenizer, perplexity, token_windows  # noqa: E402
from kvshrink.convert.corpora import corpus_text  # noqa: E402
from kvshrink.convert.mha_to_gqa import mha_to_gqa  # noqa: E402
from kvshrink.convert.mha_to_mla import mha_to_mla  # noqa: E402
from kvshrink.convert.options import GqaOptions, MlaOptions  # noqa: E402

EVAL_TOKENS = 8192
ROWS = {
    "MQA (output-aware)": lambda feedback: (
        mha_to_gqa, GqaOptions(groups=1, error_feedback=feedback, check=False, progress=False)
    ),
    "MLA 50%": lambda feedback: (mha_to_mla, MlaOptions(kv_budget=0.5, target="sglang", error_feedback=feedback,
                                                         check=False, progress=False)),
    "MLA 25%": lambda feedback: (mha_to_mla, MlaOptions(kv_budget=0.25, target="sglang", error_feedback=feedback,
                                                         check=False, progress=False)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="runs/smollm2", help="SmolLM2 folder (kvshrink example smollm2 runs/smollm2)"
    )
    args = parser.parse_args()
    windows = token_windows(load_tokenizer(Path(args.model)), corpus_text("pydoc", "heldout"), EVAL_TOKENS, 512)
    source = perplexity(load_causal_lm(Path(args.model), "cpu"), windows, progress=False)
    print(f"source perplexity (pydoc held-out, {EVAL_TOKENS} tokens): {source:.2f}", flush=True)
    print("| conversion | source-only calibration | error feedback | change |")
    print("|---|---:|---:|---:|", flush=True)
    for name, row in ROWS.items():
        values = {}
        for feedback in (False, True):
            convert, options = row(feedback)
            with tempfile.TemporaryDirectory() as folder:
                convert(args.model, Path(folder) / "out", options)
                values[feedback] = perplexity(load_causal_lm(Path(folder) / "out", "cpu"), windows, progress=False)
        change = values[True] / values[False] - 1
        print(f"| {name} | {values[False]:.2f} | {values[True]:.2f} | {change:+.1%} |", flush=True)


if __name__ == "__main__":
    main()
