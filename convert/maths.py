"""The maths every converter shares: augmented rows, the input moment, rotary pairs, RMSNorm and the source's RoPE.

Weights and biases are handled together as "augmented" rows [W | b] acting on x̃ = [x; 1], so one second moment
E[x̃ x̃ᵀ] covers inputs with or without biases. In the rotate-half layout pair j of a head is dimensions
(j, j + d/2); RoPE multiplies z = x_j + i x_{j+d/2} by e^{iωp}, and the real dot product of two pairs is
Re(a · conj(b)). Writing projection rows this way makes every RoPE-commuting transformation (per-frequency
mixing of heads, complex gains) a complex matrix product.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kvshrink.convert.checkpoint import stock_config

# rope_type of a source whose layer types each have their own RoPE (Gemma-3): no one table for the whole model.
PER_LAYER_TYPE = "per-layer-type"


def augmented(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """[rows, n] weight and optional [rows] bias -> [rows, n + 1] float64 [W | b] acting on x̃ = [x; 1]
    (b = 0 when the projection has no bias)."""
    column = bias if bias is not None else torch.zeros(weight.shape[0], dtype=weight.dtype)
    return torch.cat([weight, column[:, None]], dim=1).double()


def split_augmented(rows: torch.Tensor, had_bias: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Back from [W | b] to float32 (W, b); b is dropped when the source had none (it is then exactly 0)."""
    return rows[:, :-1].float().contiguous(), rows[:, -1].float().contiguous() if had_bias else None


def augmented_inputs(inputs: torch.Tensor) -> torch.Tensor:
    """x̃ = [x; 1] of every token of `inputs` [tokens, n], float64 [tokens, n + 1]."""
    flat = inputs.double()
    return torch.cat([flat, torch.ones(flat.shape[0], 1, dtype=flat.dtype)], dim=1)


def augmented_moment(tokens: torch.Tensor) -> torch.Tensor:
    """E[x̃ x̃ᵀ] from the augmented tokens x̃ [tokens, n + 1] themselves (one product, where they are at hand)."""
    return tokens.T @ tokens / tokens.shape[0]


def input_moment(inputs: torch.Tensor) -> torch.Tensor:
    """E[x̃ x̃ᵀ] of `inputs` [tokens, n] built block by block, float64 [n + 1, n + 1], without the [tokens, n + 1]
    copy of `augmented_inputs`. It rounds differently from `augmented_moment`, so each converter keeps the one
    its outputs were made with."""
    x = inputs.double()
    moment = torch.empty(x.shape[1] + 1, x.shape[1] + 1, dtype=torch.float64)
    moment[:-1, :-1] = x.T @ x / x.shape[0]
    moment[:-1, -1] = moment[-1, :-1] = x.mean(dim=0)
    moment[-1, -1] = 1.0
    return moment


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


def pair_halves(heads: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotate-half parts of each pair along `dim` (one head's d dims): (dims j, dims j + d/2), as views."""
    half = heads.shape[dim] // 2
    return heads.narrow(dim, 0, half), heads.narrow(dim, half, half)


def rotary_halves(rows: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[heads * d, n] real rows (rotate-half) -> the real and imaginary parts of every pair, [heads, d/2, n] each."""
    return pair_halves(rows.reshape(-1, head_dim, rows.shape[-1]), 1)


def to_complex(rows: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[heads * d, n] real rows (rotate-half) -> [heads, d/2, n] complex rows, one per rotary pair."""
    return torch.complex(*rotary_halves(rows, head_dim))


def from_complex(pairs: torch.Tensor) -> torch.Tensor:
    """Inverse of `to_complex`: [heads, d/2, n] complex rows -> [heads * d, n] real rows (rotate-half)."""
    return to_rotate_half(pairs).reshape(-1, pairs.shape[-1])


def complex_pairs(heads: torch.Tensor) -> torch.Tensor:
    """[..., d] activations of a head (rotate-half) -> [..., d/2] complex, one per rotary pair."""
    return torch.complex(*pair_halves(heads, -1))


def to_rotate_half(pairs: torch.Tensor) -> torch.Tensor:
    """[..., P, n] complex rows -> [..., 2P, n] real rows in rotate-half order (all real parts, then imaginary)."""
    return torch.cat([pairs.real, pairs.imag], dim=-2)


def to_interleaved(pairs: torch.Tensor) -> torch.Tensor:
    """[..., P, n] complex rows -> [..., 2P, n] real rows in interleaved order (Re, Im of pair 0, then pair 1 ...)."""
    return torch.stack([pairs.real, pairs.imag], dim=-2).flatten(-3, -2)


def rotate_half_rope(heads: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on [..., d] rotate-half activations in real arithmetic, cos and sin [..., d/2] broadcasting against
    them: pair j becomes (x_j cos − x_{j+d/2} sin, x_{j+d/2} cos + x_j sin)."""
    first, second = pair_halves(heads, -1)
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)


def inverse_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / sqrt(mean(x²) + eps) over the last dim, kept as a dim of size 1."""
    return torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)


def rms_normalized(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / RMS(x) over the last dim, before any norm weight."""
    return x * inverse_rms(x, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, offset: float, eps: float) -> torch.Tensor:
    """RMSNorm as the source runs it: (offset + weight) ⊙ x / RMS(x) over the last dim (offset 1 in Gemma)."""
    return rms_normalized(x, eps) * (offset + weight.to(x.dtype))


@dataclass(frozen=True)
class SourceRope:
    """The source's rotary embedding at its trained length, as its config gives it."""

    rope_type: str  # transformers' rope_type ("default", "llama3", ...), or PER_LAYER_TYPE
    theta: float  # rope_theta
    fraction: float  # partial_rotary_factor: the share of each head that RoPE turns
    # [head_dim / 2] float64, pair j turns by position · inv_freq[j]; None where no one table says it
    # (PER_LAYER_TYPE, or a rope_type transformers does not know)
    inv_freq: torch.Tensor | None
    attention_scaling: float  # transformers multiplies cos and sin by this


def standardized_rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """The source's RoPE as transformers' own class reads it: rope_parameters with what older configs keep elsewhere
    (rope_scaling, top-level rope_theta, Phi-3's top-level original_max_position_embeddings) moved inside, for a
    class of another family to carry (its own defaults would fill in other values)."""
    return dict(stock_config(config).rope_parameters)


def read_source_rope(config: dict[str, Any], head_dim: int) -> SourceRope:
    """The RoPE of a source config (config.json as a dict). Each setting is read from rope_parameters (older
    configs: rope_scaling), then from the top level of the config, then transformers' default."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    theta = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    fraction = float(config.get("partial_rotary_factor") or rope.get("partial_rotary_factor") or 1.0)
    if any(isinstance(value, dict) for value in rope.values()):
        return SourceRope(PER_LAYER_TYPE, theta, fraction, None, 1.0)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":  # over the whole head even where RoPE turns only `fraction` of it (GQA's use)
        inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        return SourceRope(rope_type, theta, fraction, inv_freq, 1.0)
    if rope_type not in ROPE_INIT_FUNCTIONS:
        return SourceRope(rope_type, theta, fraction, None, 1.0)
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](stock_config(config), "cpu")
    return SourceRope(rope_type, theta, fraction, inv_freq.double(), float(scaling))
