"""Calibration statistics: what each layer's attention actually receives when the source reads real text.

The source model runs in its stock transformers class on calibration windows; a hook on every layer's query
projection records its input (the normalized hidden state that feeds q, k and v). Methods get, per layer, the
raw inputs with their positions (for anything RoPE- or attention-dependent) and their second moment.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from kvshrink.convert.check import load_causal_lm, load_tokenizer, token_windows
from kvshrink.convert.families import FamilySpec


@dataclass
class LayerStatistics:
    """Inputs of one layer's attention over the calibration windows."""

    inputs: torch.Tensor  # [windows, seq_len, hidden] float32; position p of a window is RoPE position p

    @property
    def flat_inputs(self) -> torch.Tensor:
        return self.inputs.reshape(-1, self.inputs.shape[-1])

    @property
    def second_moment(self) -> torch.Tensor:
        """E[x xᵀ] over all calibration tokens, float64 [hidden, hidden]."""
        x = self.flat_inputs.double()
        return x.T @ x / x.shape[0]


def collect_statistics(
    folder: Path,
    spec: FamilySpec,
    num_layers: int,
    text: str,
    num_tokens: int = 8192,
    seq_len: int = 512,
    progress: bool = True,
) -> list[LayerStatistics]:
    """Run the source on `num_tokens` tokens of `text` in windows of `seq_len` and keep every layer's inputs."""
    model = load_causal_lm(folder)
    windows = [w for w in token_windows(load_tokenizer(folder), text, num_tokens, seq_len) if w.numel() == seq_len]
    if not windows:
        windows = token_windows(load_tokenizer(folder), text, num_tokens, seq_len)[:1]
    part = "qkv_proj" if spec.fused_qkv else "q_proj"
    captured: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]

    def recorder(layer: int):
        def hook(module, args):
            captured[layer].append(args[0].detach().float().cpu())

        return hook

    handles = [
        model.get_submodule(spec.tensor_name(layer, part).removesuffix(".weight")).register_forward_pre_hook(
            recorder(layer)
        )
        for layer in range(num_layers)
    ]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for window in tqdm(windows, desc="calibrating", unit="window", disable=not progress):
                model(input_ids=window.unsqueeze(0).to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    del model
    return [LayerStatistics(torch.cat(inputs)) for inputs in captured]
