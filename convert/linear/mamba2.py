"""A Mamba-2 mixer (GraniteMoeHybrid's, stock transformers) initialized from the attention layer it replaces.

Mamba in the Llama (arXiv 2408.15237) reads linear attention as a state-space model: C from W_Q, B from W_K, x from
W_V, the output projection from W_O. The stock mixer (transformers' modeling_granitemoehybrid.py,
GraniteMoeHybridMambaLayer.torch_forward) computes, per head h and token t,

    S_t = exp(-softplus(dt_t + dt_bias) * exp(A_log)) S_{t-1} + softplus(...) x_t B_t^T,   y_t = S_t C_t + D x_t,
    out = out_proj(norm.weight * groupRMS(y * silu(z))),

where x, B and C pass a causal depthwise conv and the config's activation (SiLU) first, and z and dt are rows of the
same in_proj. With one group per head (n_groups = heads, d_state = head_dim) each head keeps its own key/query maps:

- in_proj rows [z; x; B; C; dt]: z zero with a large bias (silu(6) = 5.99: the gate passes everything, and the per-head
  RMS after it removes its scale); x = the value rows of the head's KV head, scaled so the values enter SiLU where it
  is linear (silu(u) = u/2 + O(u^2)); B = the key rows of its KV head; C = its query rows; dt zero (a constant step);
- an identity conv (its last tap, the current token, 1), D = 0, out_proj = W_O;
- calibrated on text, per head: the forgetting rate (exp(A_log), chosen from DECAY_RATES) and the per-channel output
  scale (norm.weight, least squares against the source head's output), since without softmax's denominator the
  per-head RMS is what normalizes the output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kvshrink.convert.attention import AttentionWeights

GATE_BIAS = 6.0
VALUE_RMS = 0.05  # the RMS the scaled values enter SiLU at: silu(u) / (u / 2) is within 2.5% of 1 there
# forgetting per token a head may start from (exp(-rate) of the state is kept each token): from no decay over any
# context served (exp(-1e-6 * 32768) = 0.97) to a head that looks a few tokens back (exp(-1/2) = 0.61 a token)
DECAY_RATES = (1e-6, 1 / 2048, 1 / 512, 1 / 128, 1 / 32, 1 / 8, 1 / 2)
STEP = 1.0  # softplus(dt_bias): the step every token starts with
CONV_WIDTH = 4


@dataclass(frozen=True)
class MixerInit:
    """What calibration decides for one layer's mixer: the value scale, each head's forgetting rate and each
    channel's output scale, with the closed form's output error on the calibration text, relative to the attention
    output it replaces and to the residual stream that output is added to (what the layer's output loses)."""

    value_scale: float
    decay_rates: torch.Tensor  # [heads]
    output_scale: torch.Tensor  # [heads * head_dim]
    relative_error: float
    residual_error: float

    def report(self) -> dict[str, Any]:
        return {"closed_form_relative_error": round(self.relative_error, 6),
                "closed_form_residual_error": round(self.residual_error, 6),
                "decay_rates": [float(rate) for rate in self.decay_rates]}


def mamba_config(attention_heads: int, head_dim: int, hidden_size: int) -> dict[str, Any]:
    """GraniteMoeHybridConfig's mamba fields for mixers initialized from attention of `attention_heads` heads."""
    return {
        "mamba_n_heads": attention_heads, "mamba_d_head": head_dim, "mamba_n_groups": attention_heads,
        "mamba_d_state": head_dim, "mamba_d_conv": CONV_WIDTH,
        "mamba_expand": attention_heads * head_dim // hidden_size,
        "mamba_chunk_size": 256, "mamba_conv_bias": True, "mamba_proj_bias": True,
    }


def _per_query_head(rows: torch.Tensor, attention: AttentionWeights) -> torch.Tensor:
    """KV-head rows [KV * d, ...] repeated for each query head that reads them [H * d, ...]."""
    d = attention.head_dim
    heads = rows.reshape(attention.num_kv_heads, d, *rows.shape[1:])
    return heads.repeat_interleave(attention.queries_per_kv_head, dim=0).reshape(attention.num_heads * d,
                                                                                 *rows.shape[1:])


def _zeros_if_none(bias: torch.Tensor | None, rows: int) -> torch.Tensor:
    return torch.zeros(rows) if bias is None else bias


def value_scale(attention: AttentionWeights, inputs: torch.Tensor) -> float:
    """The factor that puts the layer's values ([tokens, hidden] inputs) at VALUE_RMS."""
    values = inputs @ attention.v.T + _zeros_if_none(attention.v_bias, attention.v.shape[0])
    return VALUE_RMS / max(float(values.pow(2).mean().sqrt()), 1e-12)


def mixer_tensors(attention: AttentionWeights, scale: float, decay_rates: torch.Tensor,
                  output_scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """The mixer's tensors (names inside the mixer module, float32) for `attention` under the calibrated values."""
    heads, width = attention.num_heads, attention.num_heads * attention.head_dim
    hidden = attention.q.shape[1]
    in_proj = torch.cat([
        torch.zeros(width, hidden), scale * _per_query_head(attention.v, attention),
        _per_query_head(attention.k, attention), attention.q, torch.zeros(heads, hidden),
    ])
    in_bias = torch.cat([
        torch.full((width,), GATE_BIAS),
        scale * _per_query_head(_zeros_if_none(attention.v_bias, attention.v.shape[0]), attention),
        _per_query_head(_zeros_if_none(attention.k_bias, attention.k.shape[0]), attention),
        _zeros_if_none(attention.q_bias, width), torch.zeros(heads),
    ])
    conv = torch.zeros(3 * width, 1, CONV_WIDTH)
    conv[:, 0, -1] = 1.0
    return {
        "in_proj.weight": in_proj, "in_proj.bias": in_bias,
        "conv1d.weight": conv, "conv1d.bias": torch.zeros(3 * width),
        "dt_bias": torch.full((heads,), math.log(math.expm1(STEP))), "A_log": decay_rates.log().float(),
        "D": torch.zeros(heads), "norm.weight": output_scale.float().clone(),
        "out_proj.weight": attention.o.clone(), "out_proj.bias": _zeros_if_none(attention.o_bias, hidden).clone(),
    }


class Captured:
    """The input of `module` on its last call (a forward pre-hook), for the statistics below."""

    def __init__(self, module: nn.Module):
        self.value: torch.Tensor | None = None
        self.handle = module.register_forward_pre_hook(self._keep)

    def _keep(self, module: nn.Module, args: tuple) -> None:
        self.value = args[0].detach().float()


@dataclass
class _Moments:
    """Per channel, over the calibration tokens: Σ y·o, Σ y², Σ o² of the mixer's normalized output y and the source
    head output o (the input of o_proj)."""

    cross: torch.Tensor
    mixer: torch.Tensor
    source: torch.Tensor

    def add(self, y: torch.Tensor, o: torch.Tensor) -> None:
        flat_y, flat_o = y.reshape(-1, y.shape[-1]).double(), o.reshape(-1, o.shape[-1]).double()
        self.cross += (flat_y * flat_o).sum(0)
        self.mixer += flat_y.pow(2).sum(0)
        self.source += flat_o.pow(2).sum(0)

    def best_scale(self) -> torch.Tensor:
        return self.cross / self.mixer.clamp_min(1e-30)

    def head_errors(self, heads: int) -> torch.Tensor:
        """Each head's relative error at its best per-channel scale."""
        residual = self.source - self.cross.pow(2) / self.mixer.clamp_min(1e-30)
        return residual.reshape(heads, -1).sum(1) / self.source.reshape(heads, -1).sum(1).clamp_min(1e-30)


def _zero_moments(width: int) -> _Moments:
    return _Moments(*(torch.zeros(width, dtype=torch.float64) for _ in range(3)))


@dataclass(frozen=True)
class LayerSample:
    """One layer's calibration windows: what its attention received ([T, hidden] each), what the source attention
    gave ([T, hidden]), its heads' outputs before o_proj ([T, heads * head_dim]) and the residual stream after the
    attention (the layer's input plus that output, [T, hidden])."""

    inputs: list[torch.Tensor]
    outputs: list[torch.Tensor]
    head_outputs: list[torch.Tensor]
    residuals: list[torch.Tensor]


def _load(mixer: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, parameter in mixer.named_parameters():
            parameter.copy_(tensors[name].to(parameter.device).reshape(parameter.shape))


def _moments(mixer: nn.Module, run, sample: LayerSample) -> _Moments:
    captured = Captured(mixer.out_proj)
    moments = _zero_moments(sample.head_outputs[0].shape[-1])
    try:
        for window, heads in zip(sample.inputs, sample.head_outputs):
            run(mixer, window)
            moments.add(captured.value.cpu(), heads.cpu())
    finally:
        captured.handle.remove()
    return moments


@torch.no_grad()
def calibrate_mixer(attention: AttentionWeights, mixer: nn.Module, run, sample: LayerSample) -> MixerInit:
    """Each head's forgetting rate (the one of DECAY_RATES whose normalized output, best scaled, is closest to the
    source head's) and each channel's output scale, on `sample`; `mixer` is a stock mixer module of the layer's
    shape that `run(mixer, window)` runs (its values are overwritten)."""
    heads, width = attention.num_heads, attention.num_heads * attention.head_dim
    scale = value_scale(attention, torch.cat(sample.inputs).cpu())
    ones = torch.ones(width)
    by_rate = []
    for rate in DECAY_RATES:
        _load(mixer, mixer_tensors(attention, scale, torch.full((heads,), rate, dtype=torch.float64), ones))
        by_rate.append(_moments(mixer, run, sample))
    errors = torch.stack([moments.head_errors(heads) for moments in by_rate])  # [rates, heads]
    chosen = errors.argmin(0)
    rates = torch.tensor([DECAY_RATES[i] for i in chosen.tolist()], dtype=torch.float64)
    output_scale = torch.cat([by_rate[i].best_scale().reshape(heads, -1)[h] for h, i in enumerate(chosen.tolist())])
    _load(mixer, mixer_tensors(attention, scale, rates, output_scale.float()))
    squared = sum(float((run(mixer, x).float() - y).pow(2).sum()) for x, y in zip(sample.inputs, sample.outputs))
    energy = sum(float(y.pow(2).sum()) for y in sample.outputs)
    stream = sum(float(r.pow(2).sum()) for r in sample.residuals)
    return MixerInit(scale, rates, output_scale.float(), squared / max(energy, 1e-30), squared / max(stream, 1e-30))
