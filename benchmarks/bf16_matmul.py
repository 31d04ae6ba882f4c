"""Whether bf16 pays on this CPU: matmul throughput in fp32 and bf16 at SmolLM2's training shapes, and what
`precision: auto` picks here.

    python benchmarks/bf16_matmul.py [--tokens 1024 --repeats 20]
    ONEDNN_MAX_CPU_ISA=AVX512_CORE python benchmarks/bf16_matmul.py   # as on an AVX-512 CPU without AVX512-BF16

The shapes are one micro-batch of 2x512 tokens through SmolLM2-135M's MLP (576 -> 1536) and its tied 49,152-word
output layer, the products that dominate a distillation step. A bf16/fp32 ratio above 1 means bf16 autocast makes
the step faster; oneDNN's ISA cap shows what a CPU without native bf16 dot products gets (`auto` reads the CPU's
own flags, so it answers for this CPU, not for the cap).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from kvshrink.convert.precision import resolved_precision

HIDDEN, INTERMEDIATE, VOCABULARY = 576, 1536, 49152


def gflops(dtype: torch.dtype, tokens: int, repeats: int) -> float:
    generator = torch.Generator().manual_seed(0)
    states = torch.randn(tokens, HIDDEN, generator=generator).to(dtype)
    mlp = torch.randn(HIDDEN, INTERMEDIATE, generator=generator).to(dtype)
    output_layer = torch.randn(VOCABULARY, HIDDEN, generator=generator).to(dtype)
    for _ in range(3):  # warm-up: oneDNN picks and caches its kernels
        states @ mlp, states @ output_layer.T
    start = time.perf_counter()
    for _ in range(repeats):
        states @ mlp, states @ output_layer.T
    seconds = (time.perf_counter() - start) / repeats
    return 2 * tokens * HIDDEN * (INTERMEDIATE + VOCABULARY) / seconds / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    fp32 = gflops(torch.float32, args.tokens, args.repeats)
    bf16 = gflops(torch.bfloat16, args.tokens, args.repeats)
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "not capped")
    print(f"{torch.get_num_threads()} threads, oneDNN ISA {isa}: fp32 {fp32:.0f} GFLOP/s, bf16 {bf16:.0f} GFLOP/s")
    print(
        f"bf16 / fp32: {bf16 / fp32:.2f}; precision: auto picks {resolved_precision('auto', torch.device('cpu'))} here"
    )


if __name__ == "__main__":
    main()
