"""`eval kv`: bytes held per token measured from the real cache object, and decode speed, per context length.

For each model and context length: prefill a deterministic random prompt in chunks into a DynamicCache, add
up the bytes of every tensor the cache holds (so what is measured is what the stock class really stores —
K and V heads for MHA/GQA, the compressed latent and shared rope key for DeepseekV3 MLA, only the window for
sliding-window layers, a Mamba-2 layer's conv and recurrent state whatever the length), divide by the context, then
time greedy one-token decode steps on top of that cache.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from kvshrink.convert.errors import KvshrinkError
from kvshrink.convert.kvcache import LONG_CONTEXTS, kv_bytes_at_context
from kvshrink.eval.models import ModelFolder, check_model_dirs, default_device, load_model

GPU_CONTEXTS = (2048, *LONG_CONTEXTS)  # the lengths the other reports compare bytes held at
CPU_CONTEXTS = (512, 2048)  # a CPU prefills 32K tokens in minutes per model
PREFILL_CHUNK = 512
WARMUP_STEPS = 2


@dataclass(frozen=True)
class KvMeasurement:
    model: str
    context: int
    bytes_held_per_token: float  # the cache object's tensors (KV cache + recurrent state) over the context
    bytes_held_per_token_from_config: float  # what the config says the cache holds at this context
    decode_tokens_per_second: float


def default_contexts(device: str, folders: Sequence[ModelFolder], decode_tokens: int) -> tuple[int, ...]:
    """The device's default lengths, each cut to what every model's max_position_embeddings leaves room for after
    the decode steps (SmolLM2's 8,192 positions: 8,158 with 32 decode steps), duplicates dropped."""
    defaults = CPU_CONTEXTS if device == "cpu" else GPU_CONTEXTS
    limits = [int(folder.config.get("max_position_embeddings") or 0) for folder in folders]
    if not any(limits):
        return defaults
    room = min(limit for limit in limits if limit) - WARMUP_STEPS - decode_tokens
    return tuple(sorted({min(context, room) for context in defaults})) if room > 0 else defaults


def cache_bytes(cache) -> int:
    """Bytes held by a transformers Cache: every attention layer's keys and values, and every recurrent layer's conv
    and state tensors (a GraniteMoeHybrid Mamba-2 layer's LinearAttentionLayer keeps them by state index)."""
    import torch

    tensors = []
    for layer in cache.layers:
        tensors += [getattr(layer, "keys", None), getattr(layer, "values", None)]
        for states in (getattr(layer, "conv_states", None), getattr(layer, "recurrent_states", None)):
            tensors += list((states or {}).values())
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors if isinstance(tensor, torch.Tensor))


def _synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _measure_one(model, folder: ModelFolder, context: int, decode_tokens: int, device: str) -> KvMeasurement:
    import torch
    from transformers import DynamicCache

    generator = torch.Generator().manual_seed(context)
    prompt = torch.randint(0, model.config.vocab_size, (1, context), generator=generator).to(device)
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        for chunk in prompt.split(PREFILL_CHUNK, dim=1):
            logits = model(chunk, past_key_values=cache, use_cache=True).logits
        measured = cache_bytes(cache) / context
        next_token = logits[:, -1:].argmax(-1)
        for step in range(WARMUP_STEPS + decode_tokens):
            if step == WARMUP_STEPS:
                _synchronize(device)
                start = time.perf_counter()
            next_token = model(next_token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        _synchronize(device)
        elapsed = time.perf_counter() - start
    return KvMeasurement(folder.label, context, measured, kv_bytes_at_context(folder.config, context),
                        decode_tokens / elapsed)


def measure_kv(
    models: Sequence[str | Path],
    contexts: Sequence[int] | None = None,
    *,
    decode_tokens: int = 32,
    device: str | None = None,
) -> list[KvMeasurement]:
    """Measured bytes held per token and decode tokens/s for every model at every context length (by default the
    device's lengths that fit every model's max_position_embeddings)."""
    folders = check_model_dirs(list(models))
    device = device or default_device()
    contexts = tuple(contexts) if contexts else default_contexts(device, folders, decode_tokens)
    if any(context < 1 for context in contexts) or decode_tokens < 1:
        raise KvshrinkError("context lengths and --decode-tokens must be positive integers")
    for folder in folders:
        limit = folder.config.get("max_position_embeddings")
        if limit and max(contexts) + WARMUP_STEPS + decode_tokens > limit:
            raise KvshrinkError(
                f"context {max(contexts)} plus {WARMUP_STEPS + decode_tokens} decode steps exceeds "
                f"{folder.label}'s max_position_embeddings {limit}: pass shorter --contexts"
            )
    measurements = []
    with tqdm(total=len(folders) * len(contexts), desc="kv cache", unit="run") as progress:
        for folder in folders:
            model = load_model(folder, device)
            for context in contexts:
                measurements.append(_measure_one(model, folder, context, decode_tokens, device))
                progress.update()
            del model
    return measurements


def kv_table(measurements: list[KvMeasurement]) -> str:
    """Aligned text table, ratios against the first model at the same context length."""
    base = {m.context: m for m in measurements if m.model == measurements[0].model}
    header = ["model", "context", "bytes held/token", "from config", "vs base", "decode tok/s", "vs base"]
    lines = [
        [
            m.model,
            str(m.context),
            f"{m.bytes_held_per_token:,.0f}",
            f"{m.bytes_held_per_token_from_config:,.0f}",
            f"{m.bytes_held_per_token / base[m.context].bytes_held_per_token:.3f}×",
            f"{m.decode_tokens_per_second:.1f}",
            f"{m.decode_tokens_per_second / base[m.context].decode_tokens_per_second:.2f}×",
        ]
        for m in sorted(measurements, key=lambda m: m.context)
    ]
    widths = [max(len(cell) for cell in column) for column in zip(header, *lines)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in [header, *lines])
