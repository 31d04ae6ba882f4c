"""How close the conversions come to a plain file copy, and how little memory they hold.

Builds a synthetic random bf16 checkpoint of a named shape in sharded safetensors (tensor by tensor, never the
whole model in memory), then times `cp -r` of the folder against conversions run as child processes, whose peak
resident memory is read from the kernel. Prints times, their ratio to the copy, and peak RSS.

Mode `io` (default) times `convert mha-to-gqa --groups G --method mean --no-check`: the streaming IO path alone.
Mode `forward` times one calibration pass (every layer streamed over the calibration tokens) against a
whole-model forward of the same tokens in stock transformers (the model must fit in memory whole).
Mode `default` runs each converter's DEFAULT command (calibrated method, --check): `convert mha-to-gqa --groups G`
and `convert mha-to-mla --mla-shape 512+64`. Its checkpoints carry SmolLM2's tokenizer (from `--tokenizer`, a
folder made by `kvshrink example smollm2`) and a 49,152-token vocabulary so calibration text tokenizes; the
token counts (--calibration-tokens, --check-tokens) are printed and the same in every row.

    python benchmarks/convert_speed.py --shape llama2-7b                   # 13.5 GB on disk, needs ~45 GB free
    python benchmarks/convert_speed.py --shape llama-1b --mode forward --tokenizer runs/smollm2
    python benchmarks/convert_speed.py --shape llama2-7b-2l --mode default --tokenizer runs/smollm2
    python benchmarks/convert_speed.py --shape 70b-slice-4 --mode default --tokenizer runs/smollm2 --groups 1 \
        --calibration-tokens 512 --check-tokens 512   # 8 KV heads already: --groups 8 would merge nothing
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
    "llama2-7b-2l": (4096, 2, 32, 32, 11008, 32000),  # Llama-2-7B width, 2 layers (memory does not grow with depth)
    "llama-1b": (2048, 22, 32, 32, 5632, 32000),
    "70b-slice-4": (8192, 4, 64, 8, 28672, 32000),  # a Llama-2/3-70B-width slice, 4 layers
    "70b-slice-8": (8192, 8, 64, 8, 28672, 32000),
    "tiny": (256, 4, 8, 8, 688, 1000),
}
TOKENIZER_VOCAB = 49152  # SmolLM2's, so its tokenizer's ids index the embeddings
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def tensor_shapes(shape: str, vocab: int) -> dict[str, tuple[int, ...]]:
    hidden, layers, heads, kv_heads, intermediate, _ = SHAPES[shape]
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
        })
    shapes.update({"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)})
    return shapes


def build_checkpoint(shape: str, folder: Path, tokenizer: Path | None = None) -> None:
    hidden, layers, heads, kv_heads, intermediate, vocab = SHAPES[shape]
    vocab = TOKENIZER_VOCAB if tokenizer else vocab
    folder.mkdir(parents=True)
    shapes = tensor_shapes(shape, vocab)
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
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for name in TOKENIZER_FILES if tokenizer else ():
        if (tokenizer / name).exists():
            shutil.copy(tokenizer / name, folder / name)


def timed(command: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of a child process."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed")
    return time.perf_counter() - start, usage.ru_maxrss * 1024


def converter(name: str) -> str:
    return shutil.which(name, path=str(Path(os.sys.executable).parent)) or name


def calibration_speed(source: Path, tokens: int) -> tuple[float, float]:
    """(streamed, whole-model) tokens/s of one pass of the source over `tokens` calibration tokens."""
    from kvshrink.convert.calibration import calibration_windows
    from kvshrink.convert.checkpoint import open_source
    from kvshrink.convert.corpora import calibration_text
    from kvshrink.convert.layers import HeapTrim, LayerStream, StockModel

    windows = calibration_windows(source, calibration_text(None), tokens)
    count = sum(window.numel() for window in windows)
    with open_source(source) as checkpoint:
        model = StockModel.of_checkpoint(checkpoint, torch.device("cpu"), HeapTrim())  # as the converters run
        start = time.perf_counter()
        stream = LayerStream(model, windows)
        for index in range(model.num_layers):
            stream.run(model.layer(index), index)
        streamed = count / (time.perf_counter() - start)
    return streamed, count / whole_model_seconds(source, windows)


def whole_model_seconds(source: Path, windows: list[torch.Tensor]) -> float:
    """Seconds of one whole-model forward of the source over `windows`, as stock transformers runs it."""
    from kvshrink.convert.check import load_causal_lm

    whole_model = load_causal_lm(source, "cpu")
    start = time.perf_counter()
    with torch.no_grad():
        for window in windows:
            whole_model.model(input_ids=window[None], use_cache=False)
    return time.perf_counter() - start


def io_mode(args, workdir: Path, source: Path, copy_seconds: float) -> None:
    seconds, peak_rss = timed([converter("convert"), "mha-to-gqa", "--groups", str(args.groups), "--method", "mean",
                               "--no-check", str(source), str(workdir / "gqa")])
    print(f"convert mha-to-gqa  {seconds:8.1f} s   ratio {seconds / copy_seconds:.2f}x the copy")
    print(f"convert peak RSS    {peak_rss / 2**30:8.2f} GiB")


def default_mode(args, workdir: Path, source: Path, copy_seconds: float) -> None:
    tokens = ["--calibration-tokens", str(args.calibration_tokens), "--check-tokens", str(args.check_tokens)]
    if args.fit_steps is not None:  # the fit's memory does not depend on its steps; its time is linear in them
        tokens += ["--fit-steps", str(args.fit_steps)]
    print(f"default commands with {args.calibration_tokens} calibration and {args.check_tokens} check tokens"
          + (f", {args.fit_steps} fit steps a layer" if args.fit_steps is not None else ""))
    for name, command in (("mha-to-gqa", ["mha-to-gqa", "--groups", str(args.groups)]),
                          ("mha-to-mla", ["mha-to-mla", "--mla-shape", "512+64"])):
        out = workdir / name
        seconds, peak_rss = timed([converter("convert"), *command, *tokens, str(source), str(out)])
        print(f"convert {' '.join(command):30s} {seconds:8.1f} s   {seconds / copy_seconds:6.2f}x the copy   "
              f"peak RSS {peak_rss / 2**30:6.2f} GiB", flush=True)
        shutil.rmtree(out)


def forward_mode(args, workdir: Path, source: Path, copy_seconds: float) -> None:
    streamed, whole = calibration_speed(source, args.calibration_tokens)
    print(f"calibration pass over {args.calibration_tokens} tokens: streamed {streamed:.0f} tokens/s, whole-model "
          f"forward {whole:.0f} tokens/s (ratio {streamed / whole:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-1b")
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--mode", choices=["io", "default", "forward"], default="io")
    parser.add_argument("--tokenizer", type=Path, help="folder with SmolLM2's tokenizer files (mode default)")
    parser.add_argument("--calibration-tokens", type=int, default=1024)
    parser.add_argument("--check-tokens", type=int, default=512)
    parser.add_argument("--fit-steps", type=int, help="mode default: the converters' --fit-steps (default: theirs)")
    parser.add_argument("--workdir", type=Path, help="where to build (default: a temporary folder, removed after)")
    args = parser.parse_args()
    if args.mode != "io" and args.tokenizer is None:
        parser.error(f"--mode {args.mode} needs --tokenizer DIR (kvshrink example smollm2 DIR)")
    workdir = Path(tempfile.mkdtemp(prefix="kvshrink-bench-", dir=args.workdir))
    try:
        source = workdir / "source"
        build_checkpoint(args.shape, source, args.tokenizer if args.mode != "io" else None)
        size = sum(f.stat().st_size for f in source.iterdir())
        copy_seconds, _ = timed(["cp", "-r", str(source), str(workdir / "copy")])
        shutil.rmtree(workdir / "copy")
        print(f"shape {args.shape}: {size / 1e9:.2f} GB of bf16 shards, groups {args.groups}")
        print(f"plain copy          {copy_seconds:8.1f} s", flush=True)
        {"io": io_mode, "default": default_mode, "forward": forward_mode}[args.mode](
            args, workdir, source, copy_seconds
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
