"""What each query head actually reads: its attention-weighted inputs z_i(m) = Σ_n a_i(m, n) [x_n; 1].

Head i's output at query m is O_i V_h z_i(m), so E‖(O_i V_h − O'_i S) z_i‖² is exactly the error a value merge
adds to the layer output while the attention pattern stays the source's. Per-token inputs weigh directions the
softmax averages away as much as the ones it keeps (the attention sink, recent tokens); z does not.
Keys are weighed the same way: a logit error matters in proportion to the attention its key receives.
The source's attention is recomputed from the calibration inputs with its RoPE frequencies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvshrink.convert.attention import AttentionWeights
from kvshrink.convert.calibration import LayerStatistics
from kvshrink.convert.gqa.heads import augmented

# Enough windows for a stable moment; the attention recomputation is the costliest part of a calibrated merge.
_MAX_WINDOWS = 4


@dataclass
class RotaryLayerStatistics(LayerStatistics):
    """Calibration inputs plus the source's RoPE, so a method can recompute the source's attention."""

    inv_freq: torch.Tensor  # [head_dim / 2] float64: pair j turns by position · inv_freq[j]
    attention_scaling: float = 1.0  # transformers multiplies cos/sin by this
    logit_scale: float | None = None  # None: 1/sqrt(head_dim); Gemma: query_pre_attn_scalar^-0.5
    logit_softcap: float | None = None  # Gemma-2: logits become cap · tanh(logits / cap) before the softmax


def _rms_normed(heads: torch.Tensor, weight: torch.Tensor | None, offset: float) -> torch.Tensor:
    if weight is None:
        return heads
    return heads * torch.rsqrt(heads.pow(2).mean(-1, keepdim=True) + 1e-6) * (offset + weight)


@torch.no_grad()
def attended_moments(attention: AttentionWeights, stats: RotaryLayerStatistics) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query head i, [H, hidden + 1, hidden + 1] float64 each: E[z_i z_iᵀ] (what its values are averaged
    over) and E_m Σ_n a_i(m, n) x_n x_nᵀ (its keys, weighted by the attention they receive)."""
    heads, kv_heads, d = attention.num_heads, attention.num_kv_heads, attention.head_dim
    inputs = stats.inputs[:_MAX_WINDOWS]
    windows, length, _ = inputs.shape
    angles = torch.arange(length, dtype=torch.float64)[:, None] * stats.inv_freq.double()[None, :]
    rotation = (torch.polar(torch.ones_like(angles), angles) * stats.attention_scaling).to(torch.complex64)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    moments = torch.zeros(heads, inputs.shape[-1] + 1, inputs.shape[-1] + 1, dtype=torch.float64)
    key_moments = torch.zeros_like(moments)
    q_rows, k_rows = augmented(attention.q, attention.q_bias).float(), augmented(attention.k, attention.k_bias).float()
    half = d // 2
    for window in inputs:
        x = torch.cat([window.float(), torch.ones(length, 1)], dim=1)  # [T, c]
        q = _rms_normed((x @ q_rows.T).reshape(length, heads, d), attention.q_norm, attention.norm_offset)
        k = _rms_normed((x @ k_rows.T).reshape(length, kv_heads, d), attention.k_norm, attention.norm_offset)
        q = torch.complex(q[..., :half], q[..., half:]) * rotation[:, None]
        k = (torch.complex(k[..., :half], k[..., half:]) * rotation[:, None]).repeat_interleave(heads // kv_heads, dim=1)
        logits = torch.einsum("mhj,nhj->hmn", q, k.conj()).real * (stats.logit_scale or 1 / math.sqrt(d))
        if stats.logit_softcap:
            logits = stats.logit_softcap * torch.tanh(logits / stats.logit_softcap)
        weights = logits.masked_fill(~causal, float("-inf")).softmax(dim=-1)  # [H, T, T]
        attended = weights @ x  # [H, T, c]
        moments += (attended.mT @ attended).double()
        received = weights.sum(dim=1)  # [H, T]: attention each key position receives
        key_moments += ((x.T * received[:, None]) @ x).double()
    return moments / (windows * length), key_moments / (windows * length)
