"""Linear-attention hybrids (or any model folders) against their source: held-out perplexity at two window lengths
and the bytes each holds per token at 32K tokens of context.

Scores every folder, as saved, on the held-out splits of pydoc and KJV (which calibration and the recipes never
read): `--eval-tokens` tokens of each, in non-overlapping windows of each `--windows` length, every model streamed
layer by layer on the CPU. Long windows are where a Mamba-2 mixer's fixed state loses most against the attention
it replaced. Ratios are against the source (`--model`). The README's "Linear-attention hybrids" table after the
recipe came from

    python benchmarks/linear_hybrid.py --model runs/smollm2 runs/smollm2-linear runs/smollm2-linear-uptrained ...

about a minute per folder and window length on 2 CPU cores. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from kvshrink.convert.check import folder_perplexity, load_tokenizer, token_windows  # noqa: E402
from kvshrink.convert.corpora import corpus_text  # noqa: E402
from kvshrink.convert.kvcache import LONG_CONTEXTS, kv_bytes_at_context  # noqa: E402

CORPORA = ("pydoc", "kjv")


def _scores(folder: Path, windows: dict[tuple[int, str], list[torch.Tensor]]) -> dict[tuple[int, str], float]:
    return {key: folder_perplexity(folder, chunks, torch.device("cpu")) for key, chunks in windows.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="the source the ratios are against")
    parser.add_argument("folders", type=Path, nargs="+", help="model folders to score")
    parser.add_argument("--windows", default="4096,512", help="comma-separated window lengths")
    parser.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens of each corpus")
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.model)
    lengths = [int(length) for length in args.windows.split(",")]
    text = {corpus: corpus_text(corpus, "heldout") for corpus in CORPORA}
    windows = {(length, corpus): token_windows(tokenizer, text[corpus], args.eval_tokens, length)
               for length in lengths for corpus in CORPORA}
    source = _scores(args.model, windows)
    context = LONG_CONTEXTS[-1]
    print(f"| model | bytes held at {context // 1024}K | "
          + " | ".join(f"{length}-token windows, pydoc / KJV (× source)" for length in lengths) + " |")
    print("|---|---|" + "---|" * len(lengths))
    for folder in [args.model, *args.folders]:
        scores = source if folder == args.model else _scores(folder, windows)
        held = kv_bytes_at_context(json.loads((folder / "config.json").read_text()), context)
        cells = [" / ".join(f"{scores[length, c]:.2f}" for c in CORPORA) + " ("
                 + " / ".join(f"{scores[length, c] / source[length, c]:.2f}×" for c in CORPORA) + ")"
                 for length in lengths]
        print(f"| {folder.name} | {held:,.0f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
