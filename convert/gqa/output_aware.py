"""Output-aware merge: the shared K and V that best preserve what the layer computes, in closed form.

Heads are first regrouped by similarity (exact permutation). Then, per group:

- Keys, per rotary pair j: one shared complex key row s_j and a complex gain c_hj per source head, folded into
  that head's query rows as conj(c_hj). A complex gain commutes with RoPE, so each head's logits are exact
  at every relative position whenever k̃_hj = c_hj s_j·x holds. s_j minimizes the logit error
  Σ_i ‖Σ^½ (q̃_ij k̃_hjᴴ − q̃'_ij s_jᴴ) Σ_k^½‖² over the group's queries: the top eigenvector of the
  query-energy-weighted key Gram matrix (a |group|×|group| Hermitian eigenproblem per pair). Σ_k weighs key
  tokens by the attention they receive in the source (see `attended`), or equals Σ without RoPE information.
- Values: the shared d-dimensional value map S minimizing Σ_i E‖O_i V_h z_i − O'_i S z_i‖² over the group's
  query heads — a rank-d reduced-rank regression, solved by an eigenproblem of size |group|·d — and the
  least-squares refit of every query head's o_proj columns. z_i is what head i's attention averages (its
  attention-weighted inputs, recomputed with the source's RoPE when the statistics carry it, see `attended`);
  without RoPE information single tokens stand in for it. On SmolLM2 the attended form cuts MQA held-out
  perplexity by about a quarter.

Σ is the second moment of the layer's calibration inputs (with a constant 1 for biases). Per-head norms
(q_norm/k_norm, Qwen3) make the key path nonlinear — a gain folded into the query rows would change the
norm — so such layers fall back to mean-pooled keys; values are still merged output-aware.
"""

from __future__ import annotations

import torch

from kvshrink.convert.attention import AttentionWeights
from kvshrink.convert.calibration import LayerStatistics
from kvshrink.convert.gqa import KvMerge
from kvshrink.convert.gqa.attended import RotaryLayerStatistics, attended_moments
from kvshrink.convert.gqa.grouping import output_metrics, query_weights, regroup_similar_heads
from kvshrink.convert.gqa.heads import (
    augmented, fold_key_gains, per_head, rotary_pairs, rows_from_pairs, split_augmented,
)  # fmt: skip
from kvshrink.convert.gqa.mean import merge as mean_merge
from kvshrink.convert.gqa.objectives import merge_errors, value_error_terms

NEEDS_CALIBRATION = True
FOLDS_KEY_GAINS = True


