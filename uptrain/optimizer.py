"""AdamW for uptraining, with updates scaled to the size of rows far off the model's typical weight size.

Adam moves every weight by about lr per step, whatever its size. MLA conversions keep the latent RMSNorm exactly
linear by shrinking the latent rows of kv_a_proj_with_mqa to ~1e-8 and growing kv_b_proj to match
(convert/mla/latent_norm.py); one plain Adam step at lr 3e-4 multiplies the latent rows ten-thousandfold and
leaves the norm's linear range, while kv_b_proj hardly moves. So a row whose RMS is more than OFF_SCALE times
off the reference (the median RMS of the matrices around it) takes Adam's step times (row RMS / reference):
the same relative change an ordinary weight gets. Every other row takes plain AdamW's step.
"""

from __future__ import annotations

from typing import Any

import torch

OFF_SCALE = 100.0  # rows this many times smaller or larger than the reference get size-scaled updates


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters, with weight decay on matrices only (norm gains and biases are 1-d)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]


def reference_rms(parameters) -> float:
    """The median RMS of the matrices among `parameters`: the typical weight size, which neither a shrunken
    latent nor its grown partner moves (read before sharding, so every process gets the same number)."""
    sizes = sorted(float(p.detach().float().pow(2).mean().sqrt()) for p in parameters if p.ndim >= 2)
    return sizes[len(sizes) // 2]


def off_scale_parameters(model: torch.nn.Module, reference: float) -> list[str]:
    """Names of the trainable matrices holding at least one nonzero row more than OFF_SCALE times off `reference`."""
    return [
        name for name, parameter in model.named_parameters()
        if parameter.requires_grad and parameter.ndim >= 2 and bool(_off_scale(_row_rms(parameter.detach()), reference).any())
    ]  # fmt: skip


class SizeScaledRows:
    """AdamW step hooks: remember the watched matrices before the step, then redo each off-scale row's step with
    Adam's normalized update (m̂ / (sqrt(v̂) + eps), from the optimizer's state) times row RMS / reference.

    The step is recomputed rather than the move rescaled: on a row of size 1e3 a move of lr is below float32
    resolution. Works on a sharded parameter's local part: FSDP2 shards dimension 0, so each process holds whole
    rows, and the optimizer state is sharded alike.
    """

    def __init__(self, parameters: list[torch.nn.Parameter], reference: float):
        self.parameters = parameters
        self.reference = reference
        self.before: list[torch.Tensor] = []

    def attach(self, optimizer: torch.optim.AdamW) -> None:
        optimizer.register_step_pre_hook(self._remember)
        optimizer.register_step_post_hook(self._rescale)

    @torch.no_grad()
    def _remember(self, optimizer, args, kwargs) -> None:
        self.before = [_local(p).clone() for p in self.parameters]

    @torch.no_grad()
    def _rescale(self, optimizer: torch.optim.AdamW, args, kwargs) -> None:
        groups = {id(p): group for group in optimizer.param_groups for p in group["params"]}
        for parameter, old in zip(self.parameters, self.before):
            rms = _row_rms(old)
            rows = _off_scale(rms, self.reference)
            if parameter not in optimizer.state or not bool(rows.any()):
                continue
            group, state = groups[id(parameter)], optimizer.state[parameter]
            (beta1, beta2), step = group["betas"], float(state["step"])
            first = _local(state["exp_avg"])[rows] / (1 - beta1**step)
            second = _local(state["exp_avg_sq"])[rows] / (1 - beta2**step)
            factor = (rms[rows] / self.reference).to(old.dtype).view(-1, *[1] * (old.ndim - 1))
            decayed = old[rows] * (1 - group["lr"] * group["weight_decay"])
            _local(parameter)[rows] = decayed - group["lr"] * factor * first / (second.sqrt() + group["eps"])
        self.before = []


def _off_scale(rms: torch.Tensor, reference: float) -> torch.Tensor:
    return (rms > 0) & ((rms < reference / OFF_SCALE) | (rms > reference * OFF_SCALE))


def _row_rms(matrix: torch.Tensor) -> torch.Tensor:
    return _local(matrix).float().flatten(1).pow(2).mean(dim=1).sqrt()


def _local(parameter: torch.Tensor) -> torch.Tensor:
    """The tensor this process holds: a DTensor's local shard, or the plain tensor's data."""
    to_local = getattr(parameter, "to_local", None)
    return to_local() if to_local is not None else parameter.data
