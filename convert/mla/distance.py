"""How far the source looks: the best constant for a rotary pair that loses RoPE.

A pair moved to the no-RoPE part loses its factor e^{iωΔ} (Δ = query position - key position). Under the
source's own attention over distances p_h(Δ), the constant closest to it in mean square is
γ_hj = E[e^{iω_j Δ}]; folding γ into the query keeps the pair's average contribution, and 1 - |γ|² is the share of
its position signal no constant can keep. Slow frequencies barely turn over the attended distances (|γ| ≈ 1),
fast ones average out (γ ≈ 0). γ depends on the context length it was measured at (the calibration window).
"""

from __future__ import annotations

import math

import torch

from kvshrink.convert.attention import AttentionWeights


def _rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


@torch.no_grad()
def distance_gains(attention: AttentionWeights, inputs: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """γ [H, P] complex128 from the layer's calibration inputs [windows, T, n] and the source inv_freq [P]."""
    heads, kv_heads, d = attention.num_heads, attention.num_kv_heads, attention.head_dim
    windows, length, _ = inputs.shape
    positions = torch.arange(length, dtype=torch.float64)
    angles = positions[:, None] * inv_freq.double()[None, :]  # [T, P]
    cos, sin = angles.cos().float(), angles.sin().float()
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    gains = torch.zeros(heads, inv_freq.numel(), dtype=torch.complex128)

    def project(x, weight, bias, count):
        out = x @ weight.T + (bias if bias is not None else 0)
        return out.reshape(length, count, d)

    for window in range(windows):
        x = inputs[window].float()
        queries = _rotate_half(project(x, attention.q, attention.q_bias, heads), cos[:, None], sin[:, None])
        keys = _rotate_half(project(x, attention.k, attention.k_bias, kv_heads), cos[:, None], sin[:, None])
        keys = keys.repeat_interleave(heads // kv_heads, dim=1)
        logits = torch.einsum("thd,shd->hts", queries, keys) / math.sqrt(d)
        probs = logits.masked_fill(~causal, float("-inf")).softmax(dim=-1)  # [H, T(query m), T(key n)]
        # Σ_n p(m, n) e^{iω(m - n)} = e^{iωm} · (Σ_n p(m, n) cos ωn - i Σ_n p(m, n) sin ωn)
        real, imag = probs @ cos, probs @ sin  # [H, T, P]
        gains += torch.complex(cos * real + sin * imag, sin * real - cos * imag).sum(dim=1).to(torch.complex128)
    return gains / (windows * length)
