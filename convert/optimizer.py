"""AdamW for the block-wise fit (convert/fitting.py) and uptraining, with updates scaled to the size of rows far
off the model's typical weight size.

Adam moves every weight by about lr per step, whatever its size. MLA conversions keep the latent RMSNorm exactly
linear by shrinking the latent rows of kv_a_proj_with_mqa to ~1e-8 and growing kv_b_proj to match
(convert/mla/latent_norm.py); one plain Adam step at lr 3e-4 multiplies the latent rows ten-thousandfold and
leaves the norm's linear range, while kv_b_proj hardly moves. So a row whose RMS is more than OFF_SCALE times
off the reference (the median RMS of the matrices around it) takes Adam's step times (row RMS / reference):
the same relative change an ordinary weight gets. Every other row takes plain AdamW's step.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

OFF_SCALE = 100.0  # rows this many times smaller or larger than the reference get size-scaled updates


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters, with weight decay on matrices only (norm gains and biases are 1-d); the matrices
    first. A ZeRO-3 partitioned parameter is judged by its whole shape (ds_shape): its own is flat and empty."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    is_matrix = [len(getattr(p, "ds_shape", p.shape)) >= 2 for p in trainable]
    return [
        {"params": [p for p, matrix in zip(trainable, is_matrix) if matrix], "weight_decay": weight_decay},
        {"params": [p for p, matrix in zip(trainable, is_matrix) if not matrix], "weight_decay": 0.0},
    ]


def reference_rms(parameters) -> float:
    """The median RMS of the matrices among `parameters`: the typical weight size, which neither a shrunken
    latent nor its grown partner moves (read before sharding, so every process gets the same number)."""
    sizes = sorted(float(p.detach().float().pow(2).mean().sqrt()) for p in parameters if p.ndim >= 2)
    return sizes[len(sizes) // 2]


def off_scale_parameters(named_parameters: Iterable[tuple[str, torch.nn.Parameter]], reference: float) -> list[str]:
    """Names of the trainable matrices holding at least one nonzero row more than OFF_SCALE times off `reference`."""
    return [
        name for name, parameter in named_parameters
        if parameter.requires_grad and parameter.ndim >= 2
        and bool(off_scale_rows(_row_rms(parameter.detach()), reference).any())
    ]


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
            rows = off_scale_rows(rms, self.reference)
            if parameter not in optimizer.state or not bool(rows.any()):
                continue
            group, state = groups[id(parameter)], optimizer.state[parameter]
            first, second = _local(state["exp_avg"])[rows], _local(state["exp_avg_sq"])[rows]
            factor = (rms[rows] / self.reference).view(-1, *[1] * (old.ndim - 1))
            _local(parameter)[rows] = adam_update(old[rows], first, second, factor, group, int(state["step"]))
        self.before = []


def adam_update(old: torch.Tensor, first: torch.Tensor, second: torch.Tensor, factor: torch.Tensor,
                group: dict[str, Any], step: int) -> torch.Tensor:
    """`old` after AdamW step number `step` of `group` (lr, betas, eps, weight_decay), with Adam's normalized
    update (from the moments `first` and `second`) times `factor`."""
    (beta1, beta2), lr = group["betas"], group["lr"]
    normalized = (first / (1 - beta1**step)) / ((second / (1 - beta2**step)).sqrt() + group["eps"])
    return old * (1 - lr * group["weight_decay"]) - lr * factor.to(old.dtype) * normalized


def off_scale_rows(rms: torch.Tensor, reference: float) -> torch.Tensor:
    """Which rows (by their RMS) are more than OFF_SCALE times off `reference`; all-zero rows are not."""
    return (rms > 0) & ((rms < reference / OFF_SCALE) | (rms > reference * OFF_SCALE))


def _row_rms(matrix: torch.Tensor) -> torch.Tensor:
    return _local(matrix).float().flatten(1).pow(2).mean(dim=1).sqrt()


def _local(parameter: torch.Tensor) -> torch.Tensor:
    """The tensor this process holds: a DTensor's local shard, or the plain tensor's data."""
    to_local = getattr(parameter, "to_local", None)
    return to_local() if to_local is not None else parameter.data
