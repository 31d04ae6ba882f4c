"""What glibc's default malloc costs a CPU distillation step, against keep_freed_memory() (uptrain's setting).

    python benchmarks/host_memory.py --model runs/smollm2 [--steps 4 --seq-len 512 --micro-batch 2 --precision bf16]

Each setting runs in its own process (malloc's setting cannot be undone): the model distils from itself on
packed pydoc blocks, every parameter trained with fused AdamW, as uptrain's end-to-end stage does. After one
warm-up step it reports seconds and minor page faults per step and the peak resident memory. The two settings
alternate `--repeats` times and the best of each is kept, because the CPU may be shared.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch


def distillation_steps(model_dir: Path, steps: int, seq_len: int, micro_batch: int, precision: str) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvshrink.convert.corpora import corpus_text
    from kvshrink.uptrain.losses import distill_loss

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = torch.tensor(tokenizer(corpus_text("pydoc", "train"), verbose=False)["input_ids"])
    blocks = ids[: len(ids) // seq_len * seq_len].view(-1, seq_len)
    student = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    teacher_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    teacher = AutoModelForCausalLM.from_pretrained(model_dir, dtype=teacher_dtype).eval()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5, fused=True)
    seconds, faults = [], []
    for step in range(steps + 1):
        batch = blocks[step * micro_batch : (step + 1) * micro_batch]
        mask = torch.ones_like(batch)
        start, faults_before = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            with torch.no_grad():
                target = teacher(input_ids=batch, use_cache=False).logits
            loss = distill_loss(student(input_ids=batch, use_cache=False).logits, target, mask, 1.0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step:  # the first step allocates everything for the first time under either setting
            seconds.append(time.perf_counter() - start)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before)
    return {"seconds_per_step": sum(seconds) / steps, "faults_per_step": sum(faults) / steps,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def child(args: argparse.Namespace) -> None:
    from kvshrink.uptrain.host_memory import keep_freed_memory

    kept = args.child == "keep" and keep_freed_memory()
    if args.child == "keep" and not kept:
        raise SystemExit("this C library is not glibc: keep_freed_memory() changes nothing here")
    print(json.dumps(distillation_steps(args.model, args.steps, args.seq_len, args.micro_batch, args.precision)))


def measured(args: argparse.Namespace, setting: str) -> dict:
    command = [sys.executable, __file__, "--child", setting, "--model", str(args.model), "--steps", str(args.steps),
               "--seq-len", str(args.seq_len), "--micro-batch", str(args.micro_batch), "--precision", args.precision]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"the {setting} run failed: {result.stderr.strip().splitlines()[-1]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("runs/smollm2"), help="a model folder with tokenizer")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", choices=["default", "keep"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not (args.model / "config.json").is_file():
        parser.error(f"{args.model} is not a model folder: create it with `kvshrink example smollm2 {args.model}`")
    if args.child:
        return child(args)
    runs: dict[str, list[dict]] = {"default": [], "keep": []}
    for _ in range(args.repeats):
        for setting in runs:
            runs[setting].append(measured(args, setting))
    print(f"model {args.model}, distillation steps of {args.micro_batch}x{args.seq_len} tokens, {args.precision}, "
          f"on cpu ({torch.get_num_threads()} threads)")
    best = {setting: min(rows, key=lambda row: row["seconds_per_step"]) for setting, rows in runs.items()}
    for setting, row in best.items():
        name = "glibc default malloc" if setting == "default" else "keep_freed_memory()"
        print(f"{name:22} {row['seconds_per_step']:6.2f} s/step  {row['faults_per_step']:10.0f} page faults/step  "
              f"peak RSS {row['peak_rss_gib']:.2f} GiB")
    print(f"speed-up: {best['default']['seconds_per_step'] / best['keep']['seconds_per_step']:.2f}x")


if __name__ == "__main__":
    main()
