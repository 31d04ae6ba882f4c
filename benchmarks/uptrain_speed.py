"""Training throughput of `uptrain` against the smallest possible accelerate loop on the same model and data.

    python benchmarks/uptrain_speed.py --model runs/smollm2 [--steps 10 --seq-len 256 --micro-batch 4 --precision bf16]

Both runs train every parameter with next-token loss on the same packed pydoc blocks, in fp32 or in bf16 mixed
precision, with AdamW's fused kernel on CPU and CUDA (as uptrain uses it); tokens/s counts the training steps only
(uptrain's validation passes and file writing are outside its own step timer). The runs alternate `--repeats`
times and the best of each is kept, because the CPU may be shared. Target: ratio >= 0.9.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def bare_loop_tokens_per_s(model_dir: Path, steps: int, seq_len: int, micro_batch: int, precision: str) -> float:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvshrink.convert.corpora import corpus_text

    accelerator = Accelerator(mixed_precision="bf16" if precision == "bf16" else "no")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = torch.tensor(tokenizer(corpus_text("pydoc", "train"), verbose=False)["input_ids"])
    blocks = ids[: len(ids) // seq_len * seq_len].view(-1, seq_len)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=accelerator.device.type in ("cpu", "cuda"))
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        batch = blocks[step * micro_batch : (step + 1) * micro_batch].to(accelerator.device)
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    loss.item()
    elapsed = time.perf_counter() - start
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return steps * micro_batch * seq_len / elapsed


def uptrain_tokens_per_s(model_dir: Path, steps: int, seq_len: int, micro_batch: int, precision: str) -> float:
    from accelerate.state import AcceleratorState, GradientState

    from kvshrink.uptrain import recipe_from_dict, uptrain

    with tempfile.TemporaryDirectory() as scratch:
        recipe = recipe_from_dict({
            "model": str(model_dir), "output_dir": f"{scratch}/out", "max_steps": steps, "seq_len": seq_len,
            "micro_batch_size": micro_batch, "data": [{"corpus": "pydoc"}],
            "validation": {"max_tokens": seq_len * micro_batch}, "optimizer": {"lr": 1e-5, "grad_clip": None},
            "schedule": {"kind": "constant"}, "log_interval": steps, "precision": precision,
        })
        report = uptrain(recipe)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return report["this_session"]["tokens_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("runs/smollm2"), help="a model folder with tokenizer")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    args = parser.parse_args()
    if not (args.model / "config.json").is_file():
        parser.error(f"{args.model} is not a model folder: create it with `kvshrink example smollm2 {args.model}`")
    bare, ours = [], []
    for _ in range(args.repeats):
        shape = (args.model, args.steps, args.seq_len, args.micro_batch, args.precision)
        bare.append(bare_loop_tokens_per_s(*shape))
        ours.append(uptrain_tokens_per_s(*shape))
    device = "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    print(
        f"model {args.model}, {args.steps} steps of {args.micro_batch}x{args.seq_len} tokens, {args.precision}, on "
        f"{device}"
    )
    print(f"bare accelerate loop: {max(bare):10.1f} tokens/s  (runs: {', '.join(f'{v:.1f}' for v in bare)})")
    print(f"uptrain:              {max(ours):10.1f} tokens/s  (runs: {', '.join(f'{v:.1f}' for v in ours)})")
    print(f"ratio uptrain / bare: {max(ours) / max(bare):.3f}  (target >= 0.9)")


if __name__ == "__main__":
    main()
