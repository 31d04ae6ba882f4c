"""Rotary pairs as complex numbers.

In the rotate-half layout pair j of a head is dimensions (j, j + d/2); RoPE multiplies z = x_j + i x_{j+d/2} by
e^{iωp}, and the real dot product of two pairs is Re(a · conj(b)). Writing projection rows this way makes every
RoPE-commuting transformation (per-frequency mixing of heads, complex gains) a complex matrix product.
Rows carry an extra last column for the bias, so inputs are x̃ = [x; 1].
"""

from __future__ import annotations

import torch


def augmented(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """[rows, n] weight and optional [rows] bias -> [rows, n + 1] float64 acting on x̃ = [x; 1]."""
    column = bias if bias is not None else torch.zeros(weight.shape[0], dtype=weight.dtype)
    return torch.cat([weight, column[:, None]], dim=1).double()


def to_complex(rows: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """[heads * d, n] real rows (rotate-half) -> [heads, d/2, n] complex rows, one per rotary pair."""
    per_head = rows.reshape(heads, head_dim, -1)
    half = head_dim // 2
    return torch.complex(per_head[:, :half], per_head[:, half:])


def to_rotate_half(pairs: torch.Tensor) -> torch.Tensor:
    """[..., P, n] complex rows -> [..., 2P, n] real rows in rotate-half order (all real parts, then imaginary)."""
    return torch.cat([pairs.real, pairs.imag], dim=-2)


def to_interleaved(pairs: torch.Tensor) -> torch.Tensor:
    """[..., P, n] complex rows -> [..., 2P, n] real rows in interleaved order (Re, Im of pair 0, then pair 1 ...)."""
    return torch.stack([pairs.real, pairs.imag], dim=-2).flatten(-3, -2)


def energy(rows: torch.Tensor, moment: torch.Tensor) -> torch.Tensor:
    """E|r·x̃|² for each complex (or real) row r under the input second moment: [..., n] -> [...]."""
    if rows.is_complex():
        return energy(rows.real, moment) + energy(rows.imag, moment)
    return torch.einsum("...i,ij,...j->...", rows, moment, rows)
