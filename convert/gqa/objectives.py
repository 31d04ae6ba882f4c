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
from kvshrink.convert.gqa.heads import head_bias, head_chunks, head_rows, output_columns, per_head
from kvshrink.convert.maths import augmented, rotary_halves


def _source_query_order(merge: KvMerge, queries_per_kv_head: int) -> torch.Tensor:
    """Source query head behind each query head of the merged layer (a regrouping moves query heads)."""
    r = queries_per_kv_head
    return torch.tensor([h * r + t for members in merge.groups for h in members for t in range(r)])


def _pair_products(left_times_moment: torch.Tensor, right: torch.Tensor, head_dim: int) -> torch.Tensor:
    """conj(l) Σ rᵀ for every rotary pair l = l' + i l'' (rows j and j + d/2 of a head), from real rotate-half rows:
    l·Σ [heads·d, c] and r [heads·d, c] -> [heads, d/2] complex. Σ is applied once per row set, in real arithmetic."""
    real_left, imag_left = rotary_halves(left_times_moment, head_dim)
    real_right, imag_right = rotary_halves(right, head_dim)
    return torch.complex(
        (real_left * real_right).sum(-1) + (imag_left * imag_right).sum(-1),
        (real_left * imag_right).sum(-1) - (imag_left * real_right).sum(-1),
    )


def merge_errors(
    source: AttentionWeights, merge: KvMerge, moment: torch.Tensor, query_moments: torch.Tensor | None = None
) -> dict[str, float]:
    """Relative logit and value-output errors of `merge` against `source` under the input moment Σ.

    With `query_moments` [H, c, c] (per source query head, see `attended`), values are weighed by what each
    head's attention averages instead of by single tokens."""
    error, source_values = value_error_terms(source, merge, moment, query_moments)
    return {"logit_rel_error": _logit_error(source, merge, moment), "value_rel_error": max(error, 0.0) / source_values}


def _logit_error(source: AttentionWeights, merge: KvMerge, moment: torch.Tensor) -> float:
    merged, d = merge.attention, source.head_dim
    order = _source_query_order(merge, source.queries_per_kv_head)
    source_kv = order // source.queries_per_kv_head
    merged_kv = torch.arange(source.num_heads) // merged.queries_per_kv_head
    k_src, k_new = augmented(source.k, source.k_bias), augmented(merged.k, merged.k_bias)
    k_new_m = k_new @ moment
    key_source = _pair_products(k_src @ moment, k_src, d).real  # [KV, J]
    key_merged = _pair_products(k_new_m, k_new, d).real  # [G, J]
    error = energy = 0.0
    for heads in head_chunks(source.num_heads):
        q_src = augmented(head_rows(source.q, order[heads], d), head_bias(source.q_bias, order[heads], d))
        q_new = augmented(head_rows(merged.q, heads, d), head_bias(merged.q_bias, heads, d))
        q_src_m = q_src @ moment
        source_energy = _pair_products(q_src_m, q_src, d).real * key_source[source_kv[heads]]
        merged_energy = _pair_products(q_new @ moment, q_new, d).real * key_merged[merged_kv[heads]]
        key_cross = _pair_products(head_rows(k_new_m, merged_kv[heads], d), head_rows(k_src, source_kv[heads], d), d)
        cross = (_pair_products(q_src_m, q_new, d) * key_cross).real
        error += float((source_energy + merged_energy - 2 * cross).sum())
        energy += float(source_energy.sum())
    return max(error, 0.0) / energy


def value_error_terms(
    source: AttentionWeights, merge: KvMerge, moment: torch.Tensor, query_moments: torch.Tensor | None = None
) -> tuple[float, float]:
    """(E‖O_i v − O'_i v'‖², E‖O_i v‖²) summed over query heads: the value-output error and its scale, so
    errors of separately merged groups add up."""
    merged, d = merge.attention, source.head_dim
    order = _source_query_order(merge, source.queries_per_kv_head)
    source_kv = order // source.queries_per_kv_head
    merged_kv = torch.arange(source.num_heads) // merged.queries_per_kv_head
    v_src = per_head(augmented(source.v, source.v_bias), d)  # [KV, d, c]
    v_new = per_head(augmented(merged.v, merged.v_bias), d)  # [G, d, c]
    v_src_m, v_new_m = (v_src @ moment, v_new @ moment) if query_moments is None else (None, None)
    error = energy = 0.0
    for heads in head_chunks(source.num_heads):
        values = torch.cat([v_src[source_kv[heads]], v_new[merged_kv[heads]]], dim=1)  # [h, 2d, c]
        if query_moments is None:  # one Σ for every head: applied once per KV head's rows, above
            covariance = torch.cat([v_src_m[source_kv[heads]], v_new_m[merged_kv[heads]]], dim=1) @ values.mT
        else:
            covariance = values @ query_moments[order[heads]] @ values.mT
        chunk_error, chunk_energy = output_error(output_columns(source.o, order[heads], d),
                                                 output_columns(merged.o, heads, d), covariance)
        error, energy = error + chunk_error, energy + chunk_energy
    return error, energy


def output_error(o_source: torch.Tensor, o_merged: torch.Tensor, covariance: torch.Tensor) -> tuple[float, float]:
    """(Σ_h E‖O_h v − O'_h v'‖², Σ_h E‖O_h v‖²) for o_proj columns [h, hidden, d] and the second moment of the
    stacked values [v; v'] per head [h, 2d, 2d]."""
    d = o_source.shape[-1]
    outputs = torch.cat([o_source, -o_merged], dim=2)  # [h, hidden, 2d]
    error = torch.einsum("hab,hba->", outputs.mT @ outputs, covariance)
    energy = torch.einsum("hab,hba->", o_source.mT @ o_source, covariance[:, :d, :d])
    return float(error), float(energy)
