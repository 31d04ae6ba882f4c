"""Alignment before merging (Procrustes, after arXiv 2412.20677): rotate each head onto its group, then average.

Heads are regrouped by similarity (exact permutation). Within a group, every head gets orthogonal
transformations that leave the layer's outputs unchanged and bring it close to the group's other heads on the
calibration inputs; then K and V are mean-pooled as in the GQA paper.
- Keys: a 2×2 rotation within each RoPE frequency plane (a unit complex phase per rotary pair), absorbed into
  the head's query rows. Such a rotation commutes with RoPE, so logits are unchanged at every position.
- Values: a full d×d rotation, absorbed into the o_proj columns of the head's query heads.
Rotations are found by generalized Procrustes against the group mean (in the norm of the input moment Σ).
With per-head norms (q_norm/k_norm) only the values are aligned: a rotation of query pairs does not commute
with the norm's per-dimension weights.
"""

from __future__ import annotations

import torch

from kvshrink.convert.attention import AttentionWeights
from kvshrink.convert.calibration import AttentionInputs
from kvshrink.convert.gqa import KvMerge
from kvshrink.convert.gqa.grouping import regroup_similar_heads
from kvshrink.convert.gqa.heads import per_head, rotate_keys, rotate_values
from kvshrink.convert.gqa.mean import merge as mean_merge
from kvshrink.convert.gqa.objectives import merge_errors
from kvshrink.convert.maths import augmented, to_complex

NEEDS_CALIBRATION = True
FOLDS_KEY_GAINS = True
_PROCRUSTES_ROUNDS = 5


def _key_phases(attention: AttentionWeights, groups: int, moment: torch.Tensor) -> torch.Tensor:
    """Unit complex phases [KV, J] such that k̃_hj / phase aligns every head's pair j with its group's mean."""
    keys = to_complex(augmented(attention.k, attention.k_bias), attention.head_dim)
    grouped = keys.reshape(groups, -1, *keys.shape[1:])  # [G, n, J, c]
    sigma = moment.to(torch.complex128)
    phases = torch.ones(grouped.shape[:3], dtype=torch.complex128)
    for _ in range(_PROCRUSTES_ROUNDS):
        reference = (grouped / phases[..., None]).mean(dim=1)  # [G, J, c]
        overlap = torch.einsum("gajc,cd,gjd->gaj", grouped, sigma, reference.conj())
        phases = torch.where(overlap.abs() > 0, overlap / overlap.abs().clamp_min(1e-300), torch.ones_like(overlap))
    return phases.reshape(attention.num_kv_heads, -1)


def _value_rotations(attention: AttentionWeights, groups: int, moment: torch.Tensor) -> torch.Tensor:
    """Orthogonal [KV, d, d] rotations R_h such that R_h v_h aligns every head with its group's mean."""
    values = per_head(augmented(attention.v, attention.v_bias), attention.head_dim)
    grouped = values.reshape(groups, -1, *values.shape[1:])  # [G, n, d, c]
    rotations = torch.eye(attention.head_dim, dtype=torch.float64).expand(*grouped.shape[:2], -1, -1)
    for _ in range(_PROCRUSTES_ROUNDS):
        reference = (rotations @ grouped).mean(dim=1, keepdim=True)  # [G, 1, d, c]
        left, _, right = torch.linalg.svd(reference @ moment @ grouped.mT)
        rotations = left @ right
    return rotations.reshape(attention.num_kv_heads, attention.head_dim, attention.head_dim)


def merge(attention: AttentionWeights, groups: int, stats: AttentionInputs | None) -> KvMerge:
    """Regroup by similarity, rotate each head onto its group (exactly), then mean-pool each group's K and V."""
    aligned, head_groups, moment = regroup_similar_heads(attention, groups, stats, "Procrustes alignment")
    aligned = rotate_values(aligned, _value_rotations(aligned, groups, moment))
    if aligned.q_norm is None and aligned.k_norm is None:
        aligned = rotate_keys(aligned, _key_phases(aligned, groups, moment))
        key_alignment = "2x2 rotation per rotary pair, folded into queries"
    else:
        key_alignment = "none (per-head q/k norms: rotating query pairs would not be exact)"
    result = KvMerge(mean_merge(aligned, groups).attention, head_groups, {"key_alignment": key_alignment})
    result.details.update(merge_errors(attention, result, moment))
    return result
