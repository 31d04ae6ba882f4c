"""How far the source looks: the best constant, or the best nearby rotation, for a rotary pair that loses its own.

A pair moved to the no-RoPE part loses its factor e^{iωΔ} (Δ = query position - key position). Under the
source's own attention over distances p_h(Δ), the constant closest to it in mean square is
γ_hj = E[e^{iω_j Δ}]; folding γ into the query keeps the pair's average contribution, and 1 - |γ|² is the share of
its position signal no constant can keep. Slow frequencies barely turn over the attended distances (|γ| ≈ 1),
fast ones average out (γ ≈ 0). Likewise a pair carried by a rope slot turning at ω' instead of ω is best scaled
by E[e^{i(ω - ω')Δ}]. All of these are the Fourier transform of p_h(Δ), measured once per layer at the context
length of the calibration window, so they hold for that length.
"""

from __future__ import annotations

import math

import torch

from kvshrink.convert.attention import AttentionWeights
from kvshrink.convert.maths import rotate_half_rope


@torch.no_grad()
def attention_distances(attention: AttentionWeights, inputs: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """p_h(Δ) [H, T] float64: the source's attention mass per distance, averaged over query positions, from the
    layer's calibration inputs [windows, T, n] run with the source inv_freq [P]."""
    heads, kv_heads, d = attention.num_heads, attention.num_kv_heads, attention.head_dim
    windows, length, _ = inputs.shape
    angles = torch.arange(length, dtype=torch.float64)[:, None] * inv_freq.double()[None, :]  # [T, P]
    cos, sin = angles.cos().float(), angles.sin().float()
    distance = torch.arange(length)[:, None] - torch.arange(length)[None, :]
    causal = distance >= 0
    histogram = torch.zeros(heads, length, dtype=torch.float64)

    def project(x, weight, bias, count):
        out = x @ weight.T + (bias if bias is not None else 0)
        return out.reshape(length, count, d)

    for window in range(windows):
        x = inputs[window].float()
        queries = rotate_half_rope(project(x, attention.q, attention.q_bias, heads), cos[:, None], sin[:, None])
        keys = rotate_half_rope(project(x, attention.k, attention.k_bias, kv_heads), cos[:, None], sin[:, None])
        keys = keys.repeat_interleave(heads // kv_heads, dim=1)
        logits = torch.einsum("thd,shd->hts", queries, keys) / math.sqrt(d)
        probs = logits.masked_fill(~causal, float("-inf")).softmax(dim=-1)  # [H, T(query m), T(key n)]
        histogram.index_add_(1, distance[causal], probs[:, causal].double())
    return histogram / (windows * length)


def rotation_gains(distances: torch.Tensor, frequencies: torch.Tensor) -> torch.Tensor:
    """E_h[e^{iωΔ}] [H, *frequencies.shape] complex128 under the attention distances p_h(Δ) [H, T]."""
    angles = torch.arange(distances.shape[1], dtype=torch.float64)[:, None] * frequencies.double().reshape(1, -1)
    gains = torch.complex(distances @ angles.cos(), distances @ angles.sin())
    return gains.reshape(distances.shape[0], *frequencies.shape)
