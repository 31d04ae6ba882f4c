"""How far each layer looks back: the attention mass a sliding window would drop, measured on the source itself.

The probabilities are the stock attention module's own (eager attention returns them), read by a forward hook
while the calibration windows pass through the source layer, so nothing here recomputes attention. For a
query at position t a window of W tokens keeps keys t-W+1 .. t (the stock sliding mask); the keys 0 .. t-W are
dropped. Only queries with t >= W lose anything, so the statistics average over those queries and every head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kvshrink.convert.layers import LayerStream


@dataclass(frozen=True)
class LayerReach:
    """What a window of `window` tokens drops in one layer, on the calibration text."""

    layer: int
    beyond_window: float  # mean attention mass on dropped keys, over heads and queries past the window
    worst_head: float  # the same for the head that loses most
    sinks: float  # the part of beyond_window that falls on the first sink tokens of the text

    def report(self) -> dict[str, float | int]:
        return {"layer": self.layer, "mass_beyond_window": round(self.beyond_window, 5),
                "worst_head_mass_beyond_window": round(self.worst_head, 5), "sink_mass_dropped": round(self.sinks, 5)}


def dropped_mass(weights: torch.Tensor, window: int, sink_tokens: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per head, the summed attention mass on keys a `window` drops and on the dropped first `sink_tokens` keys,
    over the queries past the window; and how many queries that is. `weights`: [heads, T, T] probabilities."""
    length = weights.shape[-1]
    if length <= window:
        zeros = torch.zeros(weights.shape[0], dtype=torch.float64)
        return zeros, zeros.clone(), 0
    # row i of the queries past the window is position t = window + i, which drops keys 0 .. i: a lower triangle
    past = weights[:, window:]
    beyond = torch.stack([torch.tril(head).sum(dtype=torch.float64) for head in past]).cpu()
    sinks = torch.stack([torch.tril(head[:, :sink_tokens]).sum(dtype=torch.float64) for head in past]).cpu()
    return beyond, sinks, length - window


class _ReachHook:
    """Accumulates `dropped_mass` of every window an attention module sees."""

    def __init__(self, window: int, sink_tokens: int):
        self.window, self.sink_tokens = window, sink_tokens
        self.beyond = self.sinks = None
        self.queries = 0

    def __call__(self, module: nn.Module, args, output) -> None:
        weights = output[1]
        if weights is None:
            raise RuntimeError("the attention module returned no probabilities: the layer must run eager attention")
        for one in weights:
            beyond, sinks, queries = dropped_mass(one, self.window, self.sink_tokens)
            self.beyond = beyond if self.beyond is None else self.beyond + beyond
            self.sinks = sinks if self.sinks is None else self.sinks + sinks
            self.queries += queries


def measure_and_advance(stream: LayerStream, layer: nn.Module, index: int, window: int, sink_tokens: int) -> LayerReach:
    """Pass the stream's windows through `layer` (a source layer running eager attention, at position `index`)
    and return what a window of `window` tokens would drop there."""
    hook = _ReachHook(window, sink_tokens)
    handle = layer.self_attn.register_forward_hook(hook)
    try:
        stream.run(layer, index)
    finally:
        handle.remove()
    per_head = hook.beyond / max(hook.queries, 1)
    return LayerReach(
        index, float(per_head.mean()), float(per_head.max()), float(hook.sinks.mean() / max(hook.queries, 1))
    )


def evenly_spaced(num_layers: int, count: int, candidates: list[int]) -> list[int]:
    """`count` of `candidates` spread over the depth, the last layer included (Gemma-3: five local, then one
    global); where a spot is not a candidate, the nearest candidate stands in."""
    chosen: list[int] = []
    for spot in sorted({round((i + 1) * num_layers / count) - 1 for i in range(count)}):
        chosen.append(min((c for c in candidates if c not in chosen), key=lambda c: (abs(c - spot), -c)))
    return sorted(chosen)


def most_reaching(reaches: list[LayerReach], count: int, candidates: list[int]) -> list[int]:
    """The `count` candidates whose attention reaches furthest: the most mass beyond the window."""
    return sorted(sorted(candidates, key=lambda index: reaches[index].beyond_window, reverse=True)[:count])


def mean_dropped(reaches: list[LayerReach], full: list[int]) -> float:
    """Attention mass beyond the window, averaged over all layers, when the `full` layers keep everything."""
    return sum(reach.beyond_window for reach in reaches if reach.layer not in full) / len(reaches)
