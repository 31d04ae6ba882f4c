"""What the vLLM serving layout costs on the sources it has to approximate: a Llama with Llama-3.1 RoPE (written as
deepseek_yarn) and a Qwen2 with q/k/v biases (refit into the weights), both the small random test sources
(4 heads x 64, 2 layers, byte-level tokenizer) at 256+64. Prints, per source, the check's perplexities (source,
--target vllm, --target transformers at the same shape) and the approximation's own error. ~1 min on 2 CPU cores.

    python benchmarks/serving_cost.py
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import torch  # noqa: E402
from tiny_checkpoints import save_tiny_checkpoint  # noqa: E402

from kvshrink.convert.mha_to_mla import mha_to_mla  # noqa: E402
from kvshrink.convert.options import MlaOptions  # noqa: E402

LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
SHAPE = dict(hidden_size=256, intermediate_size=128, initializer_range=0.15, max_position_embeddings=512)


def _qwen2_biases(model) -> None:
    generator = torch.Generator().manual_seed(3)
    for layer in model.model.layers:
        for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            projection.bias.normal_(0, 0.3, generator=generator)


def main() -> None:
    sources = {
        "llama, llama3 RoPE": dict(model_type="llama", rope_parameters=LLAMA3),
        "qwen2, q/k/v biases": dict(model_type="qwen2", edit=_qwen2_biases),
    }
    print("| source | source ppl | --target vllm | --target transformers | serving cost | approximation error |")
    print("|---|---|---|---|---|---|")
    for name, layout in sources.items():
        with tempfile.TemporaryDirectory() as folder:
            source = save_tiny_checkpoint(Path(folder) / "source", num_heads=4, num_kv_heads=4, tokenizer=True,
                                          **SHAPE, **layout)
            options = MlaOptions(mla_shape="256+64", calibration_tokens=4096, check_tokens=2048, progress=False)
            report = mha_to_mla(source, Path(folder) / "out", options)
        check = report["check"]
        if "rope_frequency_error" in report["mla"]:
            error = f"rope frequency: max {max(report['mla']['rope_frequency_error']):.1%} per slot"
        else:
            worst = {part: max(layer["bias_refit_error"][part] for layer in report["layers"])
                     for part in ("query", "latent", "rope_key")}
            error = "bias refit, worst layer: " + ", ".join(f"{part} {value:.3f}" for part, value in worst.items())
        print(f"| {name} | {check['source_perplexity']:.3f} | {check['converted_perplexity']:.3f} | "
              f"{check['other_target']['perplexity']:.3f} | {check['serving_perplexity_cost']:+.3f} | {error} |",
              flush=True)


if __name__ == "__main__":
    main()
