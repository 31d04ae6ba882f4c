"""What a KV merge loses, measured on calibration statistics: the objectives the calibrated methods minimize.

- logit_rel_error: for every query head and rotary pair, the bilinear form x_mᵀ (q̃ k̃ᴴ) x_n that gives that pair's
  share of the attention logit (RoPE only rotates it by e^{iθ(m−n)}), compared with the source's in the norm
  E|x_mᵀ E x_n|² = ‖Σ^½ E Σ^½‖² for independent tokens x_m, x_n with second moment Σ. Relative to the source's.
- value_rel_error: E‖O_i v(x) − O'_i v'(x)‖² summed over query heads i — each head's values as o_proj writes
  them into the residual stream — relative to the source's.
Both are exact functions of the weights and Σ = E[[x;1][x;1]ᵀ]; with per-head norms (q_norm/k_norm) the logit
error is taken before the norms, so it is only a guide there.
"""

from __future__ import annotations

import torch

from kvshrink.convert.attention import AttentionWeights
from kvshrink.convert.gqa import KvMerge
from kvshrink.convert.gqa.heads import augmented, per_head, rotary_pairs


def _source_query_order(merge: KvMerge, queries_per_kv_head: int) -> torch.Tensor:
    """Source query head behind each query head of the merged layer (a regrouping moves query heads)."""
    r = queries_per_kv_head
    return torch.tensor([h * r + t for members in merge.groups for h in members for t in range(r)])


def _quadratic(left: torch.Tensor, moment: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Row-wise conj(left) Σ rightᵀ for [..., cols] complex rows."""
    return torch.einsum("...c,cd,...d->...", left.conj(), moment, right)


def merge_errors(
    source: AttentionWeights, merge: KvMerge, moment: torch.Tensor, query_moments: torch.Tensor | None = None
) -> dict[str, float]:
    """Relative logit and value-output errors of `merge` against `source` under the input moment Σ.

    With `query_moments` [H, c, c] (per source query head, see `attended`), values are weighed by what each
    head's attention averages instead of by single tokens."""
    merged, d = merge.attention, source.head_dim
    order = _source_query_order(merge, source.queries_per_kv_head)
    new_kv_of_query = torch.arange(source.num_heads) // merged.queries_per_kv_head
    sigma = moment.to(torch.complex128)

    q_src = rotary_pairs(augmented(source.q, source.q_bias), d)[order]
    k_src = rotary_pairs(augmented(source.k, source.k_bias), d)[order // source.queries_per_kv_head]
    q_new = rotary_pairs(augmented(merged.q, merged.q_bias), d)
    k_new = rotary_pairs(augmented(merged.k, merged.k_bias), d)[new_kv_of_query]
    source_energy = _quadratic(q_src, sigma, q_src).real * _quadratic(k_src, sigma, k_src).real
    merged_energy = _quadratic(q_new, sigma, q_new).real * _quadratic(k_new, sigma, k_new).real
    cross = (_quadratic(q_src, sigma, q_new) * _quadratic(k_new, sigma, k_src)).real
    logit_error = (source_energy + merged_energy - 2 * cross).sum() / source_energy.sum()

    error, source_values = value_error_terms(source, merge, moment, query_moments)
    return {"logit_rel_error": float(logit_error.clamp_min(0)), "value_rel_error": max(error, 0.0) / source_values}


def value_error_terms(
    source: AttentionWeights, merge: KvMerge, moment: torch.Tensor, query_moments: torch.Tensor | None = None
) -> tuple[float, float]:
    """(E‖O_i v − O'_i v'‖², E‖O_i v‖²) summed over query heads: the value-output error and its scale, so
    errors of separately merged groups add up."""
    merged, d = merge.attention, source.head_dim
    order = _source_query_order(merge, source.queries_per_kv_head)
    new_kv_of_query = torch.arange(source.num_heads) // merged.queries_per_kv_head
    v_src = per_head(augmented(source.v, source.v_bias), d)[order // source.queries_per_kv_head]
    v_new = per_head(augmented(merged.v, merged.v_bias), d)[new_kv_of_query]
    o_src = source.o.double().reshape(source.o.shape[0], source.num_heads, d).permute(1, 0, 2)[order]
    o_new = merged.o.double().reshape(merged.o.shape[0], merged.num_heads, d).permute(1, 0, 2)
    outputs = torch.cat([o_src, -o_new], dim=2)  # [heads, hidden, 2d]
    values = torch.cat([v_src, v_new], dim=1)  # [heads, 2d, cols]
    metric = moment if query_moments is None else query_moments[order]
    error = torch.einsum("hab,hba->h", outputs.mT @ outputs, values @ metric @ values.mT).sum()
    source_values = torch.einsum("hab,hba->h", o_src.mT @ o_src, v_src @ metric @ v_src.mT).sum()
    return float(error), float(source_values)
