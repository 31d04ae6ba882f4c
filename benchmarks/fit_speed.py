"""Seconds of block-wise fit per converted layer at a model width: what `--fit attention` adds to a conversion.

Builds one converted attention module of the stock class the conversions write (LlamaAttention with 1 KV head
for MQA, 8 for GQA-8; DeepseekV3Attention at 512+64 for MLA) at a named width with random weights, and times the
fit's own loop (`convert/fitting.fit_attention`) on random 512-token windows: the optimizer steps (one forward and
backward of 2 windows each) in fp32 and in bf16 autocast, and one float32 measurement pass over a window. The
per-layer line projects the default fit: 128 steps, 16 fitted windows measured before and after, 2 held-out
windows measured 9 times, and the source attention's outputs on the 32 calibration windows.

    python benchmarks/fit_speed.py [--widths smollm2,1b,7b] [--methods mqa,gqa8,mla] [--steps 6]
"""

from __future__ import annotations

import argparse
import time

import torch

from kvshrink.convert.fitting import AttentionRunner, FitSettings, WindowPairs, fit_attention
from kvshrink.convert.precision import resolved_precision

WIDTHS = {"smollm2": (576, 9), "1b": (2048, 32), "7b": (4096, 32)}  # hidden, query heads (head dim 64 / 128)
WINDOW = 512
DEFAULT_STEPS, MEASURED_WINDOWS, HELDOUT_MEASURES, CALIBRATION_WINDOWS = 128, 2 * 16, 2 * 9, 32


class Tables:
    """The rotary embedding on positions 0..T-1 and no mask (the kernel's causal flag), like AttentionTables."""

    def __init__(self, rotary: torch.nn.Module):
        self.rotary = rotary

    def __call__(self, index: int, hidden: torch.Tensor):
        return self.rotary(hidden, torch.arange(hidden.shape[1])[None]), None


def attention_module(method: str, hidden: int, heads: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    common = {"hidden_size": hidden, "num_attention_heads": heads, "intermediate_size": 4 * hidden,
              "num_hidden_layers": 1, "vocab_size": 1000, "max_position_embeddings": 4096}
    if method == "mla":
        from transformers import DeepseekV3Config
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding

        config = DeepseekV3Config(**common, num_key_value_heads=heads, kv_lora_rank=512, q_lora_rank=None,
                                  qk_rope_head_dim=64, qk_nope_head_dim=hidden // heads, v_head_dim=hidden // heads,
                                  first_k_dense_replace=1)
        config._attn_implementation = "sdpa"
        return DeepseekV3Attention(config, 0), DeepseekV3RotaryEmbedding(config)
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

    config = LlamaConfig(**common, num_key_value_heads={"mqa": 1, "gqa8": 8}[method])
    config._attn_implementation = "sdpa"
    return LlamaAttention(config, 0), LlamaRotaryEmbedding(config)


def seconds_per_step(attention, runner, pairs: WindowPairs, precision: str, steps: int, measure: float) -> float:
    """Seconds of one optimizer step, less the `measure` seconds a window that fit_attention measures before and
    after its steps."""
    parameters = dict(attention.named_parameters())
    for timed_steps in (1, steps):  # the first run warms up kernels and the allocator
        settings = FitSettings(steps=timed_steps, lr=1e-4, micro_batch_size=2, precision=precision)
        start = time.perf_counter()
        fit_attention(attention, parameters, runner, pairs, settings, torch.Generator().manual_seed(0), 0.02)
    return (time.perf_counter() - start - 2 * len(pairs) * measure) / steps


@torch.no_grad()
def seconds_per_measure(attention, runner, pairs: WindowPairs) -> float:
    attention.eval()
    runner(attention, pairs.inputs[0])  # warm-up: kernels and allocator
    start = time.perf_counter()
    for window in pairs.inputs:
        runner(attention, window)
    return (time.perf_counter() - start) / len(pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", default="smollm2,1b,7b")
    parser.add_argument("--methods", default="mqa,gqa8,mla")
    parser.add_argument("--steps", type=int, default=6, help="timed optimizer steps per row")
    args = parser.parse_args()
    auto = resolved_precision("auto", torch.device("cpu"))
    print(f"threads {torch.get_num_threads()}; precision auto on this CPU: {auto}")
    print("width    method  fp32 ms/step  bf16 ms/step  measure ms/window  default fit s/layer (auto)")
    for width in args.widths.split(","):
        hidden, heads = WIDTHS[width]
        generator = torch.Generator().manual_seed(0)
        windows = [torch.randn(WINDOW, hidden, generator=generator) for _ in range(4)]
        pairs = WindowPairs(windows, [torch.randn(WINDOW, hidden, generator=generator) * 0.1 for _ in windows])
        for method in args.methods.split(","):
            if method == "gqa8" and heads % 8:
                continue  # 8 KV heads cannot share SmolLM2's 9 query heads evenly
            torch.manual_seed(0)
            attention, rotary = attention_module(method, hidden, heads)
            runner = AttentionRunner(Tables(rotary), 0)
            measure = seconds_per_measure(attention, runner, pairs)
            step = {p: seconds_per_step(attention, runner, pairs, p, args.steps, measure) for p in ("fp32", "bf16")}
            layer = DEFAULT_STEPS * step[auto] + (MEASURED_WINDOWS + HELDOUT_MEASURES + CALIBRATION_WINDOWS) * measure
            print(f"{width:8} {method:6} {step['fp32'] * 1e3:12.0f} {step['bf16'] * 1e3:13.0f} "
                  f"{measure * 1e3:18.0f} {layer:27.1f}", flush=True)


if __name__ == "__main__":
    main()
