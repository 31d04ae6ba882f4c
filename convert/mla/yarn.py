"""Llama-3 RoPE in the serving layout: yarn parameters whose frequency table comes closest to the kept slots'.

vLLM and SGLang run every non-default rope type of a DeepseekV2/V3 checkpoint as `deepseek_yarn`, and transformers'
DeepseekV3 computes the same table from the same `yarn` fields (see `engines`). Over the rope key's D dims that
table is, per slot i < D/2, a blend of the base frequency θ'^(-2i/D) and the same divided by `factor`:
w_i·θ'^(-2i/D) + (1 - w_i)·θ'^(-2i/D)/factor, where w_i ramps linearly from 1 at slot `low` down to 0 at slot
`high`; (low, high) come from beta_fast and beta_slow through floor/ceil of the correction dimension
D·ln(L/(2πβ)) / (2 ln θ') with L = original_max_position_embeddings.

Llama-3 scaling has the same two ends (fast frequencies unchanged, slow ones divided by its `factor`) but blends
linearly in frequency rather than in slot index, so the kept slots' source frequencies are matched exactly at both
ends and approximately in between: every integer (low, high) is tried, the one with the least squared log-frequency
error kept, and beta_fast / beta_slow set in the middle of the intervals that floor and ceil map onto them. mscale
and mscale_all_dim are 0 and attention_factor 1, so neither engine rescales attention or cos/sin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class YarnFit:
    parameters: dict[str, Any]  # rope_parameters for the DeepseekV3 config
    frequencies: torch.Tensor  # [D/2] the table the engines compute
    relative_error: torch.Tensor  # [D/2] |table - wanted| / wanted per slot


def yarn_table(theta: float, dim: int, factor: float, low: int, high: int) -> torch.Tensor:
    """The deepseek_yarn inv_freq [dim/2] (float64) for integer correction bounds low < high."""
    base = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    return base * (1 - ramp) + base / factor * ramp


def _beta(correction_dim: float, theta: float, dim: int, original_max_positions: int) -> float:
    """The number of rotations whose correction dimension is `correction_dim` (the inverse of yarn's formula)."""
    return original_max_positions / (2 * math.pi) * theta ** (-2 * correction_dim / dim)


def fit_yarn(wanted: torch.Tensor, theta: float, dim: int, factor: float, original_max_positions: int) -> YarnFit:
    """Yarn rope_parameters over `dim` rope dims with base `theta` whose table is closest to `wanted` [dim/2]."""
    wanted = wanted.double()
    candidates = [(low, high) for low in range(dim // 2) for high in range(low + 1, dim)]
    low, high = min(candidates, key=lambda bounds: float(
        (yarn_table(theta, dim, factor, *bounds).log() - wanted.log()).pow(2).sum()))
    table = yarn_table(theta, dim, factor, low, high)
    parameters = {
        "rope_type": "yarn", "rope_theta": theta, "factor": float(factor),
        "original_max_position_embeddings": int(original_max_positions),
        "beta_fast": _beta(low + 0.5, theta, dim, original_max_positions),
        "beta_slow": _beta(high - 0.5, theta, dim, original_max_positions),
        "mscale": 0.0, "mscale_all_dim": 0.0, "attention_factor": 1.0,
    }
    return YarnFit(parameters=parameters, frequencies=table, relative_error=(table - wanted).abs() / wanted)
