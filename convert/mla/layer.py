"""One layer's attention -> DeepseekV3 attention tensors.

Score of query head h with its KV head g, per rotary pair j, is Re(q_hj · conj(z_gj) · e^{iω_jΔ}). In the layer's
rope basis (see `rope`) z_gj = Σ_c conj(U_j[c, g]) z'_cj, so:
- kept components go to the shared rope key as z'_cj, with U_j[c, g(h)]·q_hj as head h's rope query;
- the rest stay per KV group as the residual Σ_{c not kept} conj(U_j[c, g]) z'_cj (head_dim no-RoPE key dims),
  met by γ_hj·q_hj (γ = 1 without distance awareness); with distance awareness, the part of a dropped
  component that a kept slot's key explains rides on that slot instead (`fold`);
- the residual keys and the values of all groups share one latent (`lowrank`), read through the linearized
  latent RMSNorm (`latent_norm`);
- every query row is scaled by sqrt(target qk head dim / source head dim), the softmax-scale ratio.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from kvshrink.convert.attention import AttentionWeights
from kvshrink.convert.maths import (
    augmented, factored_energy, moment_factor, to_complex, to_interleaved, to_rotate_half,
)
from kvshrink.convert.mla.biases import refit_layer
from kvshrink.convert.mla.distance import rotation_gains
from kvshrink.convert.mla.fold import fold_into_slots
from kvshrink.convert.mla.head_norms import HeadNormFit
from kvshrink.convert.mla.latent_norm import latent_scale, linearization_error
from kvshrink.convert.mla.lowrank import JointLatent, joint_latent
from kvshrink.convert.mla.rope import RopeBasis, RopeSlots
from kvshrink.convert.mla.shapes import MlaShape

_ERROR_ROWS = 1024  # residual rows measured at once


@dataclass(frozen=True)
class OutputFormat:
    """Model-wide choices of how the tensors are laid out."""

    interleave: bool  # rope dims as (Re, Im) pairs (rope_interleave=True) or rotate-half
    latent_eps: float  # the eps the latent RMSNorm runs with
    attention_bias: bool  # kv_a_proj_with_mqa / o_proj (and q_a_proj) carry biases
    query_latent: bool  # query through q_a_proj -> q_a_layernorm -> q_b_proj (the only place a q bias fits)
    drop_key_bias: bool  # drop the no-RoPE key bias (shifts all logits of a query equally: exact)
    refit_biases: bool = False  # no biases allowed: refit query, value and rope-key biases into the weights (`biases`)


@dataclass
class LayerCalibration:
    """What calibration taught about one layer, kept between choosing the rope slots and writing the layer."""

    moment: torch.Tensor  # E[x̃ x̃ᵀ], x̃ = [x; 1]: [n + 1, n + 1] float64
    sample: torch.Tensor  # calibration inputs x̃ [tokens, n + 1] for measuring the norm linearization
    gains: torch.Tensor  # γ [H, P] complex
    distances: torch.Tensor | None  # the source's attention per distance [H, T]; None when distance is ignored
    basis: RopeBasis
    head_norms: HeadNormFit | None = None  # the linear maps that replace per-head q/k norms (Qwen3)


def rope_bias(k_bias: torch.Tensor | None, basis: RopeBasis, slots: RopeSlots, head_dim: int) -> torch.Tensor:
    """The bias the shared rope key would need (complex, one per slot); zero when the source has no k bias."""
    if k_bias is None:
        return torch.zeros(len(slots.frequency), dtype=torch.complex128)
    key_bias = to_complex(k_bias[:, None].double(), head_dim)[..., 0]
    rotated = torch.einsum("jcg,gj->cj", basis.mixing, key_bias)
    return rotated[list(slots.rank), list(slots.frequency)]


def _rope_rows(pairs: torch.Tensor, interleave: bool) -> torch.Tensor:
    return to_interleaved(pairs) if interleave else to_rotate_half(pairs)


def _output_metric(
    nope_queries: torch.Tensor | None, o: torch.Tensor, targets: torch.Tensor, moment: torch.Tensor, group: torch.Tensor
) -> torch.Tensor:
    """Block-diagonal weight of the stacked [K_nope; V] rows of every KV group: the second moment of the queries
    that read each key row (scaled by the softmax's 1/head_dim), o_proj's Gram matrix for each value row. Keys and
    values are then balanced to carry equal weighted energy."""
    kv_heads, rows, _ = targets.shape
    d = o.shape[1] // len(group)
    value_readers = o.double().reshape(o.shape[0], len(group), d).transpose(0, 1)  # [H, n, d]
    blocks = torch.zeros(kv_heads, rows, rows, dtype=torch.float64)
    nope = rows - d
    for head, kv_head in enumerate(group.tolist()):
        blocks[kv_head, nope:, nope:] += value_readers[head].T @ value_readers[head]
        if nope_queries is not None:
            blocks[kv_head, :nope, :nope] += nope_queries[head] @ moment @ nope_queries[head].T / d
    covariance = targets @ moment @ targets.transpose(1, 2)  # [G, rows, rows]
    if nope:
        key_weight = sum(float((blocks[g, :nope, :nope] * covariance[g, :nope, :nope]).sum()) for g in range(kv_heads))
        value_weight = sum(
            float((blocks[g, nope:, nope:] * covariance[g, nope:, nope:]).sum()) for g in range(kv_heads)
        )
        blocks[:, :nope, :nope] /= max(key_weight, 1e-300)
        blocks[:, nope:, nope:] /= max(value_weight, 1e-300)
    return torch.block_diag(*blocks)


@dataclass
class _AttentionRows:
    """A layer's attention rewritten as DeepseekV3 rows acting on x̃, before the latent is chosen."""

    query: torch.Tensor  # [H·(nope + rope), n + 1]: every head's no-RoPE and rope query rows, softmax-scaled
    targets: torch.Tensor  # [G·(nope + d), n + 1]: each KV group's no-RoPE key and value rows, read from the latent
    rope_key: torch.Tensor  # [rope_dim, n + 1]: the shared rope key
    folded: int  # dropped rotary components that ride on a slot


def _attention_rows(attention: AttentionWeights, calibration: LayerCalibration, slots: RopeSlots, shape: MlaShape,
                    output: OutputFormat, inv_freq: torch.Tensor) -> _AttentionRows:
    """The rope split of the module docstring; its [G, P, n + 1] complex intermediates die with this call."""
    heads, kv_heads, d = attention.num_heads, attention.num_kv_heads, attention.head_dim
    group = torch.arange(heads) // (heads // kv_heads)
    mixing = calibration.basis.mixing
    queries = to_complex(augmented(attention.q, attention.q_bias), d)  # [H, P, n+1]
    keys = to_complex(augmented(attention.k, attention.k_bias), d)  # [G, P, n+1]
    rotated = torch.einsum("jcg,gjn->cjn", mixing, keys)
    del keys
    frequency, rank = list(slots.frequency), list(slots.rank)
    rope_key = rotated[rank, frequency]  # [S, n+1]
    rope_query = mixing[frequency, rank][:, group].T[..., None] * queries[:, frequency]  # [H, S, n+1]
    kept = torch.zeros(mixing.shape[:2], dtype=torch.bool)
    kept[frequency, rank] = True
    folded = 0
    if calibration.distances is not None:  # every slot turns at its source frequency inv_freq[frequency[s]]
        drift = rotation_gains(calibration.distances, inv_freq[:, None] - inv_freq[frequency][None, :])
        fold = fold_into_slots(rotated, mixing, queries, kept, (frequency, rank), calibration.moment,
                               calibration.gains, drift)
        rotated, rope_query, folded = fold.residual, rope_query + fold.slot_queries, fold.count
    dropped = mixing.conj() * (~kept)[:, :, None].to(mixing.dtype)
    residual_key = torch.einsum("jcg,cjn->gjn", dropped, rotated)  # [G, P, n+1]
    del rotated
    if output.drop_key_bias:
        residual_key[..., -1] = 0
    query_parts = [_rope_rows(rope_query, output.interleave)]
    latent_parts = [augmented(attention.v, attention.v_bias).reshape(kv_heads, d, -1)]
    if shape.nope_dim:
        query_parts.insert(0, to_rotate_half(calibration.gains[:, :, None] * queries))
        latent_parts.insert(0, to_rotate_half(residual_key))
    del queries, rope_query  # a 70B-width layer's complex queries alone are 537 MB
    query = torch.cat(query_parts, dim=1).reshape(heads * (shape.nope_dim + shape.rope_dim), -1)
    query *= math.sqrt((shape.nope_dim + shape.rope_dim) / d)
    targets = torch.cat(latent_parts, dim=1)
    return _AttentionRows(
        query, targets.reshape(-1, targets.shape[-1]), _rope_rows(rope_key, output.interleave), folded
    )


def _latent(attention: AttentionWeights, rows: _AttentionRows, calibration: LayerCalibration, factor: torch.Tensor,
            shape: MlaShape, factorization: str) -> JointLatent:
    kv_heads = attention.num_kv_heads
    targets = rows.targets.reshape(kv_heads, -1, rows.targets.shape[-1])
    metric = None
    if factorization == "output":
        group = torch.arange(attention.num_heads) // attention.queries_per_kv_head
        nope_queries = rows.query.reshape(attention.num_heads, -1, rows.query.shape[-1])[:, : shape.nope_dim]
        metric = _output_metric(
            nope_queries if shape.nope_dim else None, attention.o, targets, calibration.moment, group
        )
    key_rows = (torch.arange(targets.shape[1]) < shape.nope_dim).repeat(kv_heads)
    return joint_latent(rows.targets, shape.kv_rank, factorization, factor, metric, key_rows)


def _tensors(attention: AttentionWeights, query: torch.Tensor, up: torch.Tensor, kv_a: torch.Tensor, alpha: float,
             shape: MlaShape, output: OutputFormat, input_norm_bound: float) -> dict[str, torch.Tensor]:
    """The layer's DeepseekV3 attention tensors (float64) named relative to `self_attn.`."""
    hidden = attention.q.shape[1]
    tensors = {
        "kv_a_proj_with_mqa.weight": kv_a[:, :hidden],
        "kv_a_layernorm.weight": torch.ones(shape.kv_rank),
        "kv_b_proj.weight": up * (math.sqrt(output.latent_eps) / alpha),
        "o_proj.weight": attention.o,
    }
    if output.attention_bias:
        tensors["kv_a_proj_with_mqa.bias"] = kv_a[:, hidden]
        tensors["o_proj.bias"] = attention.o_bias if attention.o_bias is not None else torch.zeros(hidden)
    if output.query_latent:
        width = hidden + 1  # the latent is α·x̃: x plus one constant channel that carries the bias
        query_alpha = latent_scale(torch.eye(width, dtype=torch.float64), output.latent_eps, input_norm_bound)
        tensors["q_a_proj.weight"] = torch.eye(width, hidden) * query_alpha
        tensors["q_a_proj.bias"] = torch.eye(width)[-1] * query_alpha
        tensors["q_a_layernorm.weight"] = torch.ones(width)
        tensors["q_b_proj.weight"] = query * (math.sqrt(output.latent_eps) / query_alpha)
    else:
        tensors["q_proj.weight"] = query[:, :hidden]
    return tensors


def _errors(attention: AttentionWeights, targets: torch.Tensor, latent: JointLatent, factor: torch.Tensor,
            nope_dim: int) -> dict[str, float]:
    """K/V relative errors from residual rows through a factor of the moment: sums of squares, so a near-exact
    latent (rank close to full) reports a tiny error rather than a negative one from rounding. Residuals are
    taken a block of rows at a time: a 7B-width layer's [8192, 4097] residual would be 268 MB in float64."""
    error = torch.cat([factored_energy(targets[i : i + _ERROR_ROWS] - latent.up[i : i + _ERROR_ROWS] @ latent.down,
                                       factor)
                       for i in range(0, targets.shape[0], _ERROR_ROWS)])
    error = error.reshape(attention.num_kv_heads, -1).sum(0)
    key_energy = float(factored_energy(augmented(attention.k, attention.k_bias), factor).sum())
    value_energy = float(factored_energy(augmented(attention.v, attention.v_bias), factor).sum())
    key_error = float(error[:nope_dim].sum()) if nope_dim else 0.0
    return {
        "k_rel_error": math.sqrt(max(key_error, 0.0) / max(key_energy, 1e-300)),
        "v_rel_error": math.sqrt(max(float(error[nope_dim:].sum()), 0.0) / max(value_energy, 1e-300)),
    }


def convert_attention(
    attention: AttentionWeights,
    calibration: LayerCalibration,
    slots: RopeSlots,
    shape: MlaShape,
    output: OutputFormat,
    factorization: str,
    input_norm_bound: float,
    inv_freq: torch.Tensor,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors named relative to `self_attn.` (float32) and the layer's report entry."""
    group = torch.arange(attention.num_heads) // attention.queries_per_kv_head
    rows = _attention_rows(attention, calibration, slots, shape, output, inv_freq)
    # one factor of the moment for the latent, the bias refit and the errors: at 70B width (8193²) each
    # float64 Cholesky is seconds, and up to five were computed per layer
    factor = moment_factor(calibration.moment)
    latent = _latent(attention, rows, calibration, factor, shape, factorization)
    query, down, rope_key, bias_errors = rows.query, latent.down, rows.rope_key, None
    if output.refit_biases:
        query, down, rope_key, bias_errors = refit_layer(query, down, rope_key, calibration.moment, factor)
    alpha = latent_scale(down, output.latent_eps, input_norm_bound)
    up = latent.up.reshape(attention.num_kv_heads, -1, shape.kv_rank)[group].reshape(-1, shape.kv_rank)
    tensors = _tensors(
        attention, query, up, torch.cat([down * alpha, rope_key]), alpha, shape, output, input_norm_bound
    )
    basis = calibration.basis
    report = {
        **_errors(attention, rows.targets, latent, factor, shape.nope_dim),
        "rope_energy_kept": float(
            basis.key_energy[list(slots.frequency), list(slots.rank)].sum() / basis.key_energy.sum()
        ),
        "folded_components": rows.folded,
        "latent_norm_error": linearization_error(
            calibration.sample[:, : down.shape[1]] @ (down * alpha).T, output.latent_eps
        ),
    }
    if bias_errors is not None:
        report["bias_refit_error"] = bias_errors
    return {name: tensor.float() for name, tensor in tensors.items()}, report
