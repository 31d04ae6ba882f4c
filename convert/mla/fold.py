"""Dropped rotary components ride on the kept slot they resemble most, instead of losing RoPE altogether.

A component z' at frequency ω that keeps no slot of its own goes to the no-RoPE part, where its factor e^{iωΔ}
becomes the constant γ = E[e^{iωΔ}]. But keys at nearby frequencies are strongly correlated (SmolLM2: |corr| ≈ 0.85
between the leading components of adjacent frequencies). Split z' = β z_s + r by regressing it on a slot key z_s
(under the calibration second moment): β z_s is already cached in slot s, which turns at ω_s, and
e^{iωΔ} ≈ c e^{iω_sΔ} with c_h = E_h[e^{i(ω - ω_s)Δ}] (the best complex gain under head h's attention over
distances), so c_h·conj(β) times z''s query rows joins slot s's query; only r is left for the latent. Worth it when
the drift keeps more position signal than the constant: the benefit |β|²·E|z_s|²·Σ_h w_h (|c_h|² - |γ_h|²), with w_h
the head's query energy on z', picks the slot, and a component with no positive benefit is left as it was.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvshrink.convert.maths import energy


@dataclass
class Folded:
    residual: torch.Tensor  # [C, P, n] complex: the components with what the slots carry removed (kept ones as given)
    slot_queries: torch.Tensor  # [H, S, n] complex: query rows to add to each slot's rope query
    count: int  # components that ride on a slot


def fold_into_slots(
    rotated: torch.Tensor,
    mixing: torch.Tensor,
    queries: torch.Tensor,
    kept: torch.Tensor,
    slot_index: tuple[list[int], list[int]],
    moment: torch.Tensor,
    constant_gains: torch.Tensor,
    drift_gains: torch.Tensor,
) -> Folded:
    """Fold the components not `kept` ([P, C] bool) into slots.

    rotated [C, P, n]: key components per frequency; mixing [P, C, G]: component c as a combination of KV heads;
    queries [H, P, n]: source query pairs; slot_index: (frequencies, ranks) of the S slots; moment [n, n];
    constant_gains γ [H, P]; drift_gains c [H, P, S]: E[e^{i(ω_j - ω_s)Δ}] for component frequency j and slot s.
    """
    heads = queries.shape[0]
    group = torch.arange(heads) // (heads // mixing.shape[2])
    frequency, rank = slot_index
    slot_keys = rotated[rank, frequency]  # [S, n]
    slot_energy = energy(slot_keys, moment).clamp_min(1e-300)
    # [n, S]: E[z' conj(z_s)] = z' · slot_reads, in real products (no complex copy of the [n, n] moment)
    slot_reads = torch.complex(moment @ slot_keys.real.T, -(moment @ slot_keys.imag.T))
    beta = (rotated @ slot_reads) / slot_energy  # [C, P, S]: z' ≈ β z_s
    query_weight = mixing[:, :, group].abs() ** 2 * energy(queries, moment).T[:, None, :]  # [P, C, H]
    kept_gain = drift_gains.abs() ** 2 - constant_gains.abs()[:, :, None] ** 2  # [H, P, S]
    benefit = torch.einsum("jch,hjs->cjs", query_weight, kept_gain) * beta.abs() ** 2 * slot_energy
    benefit[kept.T] = 0
    best, slot = benefit.max(dim=2)
    residual = rotated.clone()
    slot_queries = torch.zeros(heads, len(frequency), rotated.shape[-1], dtype=torch.complex128)
    chosen = (best > 0).nonzero().tolist()
    for component, j in chosen:
        s = int(slot[component, j])
        share = beta[component, j, s]
        residual[component, j] -= share * slot_keys[s]
        gain = drift_gains[:, j, s] * share.conj() * mixing[j, component, group]  # [H]
        slot_queries[:, s] += gain[:, None] * queries[:, j]
    return Folded(residual=residual, slot_queries=slot_queries, count=len(chosen))
