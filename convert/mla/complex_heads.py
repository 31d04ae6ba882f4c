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


def moment_factor(moment: torch.Tensor) -> torch.Tensor:
    """F with F Fᵀ = moment (plus a ridge of 1e-12 of its largest diagonal entry, so that a rank-deficient moment,
    e.g. fewer calibration tokens than inputs, still factors). Energies computed as ‖r F‖² are sums of squares:
    never negative, however small the rows, where rᵀ·moment·r of a tiny residual can round below zero."""
    symmetric = moment + moment.T  # one [n, n] copy at a time: a 70B-width moment is 537 MB
    symmetric.mul_(0.5)
    ridge = 1e-12 * float(symmetric.diagonal().abs().max()) + 1e-300
    symmetric.diagonal().add_(ridge)
    factor, info = torch.linalg.cholesky_ex(symmetric)
    if int(info) == 0:
        return factor
    del factor
    symmetric.diagonal().sub_(ridge)
    values, vectors = torch.linalg.eigh(symmetric)  # indefinite by rounding beyond the ridge
    return vectors * values.clamp_min(0).sqrt()


def factored_energy(rows: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """E|r·x̃|² = ‖r F‖² for each complex (or real) row r, with F from `moment_factor`: [..., n] -> [...], >= 0."""
    if rows.is_complex():
        return factored_energy(rows.real, factor) + factored_energy(rows.imag, factor)
    return (rows.to(factor.dtype) @ factor).pow(2).sum(-1)


def energy(rows: torch.Tensor, moment: torch.Tensor) -> torch.Tensor:
    """E|r·x̃|² for each complex (or real) row r under the input second moment: [..., n] -> [...]."""
    if rows.is_complex():
        return energy(rows.real, moment) + energy(rows.imag, moment)
    return torch.einsum("...i,ij,...j->...", rows, moment, rows)


def pair_covariance(row_moment: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """[d/2, heads, heads] complex: E[z_aj conj(z_bj)] for the rotary pairs z = r + i r' (rows j and j + d/2 of each
    head, rotate-half) from the real rows' second moment R Σ Rᵀ [heads·d, heads·d]. Σ is then applied once, in real
    arithmetic, instead of through a complex copy of the [n, n] moment."""
    blocks = row_moment.reshape(heads, head_dim, heads, head_dim)

    def same_pair(rows: slice, cols: slice) -> torch.Tensor:  # [J, n, n]: entries (head a, pair j; head b, pair j)
        return torch.diagonal(blocks[:, rows, :, cols], dim1=1, dim2=3).permute(2, 0, 1)

    return _paired(same_pair, head_dim)


def rows_pair_covariance(rows: torch.Tensor, moment: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """`pair_covariance(rows @ moment @ rows.T)` without the products between different pairs, which it discards:
    one [heads·d, n] x [n, n] product instead of two."""
    weighted = (rows @ moment).reshape(heads, head_dim, -1)
    plain = rows.reshape(heads, head_dim, -1)

    def same_pair(rows: slice, cols: slice) -> torch.Tensor:
        return torch.einsum("ajn,bjn->jab", weighted[:, rows], plain[:, cols])

    return _paired(same_pair, head_dim)


def _paired(same_pair, head_dim: int) -> torch.Tensor:
    """E[z_a conj(z_b)] = E[r_a r_b + r'_a r'_b] + i E[r'_a r_b - r_a r'_b], from the blocks `same_pair(rows, cols)`."""
    half = head_dim // 2
    real, imag = slice(0, half), slice(half, head_dim)
    return torch.complex(same_pair(real, real) + same_pair(imag, imag), same_pair(imag, real) - same_pair(real, imag))
