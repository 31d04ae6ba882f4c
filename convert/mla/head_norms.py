"""Per-head query/key RMSNorm before RoPE (Qwen3) replaced by calibrated linear maps, so DeepseekV3 can hold it.

No DeepseekV3 attention reproduces n(y) = (offset + w) ⊙ y / sqrt(mean(y²) + eps) applied to each head's
projection y = W x (+ b): it is not linear in x. Each head's normalized queries and keys are instead predicted
from the layer input by the least-squares linear map on calibration inputs, A = E[n(y) xᵀ] E[x xᵀ]⁻¹, which
replaces the projection and its norm. TransMLA keeps the projection and applies one fixed gain, the mean of
1/rms (times the norm weight); that is one point of the family least squares searches, so on the calibration
inputs the fit can only do better. Between the two, "head-matrix" fits one d x d matrix per head on top of the
source projection (fewer parameters, so less to memorize on a short calibration text). Every method's error
is measured on held-out calibration tokens, so the report says by how much the chosen one wins. The result is
an approximation: the converted model should be uptrained.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvshrink.convert.attention import AttentionWeights
from kvshrink.convert.maths import augmented, inverse_rms, rms_norm

HEAD_NORM_FITS = ("least-squares", "head-matrix", "mean-gain")
# Ridge on the input moment, relative to its mean eigenvalue: keeps the solve stable on directions the
# calibration text never excites, far below any direction it does.
_RIDGE = 1e-6


@dataclass(frozen=True)
class HeadNormFit:
    """Rows (with a last bias column when the source projection had a bias) that replace norm ∘ projection."""

    q: torch.Tensor  # [H * d, n (+ 1)] float64
    k: torch.Tensor  # [KV * d, n (+ 1)] float64
    errors: dict[str, float]


def normalized_heads(
    x: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor, offset: float, head_dim: int, eps: float
) -> torch.Tensor:
    """What the source computes: each head of x @ rowsᵀ RMS-normalized and scaled, [tokens, heads * d]."""
    heads = (x @ rows.T).reshape(x.shape[0], -1, head_dim)
    return rms_norm(heads, weight, offset, eps).reshape(x.shape[0], -1)


def least_squares_rows(x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The rows A minimizing Σ‖A x − t‖² over the calibration tokens (ridge-stabilized)."""
    moment = x.T @ x
    ridge = _RIDGE * moment.diagonal().mean() * torch.eye(moment.shape[0], dtype=moment.dtype)
    return torch.linalg.solve(moment + ridge, x.T @ targets).T


def head_matrix_rows(x: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Per head, the d x d matrix B minimizing Σ‖B y − t‖² over the tokens, applied to the source rows (B W)."""
    heads = rows.reshape(-1, head_dim, rows.shape[-1])
    projected = torch.einsum("tn,hdn->htd", x, heads)  # [heads, tokens, d]
    wanted = targets.reshape(x.shape[0], -1, head_dim).transpose(0, 1)
    gram = projected.mT @ projected
    ridge = _RIDGE * gram.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None] * torch.eye(head_dim, dtype=x.dtype)
    mixing = torch.linalg.solve(gram + ridge, projected.mT @ wanted).mT  # [heads, d, d]
    return (mixing @ heads).reshape(rows.shape)


def mean_gain_rows(
    x: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor, offset: float, head_dim: int, eps: float
) -> torch.Tensor:
    """TransMLA's linearization: each head's rows times the norm weight and the mean of 1/rms over the tokens."""
    heads = (x @ rows.T).reshape(x.shape[0], -1, head_dim)
    gain = inverse_rms(heads, eps).squeeze(-1).mean(dim=0)  # [heads]
    scale = gain[:, None] * (offset + weight.double())[None, :]
    return rows * scale.reshape(-1, 1)


def _relative_error(x: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor) -> float:
    return float((x @ rows.T - targets).norm() / targets.norm().clamp_min(1e-30))


def _fits(x: torch.Tensor, source: torch.Tensor, targets: torch.Tensor, norm: torch.Tensor, attention, eps: float):
    return {
        "least-squares": least_squares_rows(x, targets),
        "head-matrix": head_matrix_rows(x, source, targets, attention.head_dim),
        "mean-gain": mean_gain_rows(x, source, norm, attention.norm_offset, attention.head_dim, eps),
    }


def fit_head_norms(attention: AttentionWeights, inputs: torch.Tensor, eps: float, method: str) -> HeadNormFit:
    """Linear maps for the normalized queries and keys of one layer from its calibration `inputs` [tokens, n]
    by `method` (see HEAD_NORM_FITS). Every method's error is measured on the last quarter of the tokens after
    fitting on the rest (held out, so a fit that memorizes the calibration text shows it); the rows returned
    are then fitted on all tokens."""
    rows, errors = {}, {}
    held_out = slice(len(inputs) * 3 // 4, None)
    fitted_on = slice(0, len(inputs) * 3 // 4)
    for part in ("q", "k"):
        bias = getattr(attention, f"{part}_bias")
        x = inputs.double() if bias is None else torch.cat([inputs.double(), torch.ones(len(inputs), 1)], dim=1)
        source = augmented(getattr(attention, part), bias)[:, : x.shape[1]]
        norm = getattr(attention, f"{part}_norm")
        targets = normalized_heads(x, source, norm, attention.norm_offset, attention.head_dim, eps)
        for name, candidate in _fits(x[fitted_on], source, targets[fitted_on], norm, attention, eps).items():
            error = _relative_error(x[held_out], candidate, targets[held_out])
            errors[f"{part}_norm_rel_error_{name.replace('-', '_')}"] = error
            if name == method:
                errors[f"{part}_norm_rel_error"] = error
        rows[part] = _fits(x, source, targets, norm, attention, eps)[method]
    return HeadNormFit(q=rows["q"], k=rows["k"], errors=errors)


def linearized(attention: AttentionWeights, fit: HeadNormFit) -> AttentionWeights:
    """The layer with its normed projections replaced by the fitted rows and no q/k norms."""

    def split(rows: torch.Tensor, had_bias: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not had_bias:
            return rows.float().contiguous(), None
        return rows[:, :-1].float().contiguous(), rows[:, -1].float().contiguous()

    q, q_bias = split(fit.q, attention.q_bias is not None)
    k, k_bias = split(fit.k, attention.k_bias is not None)
    return attention.with_kv(q=q, q_bias=q_bias, k=k, k_bias=k_bias, q_norm=None, k_norm=None, norm_offset=0.0)
