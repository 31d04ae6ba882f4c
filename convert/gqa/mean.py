"""Mean-pooling of consecutive KV heads: the GQA paper's initialization (arXiv 2305.13245), kept as the baseline."""

from __future__ import annotations

import torch

from kvshrink.convert.attention import AttentionWeights
from kvshrink.convert.calibration import AttentionInputs
from kvshrink.convert.gqa import KvMerge

NEEDS_CALIBRATION = False
FOLDS_KEY_GAINS = False


def _mean_heads(rows: torch.Tensor | None, source_heads: int, groups: int) -> torch.Tensor | None:
    if rows is None:
        return None
    per_head = rows.reshape(groups, source_heads // groups, -1, *rows.shape[1:])
    return per_head.mean(dim=1).reshape(-1, *rows.shape[1:])


def merge(attention: AttentionWeights, groups: int, stats: AttentionInputs | None = None) -> KvMerge:
    """Average the K/V projection rows (and biases) of each run of KV heads that will share one head."""
    heads = attention.num_kv_heads
    merged = attention.with_kv(
        k=_mean_heads(attention.k, heads, groups),
        v=_mean_heads(attention.v, heads, groups),
        k_bias=_mean_heads(attention.k_bias, heads, groups),
        v_bias=_mean_heads(attention.v_bias, heads, groups),
        num_kv_heads=groups,
    )
    per_group = heads // groups
    return KvMerge(merged, [list(range(g * per_group, (g + 1) * per_group)) for g in range(groups)])
