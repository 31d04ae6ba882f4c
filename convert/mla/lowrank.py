"""The joint latent of MLA: one rank-R map x -> c from which every head's no-RoPE key and value are read.

Given the stacked rows M = [K_nope; V] (all KV heads), choose an R-dim subspace of the outputs and project onto
it: up = U_R, down = U_Rᵀ M. `weight` takes U_R from the SVD of M itself (MHA2MLA's joint SVD); `activation`
takes it from the output covariance M S Mᵀ under the calibration second moment S, which minimizes the actual
K/V output error on calibration tokens (whitened SVD, as in CARE/TransMLA).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvshrink.convert.errors import KvshrinkError

FACTORIZATIONS = ("weight", "activation")


@dataclass
class JointLatent:
    down: torch.Tensor  # [R, n] rows computing the latent from x̃
    up: torch.Tensor  # [rows, R] every head's K_nope and V rows from the latent


def joint_latent(targets: torch.Tensor, rank: int, factorization: str, moment: torch.Tensor) -> JointLatent:
    """Best rank-`rank` factorization of `targets` [rows, n] under `factorization` ('weight' or 'activation')."""
    if factorization == "activation":
        covariance = targets @ moment @ targets.T
    elif factorization == "weight":
        covariance = targets @ targets.T
    else:
        raise KvshrinkError(f"unknown factorization {factorization!r}: choose one of {', '.join(FACTORIZATIONS)}")
    _, vectors = torch.linalg.eigh((covariance + covariance.T) / 2)
    basis = vectors[:, -rank:].flip(1) if rank <= vectors.shape[1] else vectors.flip(1)
    return JointLatent(down=basis.T @ targets, up=basis)
