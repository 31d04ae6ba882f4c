"""The post-conversion check: perplexity of the source and of the converted model on the same text.

`load_causal_lm` and `perplexity` run a whole model at once: the reference the streamed check is tested against,
and what the benchmarks use on small models."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from kvshrink.convert.errors import KvshrinkError


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_causal_lm(folder: Path, device: str | None = None):
    """A model folder in its stock transformers class, float32 on CPU (bf16 is slow there), eval mode."""
    from transformers import AutoModelForCausalLM

    device = device or default_device()
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=False)
    return model.to(device).eval()


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError, TypeError):
        raise KvshrinkError(
            f"{folder} has no usable tokenizer, so the perplexity check cannot run: add tokenizer files or pass "
            "--no-check"
        ) from None


def token_windows(tokenizer, text: str, max_tokens: int, window: int) -> list[torch.Tensor]:
    """Non-overlapping windows of `window` tokens covering the first `max_tokens` tokens of `text`."""
    ids = tokenizer(text[: max_tokens * 12], return_tensors="pt", add_special_tokens=False).input_ids[0][:max_tokens]
    if ids.numel() < 2:
        raise KvshrinkError("the calibration text is empty after tokenization: pass a longer --calibration file")
    return [
        ids[start : start + window] for start in range(0, ids.numel(), window)
        if ids[start : start + window].numel() > 1
    ]


@torch.no_grad()
def perplexity(model, windows: list[torch.Tensor], desc: str = "perplexity", progress: bool = True) -> float:
    """exp(mean next-token loss) over all predicted tokens of all windows."""
    device = next(model.parameters()).device
    total_loss, total_tokens = 0.0, 0
    for window in tqdm(windows, desc=desc, unit="window", disable=not progress, leave=False):
        input_ids = window.unsqueeze(0).to(device)
        logits = model(input_ids=input_ids, use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], input_ids[0, 1:], reduction="sum")
        total_loss += float(loss)
        total_tokens += input_ids.shape[1] - 1
    return math.exp(total_loss / total_tokens)


def compare_perplexity(
    tokenizer_folder: Path, models: dict[str, Path], text: tuple[str, str], max_tokens: int, device: torch.device,
    window: int = 512, progress: bool = True,
) -> dict[str, Any]:
    """Perplexity of each model folder (label -> folder) over the same token windows of `text` ((text, what it is),
    e.g. corpora.check_text's), each run one stock layer at a time (equal to the whole-model perplexity, in a
    fraction of its memory)."""
    windows = token_windows(load_tokenizer(tokenizer_folder), text[0], max_tokens, window)
    result: dict[str, Any] = {"tokens": sum(w.numel() for w in windows), "window": window, "text": text[1]}
    for label, folder in models.items():
        result[f"{label}_perplexity"] = folder_perplexity(
            folder, windows, device, f"check {label}" if progress else None
        )
    return result


def folder_perplexity(
    folder: Path, windows: list[torch.Tensor], device: torch.device, desc: str | None = None
) -> float:
    """Perplexity of the model in `folder`, streamed layer by layer, rounded for reports."""
    from kvshrink.convert.checkpoint import open_source
    from kvshrink.convert.layers import HeapTrim, StockModel, stream_perplexity

    with open_source(folder) as checkpoint:
        model = StockModel.of_checkpoint(checkpoint, device, HeapTrim())
        return round(stream_perplexity(model, windows, desc), 4)
