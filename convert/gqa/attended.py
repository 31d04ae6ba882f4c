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
from kvshrink.convert.calibration import AttentionInputs
from kvshrink.convert.maths import augmented, complex_pairs, rms_norm

# Enough windows for a stable moment; the attention recomputation is the costliest part of a calibrated merge.
_MAX_WINDOWS = 4


@dataclass
class RotaryAttentionInputs(AttentionInputs):
    """Calibration inputs plus the source's RoPE, so a method can recompute the source's attention."""

    inv_freq: torch.Tensor  # [head_dim / 2] float64: pair j turns by position · inv_freq[j]
    attention_scaling: float = 1.0  # transformers multiplies cos/sin by this
    logit_scale: float | None = None  # None: 1/sqrt(head_dim); Gemma: query_pre_attn_scalar^-0.5
    logit_softcap: float | None = None  # Gemma-2: logits become cap · tanh(logits / cap) before the softmax
    norm_eps: float = 1e-6  # the source's rms_norm_eps, which its q/k norms run at (transformers' default)


def _normed(heads: torch.Tensor, weight: torch.Tensor | None, offset: float, eps: float) -> torch.Tensor:
    """A q or k projection through the source's per-head norm, where it has one."""
    return heads if weight is None else rms_norm(heads, weight, offset, eps)


@torch.no_grad()
def attended_moments(
    attention: AttentionWeights, stats: RotaryAttentionInputs, value_rows: torch.Tensor, key_rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64: per query head i, R_v E[z_i z_iᵀ] R_vᵀ [H, rv, rv] (what its values are averaged over); and over
    all of them, R_k (mean_i E_m Σ_n a_i(m, n) x̃_n x̃_nᵀ) R_kᵀ [rk, rk] (the keys, weighted by the attention they
    receive from the layer's query heads), seen through `value_rows` [rv, hidden + 1] and `key_rows`
    [rk, hidden + 1] acting on x̃ = [x; 1]. The key moment is needed only as that mean, so it is summed once
    instead of per head (a 70B-width layer's 64 heads would each add a [1024, T] x [T, 1024] product).

    A merge reads these moments only through the source's value and key rows, so projecting them keeps each
    head's moment at the group's K/V width instead of [hidden + 1]² (a 70B-width MQA group would otherwise hold
    64 such 8193² matrices); identity rows give the full moments."""
    heads, kv_heads, d = attention.num_heads, attention.num_kv_heads, attention.head_dim
    inputs = stats.inputs[:_MAX_WINDOWS]
    windows, length, _ = inputs.shape
    angles = torch.arange(length, dtype=torch.float64)[:, None] * stats.inv_freq.double()[None, :]
    rotation = (torch.polar(torch.ones_like(angles), angles) * stats.attention_scaling).to(torch.complex64)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    # Summed in place over at most _MAX_WINDOWS windows in float32, as each window's products are computed.
    moments = torch.zeros(heads, value_rows.shape[0], value_rows.shape[0])
    key_moment = torch.zeros(key_rows.shape[0], key_rows.shape[0])
    q_rows, k_rows = augmented(attention.q, attention.q_bias).float(), augmented(attention.k, attention.k_bias).float()
    value_rows, key_rows = value_rows.float(), key_rows.float()
    offset, eps = attention.norm_offset, stats.norm_eps
    for window in inputs:
        x = torch.cat([window.float(), torch.ones(length, 1)], dim=1)  # [T, c]
        q = _normed((x @ q_rows.T).reshape(length, heads, d), attention.q_norm, offset, eps)
        k = _normed((x @ k_rows.T).reshape(length, kv_heads, d), attention.k_norm, offset, eps)
        q = complex_pairs(q) * rotation[:, None]
        k = (complex_pairs(k) * rotation[:, None]).repeat_interleave(heads // kv_heads, dim=1)
        logits = torch.einsum("mhj,nhj->hmn", q, k.conj()).real * (stats.logit_scale or 1 / math.sqrt(d))
        if stats.logit_softcap:
            logits = stats.logit_softcap * torch.tanh(logits / stats.logit_softcap)
        weights = logits.masked_fill(~causal, float("-inf")).softmax(dim=-1)  # [H, T, T]
        attended = weights @ (x @ value_rows.T)  # [H, T, rv]
        moments.baddbmm_(attended.mT, attended)
        del attended
        received = weights.sum(dim=1).mean(dim=0)  # [T]: attention each key position receives, mean over heads
        seen_keys = x @ key_rows.T  # [T, rk]
        key_moment.addmm_(seen_keys.T * received, seen_keys)
    values = (moments / (windows * length)).double()
    del moments
    return values, (key_moment / (windows * length)).double()
