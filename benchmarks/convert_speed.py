"""How close `convert mha-to-gqa` comes to a plain file copy, and how little memory it holds.

Builds a synthetic random bf16 checkpoint of a named shape in sharded safetensors (tensor by tensor, never the
whole model in memory), then times `cp -r` of the folder against `convert mha-to-gqa --groups G --no-check`
run as a child process, whose peak resident memory is read from the kernel. Prints times and their ratio.

    python benchmarks/convert_speed.py --shape llama2-7b      # 13.5 GB on disk, needs ~45 GB free
    python benchmarks/convert_speed.py --shape llama-1b
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from kvshrink.convert.checkpoint import header_size_bound
from kvshrink.convert.safetensors_io import ShardedSafetensorsWriter

SHAPES = {
    # hidden, layers, heads, kv heads, intermediate, vocab
    "llama2-7b": (4096, 32, 32, 32, 11008, 32000),
    "llama-1b": (2048, 22, 32, 32, 5632, 32000),
    "tiny": (256, 4, 8, 8, 688, 1000),
}


def tensor_shapes(shape: str) -> dict[str, tuple[int, ...]]:
    hidden, layers, heads, kv_heads, intermediate, vocab = SHAPES[shape]
    head_dim = hidden // heads
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for layer in range(layers):
        prefix = f"model.layers.{layer}."
        shapes.update({
            prefix + "input_layernorm.weight": (hidden,),
            prefix + "self_attn.q_proj.weight": (heads * head_dim, hidden),
            prefix + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
            prefix + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
            prefix + "self_attn.o_proj.weight": (hidden, heads * head_dim),
            prefix + "post_attention_layernorm.weight": (hidden,),
            prefix + "mlp.gate_proj.weight": (intermediate, hidden),
            prefix + "mlp.up_proj.weight": (intermediate, hidden),
            prefix + "mlp.down_proj.weight": (hidden, intermediate),
        })  # fmt: skip
    shapes.update({"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)})
    return shapes


def build_checkpoint(shape: str, folder: Path) -> None:
    hidden, layers, heads, kv_heads, intermediate, vocab = SHAPES[shape]
    folder.mkdir(parents=True)
    shapes = tensor_shapes(shape)
    writer = ShardedSafetensorsWriter(folder, 5 * 10**9, header_size_bound(list(shapes)))
    generator = torch.Generator().manual_seed(0)
    for name, dims in tqdm(shapes.items(), desc=f"building {shape}", unit="tensor"):
        writer.add_tensor(name, (torch.randn(dims, generator=generator) * 0.02).to(torch.bfloat16))
    writer.finish()
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "intermediate_size": intermediate, "vocab_size": vocab, "rms_norm_eps": 1e-5, "dtype": "bfloat16",
        "max_position_embeddings": 4096, "tie_word_embeddings": False,
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def timed(command: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of a child process."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed")
    return time.perf_counter() - start, usage.ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-1b")
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--workdir", type=Path, help="where to build (default: a temporary folder, removed after)")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="kvshrink-bench-", dir=args.workdir))
    try:
        source = workdir / "source"
        build_checkpoint(args.shape, source)
        size = sum(f.stat().st_size for f in source.iterdir())
        copy_seconds, _ = timed(["cp", "-r", str(source), str(workdir / "copy")])
        shutil.rmtree(workdir / "copy")
        convert = shutil.which("convert", path=str(Path(os.sys.executable).parent)) or "convert"
        convert_seconds, peak_rss = timed(
            [convert, "mha-to-gqa", "--groups", str(args.groups), "--method", "mean", "--no-check", str(source), str(workdir / "gqa")]
        )
        print(f"shape {args.shape}: {size / 1e9:.2f} GB of bf16 shards, groups {args.groups}")
        print(f"plain copy          {copy_seconds:8.1f} s")
        print(f"convert mha-to-gqa  {convert_seconds:8.1f} s   ratio {convert_seconds / copy_seconds:.2f}x the copy")
        print(f"convert peak RSS    {peak_rss / 2**30:8.2f} GiB")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
