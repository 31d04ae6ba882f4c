"""DeepseekV3's latent RMSNorm made an exact linear map.

RMSNorm(c) = w·c / sqrt(mean(c²) + eps). Scale the latent by α so that mean(c²) stays below 1e-6·eps for every
possible input, and the norm is c ↦ w·c/sqrt(eps) up to a relative 5e-7 (float32 rounding); fold sqrt(eps)/α into
the map that reads the latent. The bound is proven, not sampled: the layer input is an RMSNorm output,
so ‖x‖ ≤ sqrt(n)·max|norm weight|, and rms(Ax̃) ≤ σ_max(A)·‖x̃‖/sqrt(R). Needs float32 or bfloat16 weights (a
float16 latent this small is subnormal), and the eps the engine really uses (1e-6 in transformers).
"""

from __future__ import annotations

import math

import torch

HEADROOM = 1e-3  # largest latent rms, as a fraction of sqrt(eps)


def latent_scale(down: torch.Tensor, eps: float, input_norm_bound: float) -> float:
    """α such that rms(α·down·x̃) ≤ HEADROOM·sqrt(eps) for every input with ‖x̃‖ ≤ input_norm_bound."""
    largest_rms = float(torch.linalg.matrix_norm(down, ord=2)) * input_norm_bound / math.sqrt(down.shape[0])
    return HEADROOM * math.sqrt(eps) / max(largest_rms, 1e-300)


def linearization_error(latents: torch.Tensor, eps: float) -> float:
    """Largest relative deviation of RMSNorm from the linear map w·c/sqrt(eps) over latents [tokens, R]."""
    mean_square = latents.double().pow(2).mean(dim=-1)
    return float((1 - torch.sqrt(eps / (mean_square + eps))).abs().max())
