"""Grouping by similarity, then mean-pooling: the GQA paper's merge applied to heads chosen to belong together.

Which KV heads share a group is chosen from calibration statistics (the partition with the least merge loss,
see `grouping`); query heads (q_proj rows, q biases) and o_proj columns are permuted so the stock pairing
i // (H / groups) holds. The permutation is exact; only the averaging loses.
"""

from __future__ import annotations

from kvshrink.convert.attention import AttentionWeights
from kvshrink.convert.calibration import AttentionInputs
from kvshrink.convert.gqa import KvMerge
from kvshrink.convert.gqa.grouping import regroup_similar_heads
from kvshrink.convert.gqa.mean import merge as mean_merge
from kvshrink.convert.gqa.objectives import merge_errors

NEEDS_CALIBRATION = True
FOLDS_KEY_GAINS = False


def merge(attention: AttentionWeights, groups: int, stats: AttentionInputs | None) -> KvMerge:
    """Mean-pool the KV heads of each group of similar heads found on the calibration inputs in `stats`."""
    permuted, head_groups, moment = regroup_similar_heads(attention, groups, stats, "grouping by similarity")
    result = KvMerge(mean_merge(permuted, groups).attention, head_groups)
    result.details.update(merge_errors(attention, result, moment))
    return result
