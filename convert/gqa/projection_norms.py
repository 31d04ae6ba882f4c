"""KV-head merging under q/k RMSNorms that span the whole projection (OLMo-2: q_norm over H*d, k_norm over KV*d).

Such a norm divides every key by the RMS over all KV heads, so merging heads changes its width and scale: only
equal heads within each group (and identity groups) keep it exact. The merge methods see unit per-head norms in
its place, so they treat the key path as nonlinear (no gains folded into the queries). Afterwards the query norm
follows the queries' head order, and each merged key head's norm weight is refitted per dimension by least
squares so the merged normalized key best matches its members' normalized keys on the calibration inputs
(without calibration: the members' mean weight). The report gives the normalized keys' relative error.
"""

from __future__ import annotations

import torch

from kvshrink.convert.attention import AttentionWeights
from kvshrink.convert.calibration import AttentionInputs
from kvshrink.convert.gqa import KvMerge
from kvshrink.convert.maths import augmented, rms_normalized

# Calibration tokens the refit reads: plenty for one weight per key dimension.
_FIT_TOKENS = 8192


def per_head_stand_in(attention: AttentionWeights) -> AttentionWeights:
    """The layer as the merge methods see it: unit per-head norms in place of the projection-wide ones."""
    unit = torch.ones(attention.head_dim)
    return attention.with_kv(q_norm=unit, k_norm=unit, norm_offset=0.0)


def _normalized(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Keys divided by their RMS over the whole projection (before the per-dimension weight), float64."""
    return rms_normalized(x @ augmented(weight, bias).T, eps)


def _by_group(per_head: torch.Tensor, groups: list[list[int]]) -> torch.Tensor:
    """[..., KV, d] -> [..., G, d]: the mean over each group's member heads."""
    return torch.stack([per_head[..., members, :].mean(dim=-2) for members in groups], dim=-2)


def restore_projection_norms(
    source: AttentionWeights, merge: KvMerge, stats: AttentionInputs | None, eps: float
) -> KvMerge:
    """`merge` (made on per_head_stand_in(source)) with the source's projection-wide q_norm/k_norm carried over."""
    d, r = source.head_dim, source.queries_per_kv_head
    query_order = torch.tensor([h * r + t for members in merge.groups for h in members for t in range(r)])
    q_norm = source.q_norm.reshape(source.num_heads, d)[query_order].reshape(-1)
    source_gain = (source.norm_offset + source.k_norm).double().reshape(source.num_kv_heads, d)
    mean_gain = _by_group(source_gain, merge.groups)
    details: dict = {"k_norm": "members' mean weight (no calibration inputs)"}
    gain = mean_gain
    if stats is not None:
        flat = stats.flat_inputs
        x = flat[torch.linspace(0, flat.shape[0] - 1, min(_FIT_TOKENS, flat.shape[0])).long()].double()
        x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
        keys = (_normalized(x, source.k, source.k_bias, eps).reshape(len(x), -1, d) * source_gain)
        unit = _normalized(x, merge.attention.k, merge.attention.k_bias, eps).reshape(len(x), -1, d)
        wanted = _by_group(keys, merge.groups)
        gain = (unit * wanted).sum(dim=0) / unit.pow(2).sum(dim=0).clamp_min(1e-30)
        expand = torch.tensor([g for g, members in enumerate(merge.groups) for _ in members])
        order = torch.tensor([h for members in merge.groups for h in members])

        def error(candidate: torch.Tensor) -> float:
            approx = (unit * candidate)[:, expand]
            return float((approx - keys[:, order]).norm() / keys.norm().clamp_min(1e-30))

        details = {"k_norm": "refitted per dimension on calibration inputs",
                   "normalized_key_rel_error": error(gain), "mean_weight_key_rel_error": error(mean_gain)}
    k_norm = (gain - source.norm_offset).reshape(-1).float()
    attention = merge.attention.with_kv(q_norm=q_norm, k_norm=k_norm, norm_offset=source.norm_offset)
    return KvMerge(attention, merge.groups, {**merge.details, **details})
