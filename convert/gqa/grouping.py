"""Which KV heads should share a group: the partition whose heads merge with the least loss on calibration data.

The loss of merging a set of heads is the residual of the best merge of those heads (what `output_aware`
reaches): for keys, per rotary pair, the query-weighted key energy outside the best shared complex key; for
values, the o_proj-weighted value energy outside the best shared d-dimensional value. Both come from small
eigenproblems on Gram matrices computed once per layer, relative to the layer's totals.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch

from kvshrink.convert.attention import AttentionWeights
from kvshrink.convert.calibration import AttentionInputs
from kvshrink.convert.errors import KvshrinkError
from kvshrink.convert.gqa.heads import (
    consecutive_groups, head_bias, head_chunks, head_rows, output_columns, per_head, permute_kv_heads,
)
from kvshrink.convert.maths import augmented, input_moment, rows_pair_covariance

# Partitions beyond this count are searched by pairwise swaps from the stock grouping instead of exhaustively.
_EXHAUSTIVE_LIMIT = 2000
_SWAP_SWEEPS = 3


def query_weights(attention: AttentionWeights, moment: torch.Tensor) -> torch.Tensor:
    """E|q̃_ij|² summed over the query heads of each KV head: [KV, d/2], the weight of each key pair's error.
    Real rows (pair j = rows j and j + d/2), a few heads at a time."""
    d = attention.head_dim
    energies = []
    for heads in head_chunks(attention.num_heads):
        rows = augmented(head_rows(attention.q, heads, d), head_bias(attention.q_bias, heads, d))
        energies.append(((rows @ moment) * rows).sum(dim=-1).reshape(len(heads), 2, -1).sum(dim=1))
    return torch.cat(energies).reshape(attention.num_kv_heads, attention.queries_per_kv_head, -1).sum(dim=1)


def output_metrics(attention: AttentionWeights) -> torch.Tensor:
    """Σ_i O_iᵀ O_i over the query heads i of each KV head: [KV, d, d], how o_proj weighs each value direction."""
    metrics = []
    for heads in head_chunks(attention.num_heads):
        outputs = output_columns(attention.o, heads, attention.head_dim)
        metrics.append(outputs.mT @ outputs)
    metrics = torch.cat(metrics)
    return metrics.reshape(attention.num_kv_heads, attention.queries_per_kv_head, *metrics.shape[1:]).sum(dim=1)


def _merge_cost(attention: AttentionWeights, moment: torch.Tensor) -> Callable[[tuple[int, ...]], float]:
    d = attention.head_dim
    roots = query_weights(attention, moment).sqrt().T  # [J, KV]
    covariance = rows_pair_covariance(augmented(attention.k, attention.k_bias), moment, attention.num_kv_heads, d)
    key_gram = roots[:, :, None] * covariance * roots[:, None, :]  # [J, KV, KV], query-weighted
    metric_roots = _symmetric_sqrt(output_metrics(attention))
    values = metric_roots @ per_head(augmented(attention.v, attention.v_bias), d)  # [KV, d, c]
    value_gram = torch.einsum("adc,ce,bfe->adbf", values, moment, values)  # [KV, d, KV, d]
    key_total = float(torch.diagonal(key_gram, dim1=1, dim2=2).real.sum())
    value_total = float(torch.einsum("adad->", value_gram))

    def cost(members: tuple[int, ...]) -> float:
        index = torch.tensor(members)
        keys_of_group = key_gram[:, index][:, :, index]
        key_residual = (
            torch.diagonal(keys_of_group, dim1=1, dim2=2).real.sum() - torch.linalg.eigvalsh(keys_of_group)[:, -1].sum()
        )
        values_of_group = value_gram[index][:, :, index].reshape(len(members) * d, len(members) * d)
        eigenvalues = torch.linalg.eigvalsh(values_of_group)
        value_residual = eigenvalues[:-d].clamp_min(0).sum()
        return float(key_residual) / max(key_total, 1e-30) + float(value_residual) / max(value_total, 1e-30)

    return cost


def _symmetric_sqrt(matrices: torch.Tensor) -> torch.Tensor:
    eigenvalues, vectors = torch.linalg.eigh(matrices)
    return vectors @ torch.diag_embed(eigenvalues.clamp_min(0).sqrt()) @ vectors.mT


def _partitions(heads: list[int], size: int):
    """Every split of `heads` into groups of `size` (groups unordered, each group listed in ascending order)."""
    if not heads:
        yield []
        return
    first, rest = heads[0], heads[1:]
    for others in itertools.combinations(rest, size - 1):
        remaining = [h for h in rest if h not in others]
        for tail in _partitions(remaining, size):
            yield [(first, *others), *tail]


def _partition_count(heads: int, size: int) -> int:
    groups = heads // size
    return math.factorial(heads) // (math.factorial(size) ** groups * math.factorial(groups))


def similar_groups(attention: AttentionWeights, groups: int, moment: torch.Tensor) -> list[list[int]]:
    """The partition of the KV heads into `groups` equal groups with the least total merge loss."""
    heads, size = attention.num_kv_heads, attention.num_kv_heads // groups
    if groups in (1, heads):
        return consecutive_groups(heads, groups)
    cost = _cached(_merge_cost(attention, moment))
    if _partition_count(heads, size) <= _EXHAUSTIVE_LIMIT:
        best = min(_partitions(list(range(heads)), size), key=lambda p: sum(cost(g) for g in p))
        return [list(g) for g in best]
    partition = [tuple(g) for g in consecutive_groups(heads, groups)]
    for _ in range(_SWAP_SWEEPS):
        improved = False
        for a, b in itertools.combinations(range(groups), 2):
            for x, y in itertools.product(range(size), range(size)):
                left, right = list(partition[a]), list(partition[b])
                left[x], right[y] = right[y], left[x]
                swapped = tuple(sorted(left)), tuple(sorted(right))
                if cost(swapped[0]) + cost(swapped[1]) < cost(partition[a]) + cost(partition[b]) - 1e-12:
                    partition[a], partition[b] = swapped
                    improved = True
        if not improved:
            break
    return sorted(list(g) for g in partition)


def regroup_similar_heads(
    attention: AttentionWeights, groups: int, stats: AttentionInputs | None, method: str
) -> tuple[AttentionWeights, list[list[int]], torch.Tensor]:
    """(layer with each group's KV heads made consecutive, the groups of source heads, input moment): the first
    step of the calibrated methods. `method` names the caller in the error raised when `stats` is missing."""
    if stats is None:
        raise KvshrinkError(
            f"{method} needs calibration inputs: pass what Calibration.attention_inputs gives for the layer"
        )
    moment = input_moment(stats.flat_inputs)
    head_groups = similar_groups(attention, groups, moment)
    return permute_kv_heads(attention, [h for members in head_groups for h in members]), head_groups, moment


def _cached(function: Callable[[tuple[int, ...]], float]) -> Callable[[tuple[int, ...]], float]:
    values: dict[tuple[int, ...], float] = {}

    def cached(members: tuple[int, ...]) -> float:
        key = tuple(sorted(members))
        if key not in values:
            values[key] = function(key)
        return values[key]

    return cached
