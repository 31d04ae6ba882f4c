"""The joint latent of MLA: one rank-R map x -> c from which every head's no-RoPE key and value are read.

Given the stacked rows M = [K_nope; V] (all KV heads), choose an R-dim subspace of the outputs and project onto
it: up = U_R, down = U_Rᵀ M. `weight` takes U_R from the SVD of M itself (MHA2MLA's joint SVD); `activation`
takes it from the output covariance M S Mᵀ under the calibration second moment S, which minimizes the actual
K/V output error on calibration tokens (whitened SVD, as in CARE). `balanced` first scales the key rows so that
keys and values carry equal energy on the calibration tokens (TransMLA's K/V balancing): a source's keys can hold
hundreds of times the values' energy, and an unbalanced SVD then spends nearly all its rank on keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvshrink.convert.errors import KvshrinkError

FACTORIZATIONS = ("weight", "activation", "balanced", "output")


@dataclass
class JointLatent:
    down: torch.Tensor  # [R, n] rows computing the latent from x̃
    up: torch.Tensor  # [rows, R] every head's K_nope and V rows from the latent


def joint_latent(
    targets: torch.Tensor,
    rank: int,
    factorization: str,
    factor: torch.Tensor,
    output_metric: torch.Tensor | None = None,
    key_rows: torch.Tensor | None = None,
) -> JointLatent:
    """Best rank-`rank` factorization of `targets` [rows, n] under `factorization`; `factor` is F with F Fᵀ the
    calibration second moment (maths.moment_factor, computed once per layer by the caller).

    'output' also weighs each output row by how much the model reads it (`output_metric` [rows, rows], positive
    definite): for keys the queries' second moment, for values o_proj's Gram matrix, so the latent spends its
    rank on the directions that change attention logits and the layer output, not on raw K/V energy.
    'balanced' needs `key_rows` (a boolean mask of the rows that are keys).
    """
    if factorization == "balanced":
        weighted = targets @ factor  # row r: r·F, with ‖r·F‖² = E|r·x̃|², its energy
        energy = weighted.pow(2).sum(dim=1)
        key_energy, value_energy = energy[key_rows].sum(), energy[~key_rows].sum()
        if key_energy <= 0 or value_energy <= 0:  # nothing to balance (no keys in the latent, or silent ones)
            return _projection(targets, _top_left_subspace(weighted, rank))
        scale = torch.where(key_rows, (value_energy / key_energy).sqrt(), 1.0).to(targets.dtype)[:, None]
        basis = _top_left_subspace(weighted.mul_(scale), rank)  # of the rescaled rows: a diagonal metric
        del weighted
        return JointLatent(down=(scale * basis).T @ targets, up=basis / scale)
    if factorization == "output":
        values, vectors = torch.linalg.eigh(output_metric)
        values = values.clamp_min(values.max() * 1e-8)
        root, inverse_root = (vectors * values.sqrt()) @ vectors.T, (vectors / values.sqrt()) @ vectors.T
        whitened = joint_latent(root @ targets, rank, "activation", factor)
        return JointLatent(down=whitened.down, up=inverse_root @ whitened.up)
    if factorization == "activation":
        weighted = targets @ factor  # (T F)(T F)ᵀ = T·moment·Tᵀ, the output covariance
    elif factorization == "weight":
        weighted = targets
    else:
        raise KvshrinkError(f"unknown factorization {factorization!r}: choose one of {', '.join(FACTORIZATIONS)}")
    return _projection(targets, _top_left_subspace(weighted, rank))


def _projection(targets: torch.Tensor, basis: torch.Tensor) -> JointLatent:
    return JointLatent(down=basis.T @ targets, up=basis)


def _top_left_subspace(weighted: torch.Tensor, rank: int) -> torch.Tensor:
    """Orthonormal columns [rows, rank] spanning the top-`rank` left singular vectors of `weighted` [rows, n],
    from the eigenvectors of the smaller Gram matrix. An SVD of a 7B-width MHA layer's [8192, 4097] rows holds
    U, Vᵀ and its workspace at once (over a GB in float64, and slower); the [4097, 4097] Gram holds a fraction."""
    rows, cols = weighted.shape
    if rows <= cols:
        return torch.linalg.eigh(weighted @ weighted.T).eigenvectors[:, -rank:].flip(-1)
    right = torch.linalg.eigh(weighted.T @ weighted).eigenvectors[:, -rank:].flip(-1)
    # W·v_i = s_i·u_i: QR normalizes the columns, and keeps them orthonormal where a singular value vanishes.
    return torch.linalg.qr(weighted @ right).Q
