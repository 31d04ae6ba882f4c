"""KV-head merging methods for MHA/GQA -> GQA/MQA. Each method is one module with one public function:

    merge(attention: AttentionWeights, groups: int, stats: AttentionInputs | None) -> KvMerge

and flags NEEDS_CALIBRATION (whether `stats`, the layer's calibration inputs, must be given) and
FOLDS_KEY_GAINS (whether it moves per-rotary-pair gains from keys into queries, which is exact only when RoPE
rotates every pair (j, j + d/2) of the head).
The output must keep the stock pairing: query head i attends with KV head i // (H / groups).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType

import torch

from kvshrink.convert.attention import AttentionWeights


@dataclass
class KvMerge:
    """A merged layer plus what the report says about it."""

    attention: AttentionWeights
    groups: list[list[int]]  # source KV heads merged into each new KV head
    details: dict = field(default_factory=dict)


def expand_to_source_heads(
    merged: torch.Tensor, groups: list[list[int]], head_dim: int, source_heads: int
) -> torch.Tensor:
    """Each source KV head's rows replaced by the rows of the merged head that now serves it."""
    expanded = torch.empty(source_heads * head_dim, *merged.shape[1:], dtype=merged.dtype)
    for new_head, members in enumerate(groups):
        for head in members:
            expanded[head * head_dim : (head + 1) * head_dim] = merged[new_head * head_dim : (new_head + 1) * head_dim]
    return expanded


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float((approx - exact).norm() / exact.norm().clamp_min(1e-30))


def projection_errors(source: AttentionWeights, merge: KvMerge) -> dict[str, float]:
    """Relative Frobenius error of the K and V projections each query now sees, vs the source's."""
    d, heads = source.head_dim, source.num_kv_heads
    return {
        "k_rel_error": relative_error(expand_to_source_heads(merge.attention.k, merge.groups, d, heads), source.k),
        "v_rel_error": relative_error(expand_to_source_heads(merge.attention.v, merge.groups, d, heads), source.v),
    }


def method_names() -> list[str]:
    return sorted(_methods())


def get_method(name: str) -> Callable[..., KvMerge]:
    methods = _methods()
    if name not in methods:
        from kvshrink.convert.errors import KvshrinkError

        raise KvshrinkError(f"unknown GQA method {name!r}: choose one of {', '.join(sorted(methods))}")
    return methods[name]


def needs_calibration(name: str) -> bool:
    """Whether the method reads calibration statistics (so the source must run on calibration text first)."""
    get_method(name)
    return _modules()[name].NEEDS_CALIBRATION


def folds_key_gains(name: str) -> bool:
    """Whether the method relies on RoPE covering the whole head (it folds key-pair gains into the queries)."""
    get_method(name)
    return _modules()[name].FOLDS_KEY_GAINS


# The best measured on SmolLM2 held-out perplexity at MQA (see README, "GQA/MQA methods").
DEFAULT_METHOD = "output-aware"


def _modules() -> dict[str, ModuleType]:
    from kvshrink.convert.gqa import aligned, grouped, mean, output_aware

    return {"mean": mean, "grouped": grouped, "aligned": aligned, "output-aware": output_aware}


def _methods() -> dict[str, Callable[..., KvMerge]]:
    return {name: module.merge for name, module in _modules().items()}
