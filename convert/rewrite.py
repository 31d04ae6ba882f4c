"""The one streaming pass every conversion shares: source checkpoint in, converted folder out.

Tensors are visited in the source's order. The first attention tensor of a layer triggers that layer's
conversion (read as float32, transformed, written back in the source dtype); every other tensor is copied
byte for byte. Only one layer's attention and one tensor's bytes are in memory at a time.
"""

from __future__ import annotations

import json
import platform
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from kvshrink.convert.attention import AttentionWeights, HeadCounts, attention_tensors, read_attention
from kvshrink.convert.check import load_tokenizer
from kvshrink.convert.checkpoint import SourceCheckpoint, header_size_bound, open_source
from kvshrink.convert.errors import KvshrinkError
from kvshrink.convert.families import FamilySpec, family_for
from kvshrink.convert.kvcache import kv_bytes_per_token
from kvshrink.convert.outdir import atomic_output_dir, check_output_dir
from kvshrink.convert.safetensors_io import ShardedSafetensorsWriter

REPORT_FILE = "kvshrink_report.json"
_STALE_BUFFERS = re.compile(r"rotary_emb\.inv_freq$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB' or a plain byte count -> bytes (decimal units, like transformers)."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(text)
    if not match or float(match.group(1)) <= 0:
        raise KvshrinkError(f"shard size {text!r} is not a size: use a form like 5GB, 500MB or 1000000")
    unit = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}[match.group(2).upper()]
    return int(float(match.group(1)) * unit)


@dataclass
class LayerOutput:
    tensors: dict[str, torch.Tensor]  # full output names, float32
    report: dict[str, Any]


@dataclass
class Rewrite:
    """What a method does to a checkpoint: the new config and how each layer's attention is rewritten."""

    method: str
    config: dict[str, Any]
    convert_layer: Callable[[int, AttentionWeights], LayerOutput]
    rename: Callable[[str], str] = lambda name: name
    # Non-attention tensors the target splits by rows (Phi-3's gate_up_proj): source name -> {new name: rows}.
    split_rows: dict[str, dict[str, slice]] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class ConversionContext:
    """What a method sees when it plans its rewrite."""

    checkpoint: SourceCheckpoint
    spec: FamilySpec
    counts: HeadCounts
    source: str


def _layer_of(spec: FamilySpec, counts: HeadCounts) -> dict[str, int]:
    return {name: layer for layer in range(counts.num_layers) for name in spec.attention_tensor_names(layer)}


def write_weights(
    context: ConversionContext, rewrite: Rewrite, out: Path, max_shard_bytes: int, progress: bool
) -> tuple[list[dict[str, Any]], list[str]]:
    """Stream every tensor into `out`; returns the per-layer reports and the names the method created or changed."""
    checkpoint, spec, counts = context.checkpoint, context.spec, context.counts
    layer_of = _layer_of(spec, counts)
    missing = [
        spec.tensor_name(layer, part)
        for layer in range(counts.num_layers)
        for part in spec.attention
        if spec.tensor_name(layer, part) not in checkpoint
    ]
    if missing:
        raise KvshrinkError(
            f"the checkpoint lacks {missing[0]} (and {len(missing) - 1} more attention tensors) that the "
            f"{spec.model_type} spec expects: re-download it, or check that model_type matches the weights"
        )
    names = [name for name in checkpoint.names if not _STALE_BUFFERS.search(name)]
    writer = ShardedSafetensorsWriter(out, max_shard_bytes, header_reserve=2 * header_size_bound(names) + 65536)
    reports: list[dict[str, Any]] = []
    changed: list[str] = []
    done_layers: set[int] = set()
    for name in tqdm(names, desc="converting", unit="tensor", disable=not progress):
        layer = layer_of.get(name)
        if layer is None and name in rewrite.split_rows:
            tensor = checkpoint.tensor(name)
            for new_name, rows in rewrite.split_rows[name].items():
                writer.add_tensor(new_name, tensor[rows].contiguous())
            continue
        if layer is None:
            if checkpoint.pickled is None:
                writer.add_copy(rewrite.rename(name), checkpoint.entries[name])
            else:
                writer.add_tensor(rewrite.rename(name), checkpoint.tensor(name))
            continue
        if layer in done_layers:
            continue
        done_layers.add(layer)
        dtype = checkpoint.dtype(name)
        attention = read_attention(checkpoint, spec, layer, counts)
        source_tensors = attention_tensors(attention, spec, layer)
        result = rewrite.convert_layer(layer, attention)
        for out_name, tensor in result.tensors.items():
            unchanged = out_name in source_tensors and torch.equal(source_tensors[out_name], tensor)
            if unchanged and checkpoint.pickled is None:
                writer.add_copy(out_name, checkpoint.entries[out_name])
            else:
                writer.add_tensor(out_name, tensor.to(dtype))
            if not unchanged:
                changed.append(out_name)
        reports.append({"layer": layer, **result.report})
    writer.finish()
    return reports, changed


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    from kvshrink.convert import __version__

    return {
        "kvshrink": __version__,
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "python": platform.python_version(),
    }


def run_conversion(
    source: str | Path,
    out: str | Path,
    plan: Callable[[ConversionContext], Rewrite],
    *,
    overwrite: bool = False,
    out_shard_size: str | int = "5GB",
    allow_pickle: bool = False,
    check: Callable[[Path, Path], dict[str, Any]] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Convert `source` into the folder `out` with the rewrite `plan` makes; returns the report it writes."""
    started = time.perf_counter()
    out = Path(out)
    max_shard_bytes = parse_size(out_shard_size)
    source_path = Path(source)
    check_output_dir(out, overwrite, source_path if source_path.exists() else None)
    with open_source(source, allow_pickle=allow_pickle) as checkpoint:
        spec = family_for(checkpoint.config)
        context = ConversionContext(checkpoint, spec, HeadCounts.from_config(checkpoint.config), str(source))
        if check is not None:
            load_tokenizer(checkpoint.folder)  # fail before converting, not after
        rewrite = plan(context)
        with atomic_output_dir(out, overwrite) as staging:
            layer_reports, new_parameters = write_weights(context, rewrite, staging, max_shard_bytes, progress)
            (staging / "config.json").write_text(json.dumps(rewrite.config, indent=2) + "\n")
            for side_file in checkpoint.side_files():
                shutil.copy2(side_file, staging / side_file.name)
            report = {
                "source": str(source),
                "method": rewrite.method,
                "source_architecture": (checkpoint.config.get("architectures") or [None])[0],
                "target_architecture": (rewrite.config.get("architectures") or [None])[0],
                "source_heads": {"query": context.counts.num_heads, "kv": context.counts.num_kv_heads},
                **rewrite.summary,
                "kv_bytes_per_token": {
                    "source": kv_bytes_per_token(checkpoint.config),
                    "target": kv_bytes_per_token(rewrite.config),
                },
                "layers": layer_reports,
                "new_parameters": new_parameters,
                "versions": _versions(),
            }
            report["kv_fraction"] = report["kv_bytes_per_token"]["target"] / report["kv_bytes_per_token"]["source"]
            if check is not None:
                report["check"] = check(checkpoint.folder, staging)
            report["elapsed_seconds"] = round(time.perf_counter() - started, 2)
            (staging / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report
