"""Which key components keep RoPE in the one shared rope key of MLA.

Per rotary frequency j the G KV heads hold G complex key components z_gj. Any unitary mixing U_j across the heads
commutes with RoPE (every component at frequency j turns by the same e^{iωΔ}), so z' = U_j z is as good a basis
as z, with U_j[c, g] folded into the query rows that met head g. In a basis, each (frequency, component) either
keeps RoPE (one complex pair of the shared rope key) or joins the no-RoPE part.

- `partial` keeps the source basis (U = I) and scores each (KV head, frequency) by the MHA2MLA 2-norm criterion
  Σ_h ‖q_hj‖·‖k_gj‖, compared across heads because the rope key is shared.
- `rotate` (RoRoPE) diagonalizes the 3x3-style Hermitian key covariance per frequency, so the first component
  holds as much key energy as any single pair can; components are scored by their eigenvalue. A complex unitary
  keeps strictly more than the real orthogonal rotation of TransMLA (it also aligns phases between heads).

With distance awareness, a score is multiplied by the share of the pair's position signal a constant cannot
replace, 1 - |γ|² (see `distance`), so slow frequencies that barely turn within the attended span give way.

The rope frequencies are one table for the whole model (one rotary embedding), so the slots of the shared key are
chosen once, globally: slot s has frequency j_s in every layer and holds each layer's best remaining component
at that frequency.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvshrink.convert.errors import KvshrinkError
from kvshrink.convert.maths import energy, rows_pair_covariance, to_rotate_half

ROPE_METHODS = ("partial", "rotate")


@dataclass
class RopeBasis:
    """One layer's key components per frequency, best first."""

    mixing: torch.Tensor  # [P, G, G] complex: row c of frequency j = component c as a combination of the heads
    scores: torch.Tensor  # [P, G] value of keeping RoPE on each component, descending within a frequency
    key_energy: torch.Tensor  # [P, G] E|z'|² of each component


def rope_basis(
    method: str,
    queries: torch.Tensor,
    keys: torch.Tensor,
    moment: torch.Tensor,
    position_loss: torch.Tensor,
) -> RopeBasis:
    """Bases and scores from complex query [H, P, n] and key [G, P, n] rows, the input second moment [n, n] and
    the per-(query head, frequency) loss weight of dropping RoPE ([H, P]; ones when distance is ignored)."""
    heads, pairs = queries.shape[:2]
    kv_heads = keys.shape[0]
    group = torch.arange(heads) // (heads // kv_heads)
    if method == "rotate":
        rows = to_rotate_half(keys).reshape(kv_heads * 2 * pairs, -1)  # the real key rows
        covariance = rows_pair_covariance(rows, moment, kv_heads, 2 * pairs)  # [P, G, G]: E[z_gj conj(z_hj)]
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending, columns
        mixing = eigenvectors.conj().transpose(1, 2)  # z' = V^H z
        base = eigenvalues.clamp_min(0)
    elif method == "partial":
        mixing = torch.eye(kv_heads, dtype=torch.complex128).expand(pairs, -1, -1).clone()
        key_energy = energy(keys, moment).T  # [P, G]
        query_energy = energy(queries, moment)  # [H, P]
        base = torch.zeros(pairs, kv_heads, dtype=torch.float64)
        base.index_add_(1, group, (query_energy.clamp_min(0).sqrt().T * key_energy[:, group].clamp_min(0).sqrt()))
    else:
        raise KvshrinkError(f"unknown rope method {method!r}: choose one of {', '.join(ROPE_METHODS)}")
    weights = mixing[:, :, group].abs() ** 2 / (heads // kv_heads)  # [P, G, H], sums to 1 over H
    loss = torch.einsum("jch,hj->jc", weights, position_loss.double())
    scores = base * loss
    order = scores.argsort(dim=1, descending=True)
    mixing = torch.gather(mixing, 1, order[:, :, None].expand(-1, -1, kv_heads))
    scores = torch.gather(scores, 1, order)
    rotated = torch.einsum("jcg,gjn->cjn", mixing, keys)
    return RopeBasis(mixing=mixing, scores=scores, key_energy=energy(rotated, moment).T)


@dataclass(frozen=True)
class RopeSlots:
    """The shared rope key's pairs: slot s is the `rank[s]`-th best component at source frequency `frequency[s]`."""

    frequency: tuple[int, ...]
    rank: tuple[int, ...]
    step: int | None  # serving layout: slot s is source frequency s * step (a geometric set starting at 1)


def _model_gains(bases: list[RopeBasis]) -> torch.Tensor:
    """[P, G]: value of the n-th slot at frequency j, summed over layers (each layer's scores sum to 1)."""
    return sum(basis.scores / basis.scores.sum().clamp_min(1e-300) for basis in bases)


def choose_slots(bases: list[RopeBasis], num_slots: int, geometric: bool) -> RopeSlots:
    """The `num_slots` (frequency, rank) pairs worth most over all layers.

    Free choice (exact per-pair frequencies): the top gains; within a frequency the gains decrease with rank, so
    the top set always takes a frequency's components best first. Geometric (serving engines' default RoPE):
    one component at each of frequencies 0, k, 2k, ... for the spacing k that keeps the most.
    """
    gains = _model_gains(bases)
    pairs, kv_heads = gains.shape
    if not geometric:
        top = gains.flatten().topk(num_slots).indices
        chosen = sorted((int(i) // kv_heads, int(i) % kv_heads) for i in top)
        return RopeSlots(tuple(j for j, _ in chosen), tuple(n for _, n in chosen), None)
    steps = range(1, (pairs - 1) // max(num_slots - 1, 1) + 1) if num_slots > 1 else [1]
    best = max(steps, key=lambda k: float(gains[torch.arange(num_slots) * k, 0].sum()))
    return RopeSlots(tuple(s * best for s in range(num_slots)), (0,) * num_slots, best)