def _shared_keys(
    attention: AttentionWeights, groups: int, moment: torch.Tensor, key_moments: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared key pairs [groups, J, c] and per-source-head gains [KV, J] for consecutive groups of heads.

    Queries are weighed by the input moment, keys by `key_moments` [G, c, c] (one per group)."""
    keys = rotary_pairs(augmented(attention.k, attention.k_bias), attention.head_dim)
    size = attention.num_kv_heads // groups
    weights = query_weights(attention, moment).reshape(groups, size, -1)  # [G, n, J]
    grouped = keys.reshape(groups, size, *keys.shape[1:])  # [G, n, J, c]
    sigma = key_moments.to(torch.complex128)
    roots = weights.sqrt().to(torch.complex128)
    weighted = grouped * roots[..., None]
    gram = torch.einsum("ganc,gcd,gbnd->gnab", weighted, sigma, weighted.conj())  # [G, J, n, n]
    eigenvalues, vectors = torch.linalg.eigh(gram)
    top, vector = eigenvalues[..., -1].clamp_min(0), vectors[..., -1]  # [G, J], [G, J, n]
    coefficients = vector.conj() * roots.permute(0, 2, 1) / top.sqrt().clamp_min(1e-30)[..., None]
    shared = torch.einsum("gja,gajc->gjc", coefficients, grouped)
    gains = torch.einsum("gajc,gcd,gjd->gaj", grouped, sigma, shared.conj())
    # Keep the shared key at the heads' (query-weighted) scale: the softmax does not care, bf16 does.
    scale = ((weights * gains.abs() ** 2).sum(1) / weights.sum(1).clamp_min(1e-30)).sqrt()  # [G, J]
    usable = top > 1e-30 * eigenvalues.abs().amax(dim=-1).clamp_min(1e-300)
    scale = torch.where(usable, scale, torch.zeros_like(scale))
    shared = shared * scale[..., None]
    gains = torch.where(usable[:, None], gains / scale.clamp_min(1e-30)[:, None], torch.ones_like(gains))
    return shared, gains.reshape(attention.num_kv_heads, -1)


def _shared_values(
    attention: AttentionWeights, groups: int, moment: torch.Tensor, query_moments: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared value rows [groups * d, c] and the refit o_proj [hidden, H * d] for consecutive groups of heads.

    `query_moments` [H, c, c], when given, is what each query head's values are averaged over (see `attended`):
    the shared subspace then follows their mean over the group, and each head's o_proj is refit under its own.
    """
    d, size = attention.head_dim, attention.num_kv_heads // groups
    values = per_head(augmented(attention.v, attention.v_bias), d)  # [KV, d, c]
    eigenvalues, vectors = torch.linalg.eigh(output_metrics(attention))
    roots = vectors @ torch.diag_embed(eigenvalues.clamp_min(0).sqrt()) @ vectors.mT
    stacked = (roots @ values).reshape(groups, size * d, -1)  # Z: [G, n*d, c]
    group_of_query = torch.arange(attention.num_heads) // (attention.num_heads // groups)
    if query_moments is None:
        group_moments = moment.expand(groups, -1, -1)
    else:
        group_moments = torch.stack([query_moments[group_of_query == g].mean(dim=0) for g in range(groups)])
    energy, basis = torch.linalg.eigh(stacked @ group_moments @ stacked.mT)
    energy, basis = energy[:, -d:], basis[:, :, -d:]
    usable = energy > 1e-12 * energy.amax(dim=-1, keepdim=True).clamp_min(1e-300)
    inverse_roots = torch.where(usable, energy.clamp_min(1e-300).rsqrt(), torch.zeros_like(energy))
    shared = inverse_roots[..., None] * (basis.mT @ stacked)  # S: [G, d, c], orthonormal rows under the moment
    # Back to the source's value scale, so the new o_proj columns stay in range.
    value_scale = (torch.einsum("hdc,ce,hde->", values, moment, values) / (attention.num_kv_heads * d)).sqrt()
    shared = shared * value_scale
    outputs = attention.o.double().reshape(attention.o.shape[0], attention.num_heads, d).permute(1, 0, 2)
    source_value = values.repeat_interleave(attention.queries_per_kv_head, dim=0)  # [H, d, c]
    per_query = shared[group_of_query]  # [H, d, c]
    metric = moment.expand(attention.num_heads, -1, -1) if query_moments is None else query_moments
    gram = per_query @ metric @ per_query.mT  # [H, d, d]
    refit = outputs @ source_value @ metric @ per_query.mT @ torch.linalg.pinv(gram, hermitian=True)
    return shared.reshape(groups * d, -1), refit.permute(1, 0, 2).reshape(attention.o.shape[0], -1)


def _group(attention: AttentionWeights, group: int, size: int) -> AttentionWeights:
    """KV heads group·size … (group+1)·size − 1 with their query heads and o_proj columns: a layer of its own,
    since the merge of one group never reads another's weights."""
    d, ratio = attention.head_dim, attention.queries_per_kv_head
    kv = slice(group * size * d, (group + 1) * size * d)
    q = slice(group * size * ratio * d, (group + 1) * size * ratio * d)

    def take(tensor: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
        return None if tensor is None else tensor[rows]

    return attention.with_kv(
        q=attention.q[q], q_bias=take(attention.q_bias, q), k=attention.k[kv], k_bias=take(attention.k_bias, kv),
        v=attention.v[kv], v_bias=take(attention.v_bias, kv), o=attention.o[:, q], num_heads=size * ratio,
        num_kv_heads=size,
    )  # fmt: skip


def _merge_group(
    group: AttentionWeights, moment: torch.Tensor, stats: LayerStatistics
) -> tuple[AttentionWeights, str, tuple[float, float] | None]:
    """One group merged into one KV head; the key method used; the attended value error (error, source energy)
    when the statistics carry the source's RoPE. The attended moments are computed for this group's query heads
    only, so memory is one group's, not the layer's."""
    value_moments = key_moments = None
    if isinstance(stats, RotaryLayerStatistics):
        value_moments, key_moments = attended_moments(group, stats)
    if group.q_norm is None and group.k_norm is None:
        key_moment = moment[None] if key_moments is None else key_moments.mean(dim=0, keepdim=True)
        shared, gains = _shared_keys(group, 1, moment, key_moment)
        k, k_bias = split_augmented(rows_from_pairs(shared), group.k_bias is not None)
        q, q_bias = fold_key_gains(group, gains)
        key_merge = "rope-exact complex gains, query-weighted least squares"
    else:
        pooled = mean_merge(group, 1).attention
        k, k_bias, q, q_bias = pooled.k, pooled.k_bias, group.q, group.q_bias
        key_merge = "mean (per-head q/k norms: a gain folded into queries would not be exact)"
    values, o = _shared_values(group, 1, moment, value_moments)
    v, v_bias = split_augmented(values, group.v_bias is not None)
    merged = group.with_kv(q=q, q_bias=q_bias, k=k, k_bias=k_bias, v=v, v_bias=v_bias, o=o.float().contiguous(),
                           num_kv_heads=1)  # fmt: skip
    attended = None
    if value_moments is not None:
        attended = value_error_terms(group, KvMerge(merged, [list(range(group.num_kv_heads))]), moment, value_moments)
    return merged, key_merge, attended


def _concatenated(parts: list[AttentionWeights], template: AttentionWeights) -> AttentionWeights:
    def joined(name: str) -> torch.Tensor | None:
        tensors = [getattr(part, name) for part in parts]
        return None if tensors[0] is None else torch.cat(tensors)

    return template.with_kv(
        q=joined("q"), q_bias=joined("q_bias"), k=joined("k"), k_bias=joined("k_bias"), v=joined("v"),
        v_bias=joined("v_bias"), o=torch.cat([part.o for part in parts], dim=1), num_kv_heads=len(parts),
    )  # fmt: skip


def merge(attention: AttentionWeights, groups: int, stats: LayerStatistics | None) -> KvMerge:
    """Regroup the KV heads by similarity, then merge each group into the K and V that best keep its logits
    and o_proj output on the calibration inputs in `stats`, one group at a time."""
    permuted, head_groups, moment = regroup_similar_heads(attention, groups, stats, "the output-aware merge")
    size = attention.num_kv_heads // groups
    parts = [_merge_group(_group(permuted, g, size), moment, stats) for g in range(groups)]
    result = KvMerge(_concatenated([part[0] for part in parts], permuted), head_groups, {"key_merge": parts[0][1]})
    result.details.update(merge_errors(attention, result, moment))
    if parts[0][2] is not None:
        error, total = (sum(part[2][i] for part in parts) for i in (0, 1))
        result.details["attended_value_rel_error"] = max(error, 0.0) / total
    return result
