"""Calibration: what each layer's attention receives when the source reads real text, one layer at a time.

The calibration windows' hidden states stand at the input of one decoder layer at a time (`layers.LayerStream`).
`attention_inputs(layer)` runs that layer's stock module up to its attention's first projection and returns what it
received (the normalized hidden state that feeds q, k and v) as a value; the caller converts the layer, then
`advance`s the windows through the source layer, or through the converted one (error feedback: the next
layer is calibrated on what the converted model really computes, as GPTQ does).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kvshrink.convert.check import load_tokenizer, token_windows
from kvshrink.convert.families import FamilySpec
from kvshrink.convert.layers import AttentionTables, LayerStream, StockModel

CALIBRATION_WINDOW = 512


@dataclass
class AttentionInputs:
    """Inputs of one layer's attention over the calibration windows."""

    inputs: torch.Tensor  # [windows, seq_len, hidden] float32; position p of a window is RoPE position p

    @property
    def flat_inputs(self) -> torch.Tensor:
        return self.inputs.reshape(-1, self.inputs.shape[-1])


def calibration_windows(
    folder: Path, text: str, num_tokens: int, seq_len: int = CALIBRATION_WINDOW
) -> list[torch.Tensor]:
    """Full windows of `seq_len` tokens from the first `num_tokens` tokens of `text` (one shorter window when
    the text is shorter than a window)."""
    windows = token_windows(load_tokenizer(folder), text, num_tokens, seq_len)
    full = [window for window in windows if window.numel() == seq_len]
    return full or windows[:1]


class Calibration:
    """The calibration windows of `model` (the source), standing at one decoder layer's input at a time."""

    def __init__(self, model: StockModel, spec: FamilySpec, windows: list[torch.Tensor]):
        self.model = model
        self.stream = LayerStream(model, windows)
        self.projection = spec.attention["qkv_proj" if spec.fused_qkv else "q_proj"]

    @property
    def tokens(self) -> int:
        return sum(window.ids.numel() for window in self.stream.windows)

    def attention_inputs(self, layer: int) -> AttentionInputs:
        """What the attention of the source's layer `layer` receives from the windows standing before it (the
        layer runs only up to its attention's first projection, and is dropped)."""
        inputs = self.stream.inputs_of(self.model.layer(layer), layer, self.projection)
        return AttentionInputs(torch.stack(inputs).cpu())

    def advance(self, layer: int, converted: nn.Module | None = None, owner: StockModel | None = None) -> None:
        """Move the windows past layer `layer`: through the source's layer, or through the `converted` one (error
        feedback; `owner` is then the converted model, whose rotary tables and masks it runs with)."""
        if converted is None:
            self.stream.run(self.model.layer(layer), layer)
        else:  # one layer's tables: the windows share one length, so they are built once and used by every window
            self.stream.run(converted, layer, AttentionTables(owner))
