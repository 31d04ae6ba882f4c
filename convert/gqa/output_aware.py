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
  least-squares refit of every query head's o_proj columns (with 1% of the single-token error added, so value
  directions the calibration's attention never averages keep a bounded output). z_i is what head i's attention
  averages (its attention-weighted inputs, recomputed with the source's RoPE when the statistics carry it, see
  `attended`); without RoPE information single tokens stand in for it. On SmolLM2 the attended form cuts MQA
  held-out perplexity by about a quarter.

Σ is the second moment of the layer's calibration inputs (with a constant 1 for biases). Both solutions are linear
in the group's source rows, so every moment is read through those rows (`_GroupMoments`): a group's memory is its
[n·d]² moments per query head, whatever the model's width. Per-head norms
(q_norm/k_norm, Qwen3) make the key path nonlinear — a gain folded into the query rows would change the
norm — so such layers fall back to mean-pooled keys; values are still merged output-aware.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvshrink.convert.attention import AttentionWeights
from kvshrink.convert.calibration import AttentionInputs
from kvshrink.convert.gqa import KvMerge
from kvshrink.convert.gqa.attended import RotaryAttentionInputs, attended_moments
from kvshrink.convert.gqa.grouping import output_metrics, query_weights, regroup_similar_heads
from kvshrink.convert.gqa.heads import fold_key_gains, head_chunks, output_columns
from kvshrink.convert.gqa.mean import merge as mean_merge
from kvshrink.convert.gqa.objectives import merge_errors, output_error
from kvshrink.convert.maths import augmented, from_complex, pair_covariance, split_augmented, to_complex

NEEDS_CALIBRATION = True
FOLDS_KEY_GAINS = True
# share of the single-token value moment in each head's o_proj refit (_with_single_tokens). On SmolLM2 MQA 1%
# brought the worst layer's single-token output error from 1260 to 0.39 at the same attended error (0.082) and
# held-out pydoc perplexity from 66.34 to 66.02; 10% gave 66.01
SINGLE_TOKEN_SHARE = 0.01


@dataclass
class _GroupMoments:
    """The second moments a group's merge reads, seen through the group's own source rows (x̃ = [x; 1]): a merge
    only ever reads them there, so each is [n·d, n·d] for n KV heads however wide the model is."""

    values: torch.Tensor  # V Σ Vᵀ: the group's value rows under the input moment Σ
    attended_values: torch.Tensor | None  # V E[z_i z_iᵀ] Vᵀ per query head [H, n·d, n·d]; None without RoPE stats
    keys: torch.Tensor  # K Σ_k Kᵀ: keys weighted by the attention they receive (Σ without RoPE statistics)


def _group_moments(group: AttentionWeights, moment: torch.Tensor, stats: AttentionInputs) -> _GroupMoments:
    value_rows = augmented(group.v, group.v_bias)
    key_rows = augmented(group.k, group.k_bias)
    values = value_rows @ moment @ value_rows.T
    if not isinstance(stats, RotaryAttentionInputs):
        return _GroupMoments(values, None, key_rows @ moment @ key_rows.T)
    attended_values, attended_keys = attended_moments(group, stats, value_rows, key_rows)
    return _GroupMoments(values, attended_values, attended_keys)


