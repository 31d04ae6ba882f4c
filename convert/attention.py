"""One layer's attention as plain float32 matrices, independent of how a family names or fuses them."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from kvshrink.convert.checkpoint import SourceCheckpoint
from kvshrink.convert.families import FamilySpec


@dataclass(frozen=True)
class HeadCounts:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    num_layers: int

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> HeadCounts:
        heads = int(config["num_attention_heads"])
        return cls(
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or int(config["hidden_size"]) // heads),
            hidden_size=int(config["hidden_size"]),
            num_layers=int(config["num_hidden_layers"]),
        )


@dataclass(frozen=True)
class AttentionWeights:
    """Projections in the stock (nn.Linear) layout: q [H*d, hidden], k/v [KV*d, hidden], o [hidden, H*d].

    Query head i attends with KV head i // (H / KV), as every stock GQA class pairs them. Per-head norms
    (q_norm/k_norm, shape [d]) are shared by all heads; OLMo-2's span the whole projection ([H*d] and [KV*d]).
    A norm multiplies by (norm_offset + weight): 1.0 for Gemma's (1 + w) RMSNorm. RoPE is in rotate-half
    layout: pair j of a head is dimensions (j, j + d/2).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    num_heads: int
    num_kv_heads: int
    head_dim: int
    q_bias: torch.Tensor | None = None
    k_bias: torch.Tensor | None = None
    v_bias: torch.Tensor | None = None
    o_bias: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    norm_offset: float = 0.0

    @property
    def queries_per_kv_head(self) -> int:
        return self.num_heads // self.num_kv_heads

    def with_kv(self, **changes: Any) -> AttentionWeights:
        return replace(self, **changes)


def _maybe(checkpoint: SourceCheckpoint, name: str) -> torch.Tensor | None:
    return checkpoint.tensor(name).float() if name in checkpoint else None


@dataclass(frozen=True)
class AttentionBiases:
    """One layer's attention biases (None where the projection has none), read without the weight matrices."""

    q_bias: torch.Tensor | None
    k_bias: torch.Tensor | None
    v_bias: torch.Tensor | None
    o_bias: torch.Tensor | None


def _split_qkv_bias(bias: torch.Tensor | None, counts: HeadCounts) -> tuple[torch.Tensor | None, ...]:
    if bias is None:
        return None, None, None
    kv_rows = counts.num_kv_heads * counts.head_dim
    return tuple(bias.split([counts.num_heads * counts.head_dim, kv_rows, kv_rows]))


def read_biases(checkpoint: SourceCheckpoint, spec: FamilySpec, layer: int, counts: HeadCounts) -> AttentionBiases:
    """One layer's attention biases as float32, split from a fused qkv bias if the family has one."""
    if spec.fused_qkv:
        q, k, v = _split_qkv_bias(_maybe(checkpoint, spec.tensor_name(layer, "qkv_proj", "bias")), counts)
    else:
        q, k, v = (_maybe(checkpoint, spec.tensor_name(layer, part, "bias")) for part in ("q_proj", "k_proj", "v_proj"))
    return AttentionBiases(q, k, v, _maybe(checkpoint, spec.tensor_name(layer, "o_proj", "bias")))


def read_attention(checkpoint: SourceCheckpoint, spec: FamilySpec, layer: int, counts: HeadCounts) -> AttentionWeights:
    """Load one layer's attention tensors as float32, splitting a fused qkv projection if the family has one."""

    def weight_and_bias(part: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        return (
            checkpoint.tensor(spec.tensor_name(layer, part)).float(),
            _maybe(checkpoint, spec.tensor_name(layer, part, "bias")),
        )

    q_rows = counts.num_heads * counts.head_dim
    kv_rows = counts.num_kv_heads * counts.head_dim
    if spec.fused_qkv:
        qkv, qkv_bias = weight_and_bias("qkv_proj")
        q, k, v = qkv.split([q_rows, kv_rows, kv_rows])
        q_bias, k_bias, v_bias = _split_qkv_bias(qkv_bias, counts)
    else:
        (q, q_bias), (k, k_bias), (v, v_bias) = (weight_and_bias(p) for p in ("q_proj", "k_proj", "v_proj"))
    o, o_bias = weight_and_bias("o_proj")
    norms = {
        part: checkpoint.tensor(spec.tensor_name(layer, part)).float() if part in spec.attention else None
        for part in ("q_norm", "k_norm")
    }
    return AttentionWeights(
        q=q, k=k, v=v, o=o,
        num_heads=counts.num_heads, num_kv_heads=counts.num_kv_heads, head_dim=counts.head_dim,
        q_bias=q_bias, k_bias=k_bias, v_bias=v_bias, o_bias=o_bias, norm_offset=spec.norm_offset, **norms,
    )


def attention_tensors(attention: AttentionWeights, spec: FamilySpec, layer: int) -> dict[str, torch.Tensor]:
    """The checkpoint tensors (float32) of `attention` under the family's names, fused again if needed."""
    tensors: dict[str, torch.Tensor] = {}

    def put(part: str, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        tensors[spec.tensor_name(layer, part)] = weight
        if bias is not None:
            tensors[spec.tensor_name(layer, part, "bias")] = bias

    if spec.fused_qkv:
        biases = (attention.q_bias, attention.k_bias, attention.v_bias)
        fused_bias = torch.cat(biases) if all(b is not None for b in biases) else None
        put("qkv_proj", torch.cat([attention.q, attention.k, attention.v]), fused_bias)
    else:
        put("q_proj", attention.q, attention.q_bias)
        put("k_proj", attention.k, attention.k_bias)
        put("v_proj", attention.v, attention.v_bias)
    put("o_proj", attention.o, attention.o_bias)
    for part in ("q_norm", "k_norm"):
        norm = getattr(attention, part)
        if norm is not None:
            tensors[spec.tensor_name(layer, part)] = norm
    return tensors
