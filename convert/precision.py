"""The precision a run multiplies in: `auto` takes bf16 mixed precision only where the device multiplies bf16
natively, because elsewhere autocast's bf16 is emulated and slower than fp32.

Measured on SmolLM2 (README, "Shipped recipes"): on a CPU with AVX512-BF16, bf16 autocast made a distillation step
1.5-1.7x faster with a validation result within the spread of fp32 runs; with oneDNN capped to what an AVX-512 CPU
without it has, bf16 products ran at 0.6x the speed of fp32 ones (benchmarks/bf16_matmul.py).
"""

from __future__ import annotations

from typing import Literal

import torch

Precision = Literal["fp32", "bf16"]


def resolved_precision(precision: Literal["auto", "fp32", "bf16"], device: torch.device) -> Precision:
    """`precision` as given, or for `auto` bf16 where `device` has native bf16 arithmetic, fp32 elsewhere."""
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(device) else "fp32"


def native_bf16(device: torch.device) -> bool:
    """CUDA GPUs that support bf16 (Ampere and later), and x86 CPUs with AVX512-BF16 or AMX tiles; False for
    every other device (Apple, Intel and other accelerators, ARM CPUs), where `auto` keeps fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        # torch.cpu's capability probes are private (underscored): a torch without them reports no native bf16
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)
    return False


def running_precision(mixed_precision: str) -> Precision:
    """What an Accelerator with this `mixed_precision` setting multiplies in ("no" is fp32)."""
    return "bf16" if mixed_precision == "bf16" else "fp32"