def _shared_keys(
    attention: AttentionWeights, moment: torch.Tensor, key_moment: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One shared key pair row per rotary pair [J, c] and a gain per source head and pair [n, J] for one group.

    Queries are weighed by the input moment, keys by `key_moment` (the group's key rows' moment, [n·d, n·d])."""
    keys = to_complex(augmented(attention.k, attention.k_bias), attention.head_dim)  # [n, J, c]
    weights = query_weights(attention, moment).T  # [J, n]
    covariance = pair_covariance(key_moment, attention.num_kv_heads, attention.head_dim)  # [J, n, n]
    roots = weights.sqrt().to(torch.complex128)
    gram = roots[:, :, None] * covariance * roots[:, None, :]
    eigenvalues, vectors = torch.linalg.eigh(gram)
    top, vector = eigenvalues[:, -1].clamp_min(0), vectors[..., -1]  # [J], [J, n]
    coefficients = vector.conj() * roots / top.sqrt().clamp_min(1e-30)[:, None]  # shared_j = Σ_a c_ja k_aj
    shared = torch.einsum("ja,ajc->jc", coefficients, keys)
    gains = torch.einsum("jab,jb->aj", covariance, coefficients.conj())  # E[k_aj conj(shared_j)]
    # Keep the shared key at the heads' (query-weighted) scale: the softmax does not care, bf16 does.
    scale = ((weights.T * gains.abs() ** 2).sum(0) / weights.sum(1).clamp_min(1e-30)).sqrt()  # [J]
    usable = top > 1e-30 * eigenvalues.abs().amax(dim=-1).clamp_min(1e-300)
    scale = torch.where(usable, scale, torch.zeros_like(scale))
    gains = torch.where(usable, gains / scale.clamp_min(1e-30), torch.ones_like(gains))
    return shared * scale[:, None], gains


def _shared_values(attention: AttentionWeights, moments: _GroupMoments) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared value map as a combination A [d, n·d] of the group's source value rows, and the refit o_proj
    [hidden, H·d] of its query heads.

    The shared map is A·V, a combination of the group's source value rows V, so every moment is read as
    V M Vᵀ: with attended moments the shared subspace follows their mean over the group, and each query head's
    o_proj is refit under its own."""
    d, heads = attention.head_dim, attention.num_heads
    values = augmented(attention.v, attention.v_bias)  # [n·d, c]
    eigenvalues, vectors = torch.linalg.eigh(output_metrics(attention))
    roots = torch.block_diag(*(vectors @ torch.diag_embed(eigenvalues.clamp_min(0).sqrt()) @ vectors.mT))
    per_query = moments.values[None] if moments.attended_values is None else moments.attended_values
    energy, basis = torch.linalg.eigh(roots @ per_query.mean(dim=0) @ roots.T)
    energy, basis = energy[-d:], basis[:, -d:]
    usable = energy > 1e-12 * energy.max().clamp_min(1e-300)
    inverse_roots = torch.where(usable, energy.clamp_min(1e-300).rsqrt(), torch.zeros_like(energy))
    # Orthonormal rows under the moment, then back to the source's value scale so o_proj stays in range.
    value_scale = (moments.values.trace() / values.shape[0]).sqrt()
    combination = inverse_roots[:, None] * (basis.T @ roots) * value_scale  # A: [d, n·d]
    kv_of_query = torch.arange(heads) // attention.queries_per_kv_head
    per_query = _with_single_tokens(per_query.expand(heads, -1, -1), moments.values)
    gram = combination @ per_query @ combination.T  # [H, d, d]: E[(A V z)(A V z)ᵀ]
    source_rows = per_query.reshape(heads, -1, d, per_query.shape[-1])[torch.arange(heads), kv_of_query]
    cross = source_rows @ combination.T  # [H, d, d]: E[(V_h z)(A V z)ᵀ]
    solve = cross @ torch.linalg.pinv(gram, hermitian=True)  # [H, d, d]: each head's new columns from its old ones
    refit = torch.cat([(output_columns(attention.o, chunk, d) @ solve[chunk]).float() for chunk in head_chunks(heads)])
    return combination, refit.permute(1, 0, 2).reshape(attention.o.shape[0], -1)


def _with_single_tokens(attended: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Each query head's attended moment [H, n·d, n·d] plus SINGLE_TOKEN_SHARE of the single-token moment at the
    same trace: the o_proj refit then also bounds the output of value directions the calibration's attention
    averages (almost) never reach. A head that attends to the first token nearly always has a near rank-one
    moment, and the plain least-squares refit gave SmolLM2's layer 18 a single-token o_proj output error 1260
    times the source's output."""
    scale = attended.diagonal(dim1=-2, dim2=-1).sum(-1) / tokens.trace()
    return attended + SINGLE_TOKEN_SHARE * scale[:, None, None] * tokens


def _attended_value_error(
    group: AttentionWeights, merged: AttentionWeights, combination: torch.Tensor, attended: torch.Tensor
) -> tuple[float, float]:
    """(Σ_i E‖O_i V_h z_i − O'_i A V z_i‖², Σ_i E‖O_i V_h z_i‖²) over the group's query heads i, from the attended
    moments V E[z_i z_iᵀ] Vᵀ: the value error of the merge and its scale, so the groups' errors add up."""
    d, rows = group.head_dim, attended.shape[-1]
    error = source = 0.0
    for heads in head_chunks(group.num_heads):
        selection = torch.eye(rows, dtype=attended.dtype).reshape(-1, d, rows)[heads // group.queries_per_kv_head]
        both = torch.cat([selection, combination.expand(len(heads), -1, -1)], dim=1)  # [h, 2d, n·d]: V_h and A V
        chunk_error, chunk_source = output_error(output_columns(group.o, heads, d), output_columns(merged.o, heads, d),
                                                 both @ attended[heads] @ both.mT)
        error, source = error + chunk_error, source + chunk_source
    return error, source


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
    )


def _merge_group(
    group: AttentionWeights, moment: torch.Tensor, stats: AttentionInputs
) -> tuple[AttentionWeights, str, tuple[float, float] | None]:
    """One group merged into one KV head; the key method used; the attended value error (error, source energy)
    when the statistics carry the source's RoPE. The moments are this group's, seen through its own rows."""
    moments = _group_moments(group, moment, stats)
    if group.q_norm is None and group.k_norm is None:
        shared, gains = _shared_keys(group, moment, moments.keys)
        k, k_bias = split_augmented(from_complex(shared[None]), group.k_bias is not None)
        q, q_bias = fold_key_gains(group, gains)
        key_merge = "rope-exact complex gains, query-weighted least squares"
    else:
        pooled = mean_merge(group, 1).attention
        k, k_bias, q, q_bias = pooled.k, pooled.k_bias, group.q, group.q_bias
        key_merge = "mean (per-head q/k norms: a gain folded into queries would not be exact)"
    combination, o = _shared_values(group, moments)
    v, v_bias = split_augmented(combination @ augmented(group.v, group.v_bias), group.v_bias is not None)
    merged = group.with_kv(q=q, q_bias=q_bias, k=k, k_bias=k_bias, v=v, v_bias=v_bias, o=o.contiguous(),
                           num_kv_heads=1)
    attended = None
    if moments.attended_values is not None:
        attended = _attended_value_error(group, merged, combination, moments.attended_values)
    return merged, key_merge, attended


def _concatenated(parts: list[AttentionWeights], template: AttentionWeights) -> AttentionWeights:
    if len(parts) == 1:  # MQA: the one group is the layer
        return parts[0]

    def joined(name: str) -> torch.Tensor | None:
        tensors = [getattr(part, name) for part in parts]
        return None if tensors[0] is None else torch.cat(tensors)

    return template.with_kv(
        q=joined("q"), q_bias=joined("q_bias"), k=joined("k"), k_bias=joined("k_bias"), v=joined("v"),
        v_bias=joined("v_bias"), o=torch.cat([part.o for part in parts], dim=1), num_kv_heads=len(parts),
    )


def merge(attention: AttentionWeights, groups: int, stats: AttentionInputs | None) -> KvMerge:
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
