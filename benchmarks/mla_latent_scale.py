"""What an ordinarily scaled MLA latent would cost before training (issue 15, part 2).

    python benchmarks/mla_latent_scale.py --model runs/smollm2-mla [--windows 16 --seq-len 512]

kvshrink's MLA output shrinks the latent rows of kv_a_proj_with_mqa so that kv_a_layernorm is exactly linear
(w·c/sqrt(eps)). The alternative for checkpoints meant to be trained is a latent of ordinary size, where the
norm really normalizes: w·c/rms(c). One constant can then stand in for 1/rms(c) only on average, so per token
the latent read by kv_b_proj is off by rms_typical/rms(c_t). This script builds that variant in memory (latent
rows scaled up to RMS ~1 per token, kv_b_proj scaled by the median per-token latent RMS over the calibration
text, the pydoc train split) and prints the held-out perplexity of both, on the validation blocks uptrain uses.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvshrink.uptrain.data import collect_blocks, documents, token_blocks
    from kvshrink.uptrain.recipe import DataSource
    from kvshrink.uptrain.trainer import validation_perplexity

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    pydoc = DataSource(corpus="pydoc")
    heldout = collect_blocks(
        list(token_blocks(documents(pydoc, "heldout"), tokenizer, args.seq_len, True))[: args.windows], args.seq_len
    )
    train = collect_blocks(
        list(token_blocks(documents(pydoc, "train"), tokenizer, args.seq_len, True))[: args.windows], args.seq_len
    )
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    accelerator = Accelerator(cpu=True)
    linear = validation_perplexity(accelerator, model, heldout, 4)
    rank = model.config.kv_lora_rank
    typical = _median_latent_rms(model, train, rank)
    with torch.no_grad():
        for layer, rms in zip(model.model.layers, typical):
            attention = layer.self_attn
            attention.kv_a_proj_with_mqa.weight[:rank] /= rms  # per-token latent RMS ~1: the norm normalizes
            # was w·c/sqrt(eps); now w·(c/rms)/rms(c/rms) ≈ w·c/rms(c_t): kv_b absorbs rms_typical/sqrt(eps)
            attention.kv_b_proj.weight *= rms / (attention.kv_a_layernorm.variance_epsilon ** 0.5)
    ordinary = validation_perplexity(accelerator, model, heldout, 4)
    print(f"held-out perplexity ({len(heldout)} x {args.seq_len} pydoc tokens): linearized latent {linear:.3f}, "
          f"ordinary latent {ordinary:.3f} ({ordinary / linear:.3f}x); {time.perf_counter() - start:.0f} s")


@torch.no_grad()
def _median_latent_rms(model, blocks, rank: int) -> list[float]:
    """Per layer, the median over calibration tokens of the latent's RMS (the rows kv_a_layernorm reads)."""
    found: dict[int, list[torch.Tensor]] = {}
    handles = [
        layer.self_attn.kv_a_proj_with_mqa.register_forward_hook(
            lambda module, args, out, index=index: found.setdefault(index, []).append(
                out[..., :rank].pow(2).mean(-1).sqrt().flatten()
            )
        )
        for index, layer in enumerate(model.model.layers)
    ]
    for index in range(len(blocks)):
        ids, _ = blocks.batch([index])
        model(input_ids=ids, use_cache=False)
    for handle in handles:
        handle.remove()
    return [float(torch.cat(found[i]).median()) for i in range(len(model.model.layers))]


if __name__ == "__main__":
    main()
