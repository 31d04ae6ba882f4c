"""Biases the serving layout cannot hold, refit into the weights on calibration activations.

vLLM and SGLang build DeepseekV3's projections without biases. A row acting on x̃ = [x; 1] with a bias b becomes
the bias-free row w' minimizing E|w'·x - (w·x + b)|² over the calibration inputs: with Σ = E[x xᵀ] and
μ = E[x] (both read off the augmented second moment), w' = w + b·(Σ⁻¹μ)ᵀ, a rank-one update. It is exact when
the constant 1 lies in the span of the inputs, and otherwise the best the calibration text allows; its relative
error on calibration tokens is reported per layer. (A key bias on no-RoPE dimensions needs none of this: it adds
the same amount to every logit of a query, so it is dropped exactly before the refit.)
"""

from __future__ import annotations

import torch

from kvshrink.convert.maths import factored_energy


def refit_without_bias(rows: torch.Tensor, moment: torch.Tensor, factor: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Bias-free rows [r, n] closest to `rows` [r, n + 1] (float64, last column the bias) on the inputs whose
    augmented second moment is `moment` [n + 1, n + 1] (`factor`: its moment_factor); and their relative output
    error there (0 when no bias)."""
    weights, bias = rows[:, :-1], rows[:, -1:]
    if not bool(bias.abs().max() > 0):
        return weights, 0.0
    inputs_moment, mean = moment[:-1, :-1], moment[:-1, -1:]
    ridge = 1e-10 * float(inputs_moment.diagonal().abs().max())
    direction = torch.linalg.solve(inputs_moment + ridge * torch.eye(inputs_moment.shape[0], dtype=moment.dtype), mean)
    refit = weights + bias @ direction.T
    residual = rows - torch.cat([refit, torch.zeros_like(bias)], dim=1)
    error = factored_energy(residual, factor).sum() / factored_energy(rows, factor).sum().clamp_min(1e-300)
    return refit, float(error.sqrt())


def refit_layer(
    query_rows: torch.Tensor, latent_down: torch.Tensor, rope_key_rows: torch.Tensor, moment: torch.Tensor,
    factor: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, float]]:
    """The bias-free query rows, latent rows and rope key rows of one layer, with each part's relative error."""
    query, query_error = refit_without_bias(query_rows, moment, factor)
    latent, latent_error = refit_without_bias(latent_down, moment, factor)
    rope_key, rope_error = refit_without_bias(rope_key_rows, moment, factor)
    return query, latent, rope_key, {"query": query_error, "latent": latent_error, "rope_key": rope_error}
