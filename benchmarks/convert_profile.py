"""Where a default conversion's time goes: each step's seconds per layer, against the forward passes it must make.

Runs one default conversion in this process under cProfile (`mha-to-gqa --groups G`, `mha-to-mqa` or `mha-to-mla`
at a shape), then reads the cumulative seconds of the functions that make up each step: the calibration forward
(the windows advanced through the source's layers, and MLA's first pass), the method's closed form and its parts
(grouping search, merges, error reports; MLA's latent factorization), the block-wise fit and its parts (the source
attention's outputs, the steps' forward, backward and update, the errors it measures), writing, and the check.
The last column divides by one whole-model transformers forward over the calibration tokens (the least any
calibrated method must read).

    python benchmarks/convert_profile.py runs/smollm2 --method mqa
    python benchmarks/convert_profile.py runs/smollm2 --method mla --mla-shape 256+64 --calibration-tokens 4096
    python benchmarks/convert_profile.py SYNTHETIC_1B --method gqa --groups 8 --fit none   # convert_speed.py builds one

Profiling adds a little to Python-heavy steps (the grouping search's cost calls); tensor maths is unaffected.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
import time
from pathlib import Path

import torch

from convert_speed import whole_model_seconds  # benchmarks/ is on the path when a script here runs
from kvshrink.convert.calibration import calibration_windows
from kvshrink.convert.corpora import calibration_text
from kvshrink.convert.mha_to_gqa import mha_to_gqa
from kvshrink.convert.mha_to_mla import mha_to_mla
from kvshrink.convert.options import GqaOptions, MlaOptions

# (row, file the function is in, function name); indented rows are parts of the row above them
STEPS = [
    ("calibration forward (windows through the source layers)", "convert/calibration.py", "advance"),
    ("MLA first pass (its forward counted above too)", "convert/mha_to_mla.py", "_summarize"),
    ("method closed form (GQA/MQA)", "convert/mha_to_gqa.py", "convert_layer"),
    ("  similar-head grouping search", "convert/gqa/grouping.py", "similar_groups"),
    ("  attended moments", "convert/gqa/attended.py", "attended_moments"),
    ("  output-aware merge", "convert/gqa/output_aware.py", "merge"),
    ("  merge error report", "convert/gqa/objectives.py", "merge_errors"),
    ("method closed form (MLA)", "convert/mha_to_mla.py", "convert_layer"),
    ("  joint latent factorization", "convert/mla/lowrank.py", "joint_latent"),
    ("  error report", "convert/mla/layer.py", "_errors"),
    ("block-wise fit", "convert/fitting.py", "fit_converted_attention"),
    ("  source attention outputs", "convert/fitting.py", "_source_pairs"),
    ("  steps: forward", "convert/fitting.py", "_batch_loss"),
    ("  steps: backward", "torch/_tensor.py", "backward"),
    ("  steps: AdamW update", "torch/optim/adam.py", "step"),  # AdamW is Adam with decoupled decay
    ("  measured errors (fp32)", "convert/fitting.py", "output_errors"),
    ("writing layers", "convert/frame.py", "write_layer"),
    ("check (perplexity of every scored model)", "convert/check.py", "compare_perplexity"),
]


def cumulative_seconds(stats: pstats.Stats, path: str, function: str) -> float:
    return sum(
        entry[3] for (file, _, name), entry in stats.stats.items() if name == function and file.endswith(path)
    )


def forward_seconds(source: Path, tokens: int) -> float:
    """One whole-model forward of the source over the calibration windows, as transformers runs it."""
    return whole_model_seconds(source, calibration_windows(source, calibration_text(None), tokens))


def run(args: argparse.Namespace, out: Path) -> tuple[dict, float, pstats.Stats]:
    common = {"calibration_tokens": args.calibration_tokens, "check_tokens": args.check_tokens,
              "fit": args.fit, "progress": False}
    profile = cProfile.Profile()
    start = time.perf_counter()
    profile.enable()
    if args.method == "mla":
        report = mha_to_mla(args.source, out, MlaOptions(mla_shape=args.mla_shape, target=args.target, **common))
    else:
        groups = 1 if args.method == "mqa" else args.groups
        report = mha_to_gqa(args.source, out, GqaOptions(groups=groups, **common))
    profile.disable()
    return report, time.perf_counter() - start, pstats.Stats(profile)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("--method", choices=["gqa", "mqa", "mla"], default="mqa")
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--mla-shape", default="256+64")
    parser.add_argument("--target", default="sglang")
    parser.add_argument("--calibration-tokens", type=int, default=16384)
    parser.add_argument("--check-tokens", type=int, default=2048)
    parser.add_argument("--fit", choices=["attention", "none"], default="attention")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        report, total, stats = run(args, Path(scratch) / "out")
    layers = len(report["layers"])
    forward = forward_seconds(args.source, args.calibration_tokens)
    print(f"{args.method} on {args.source}: {layers} layers, {args.calibration_tokens} calibration / "
          f"{args.check_tokens} check tokens, fit {args.fit}, {torch.get_num_threads()} threads\n")
    print("| step | seconds | per layer | × forward |\n|---|---|---|---|")
    for label, path, function in STEPS:
        seconds = cumulative_seconds(stats, path, function)
        if seconds > 0:
            print(f"| {label} | {seconds:.1f} | {seconds / layers:.2f} | {seconds / forward:.2f} |")
    print(f"| **total** | {total:.1f} | {total / layers:.2f} | {total / forward:.2f} |")
    print(f"| whole-model forward over the calibration tokens | {forward:.1f} | {forward / layers:.2f} | 1.00 |")


if __name__ == "__main__":
    main()
