"""The frame every conversion shares: open the source, write the converted folder layer by layer, report.

The driver (`driver.py`) opens a `Conversion` (source read lazily, output staged beside OUT and renamed into place
only when complete), writes each layer through a `LayerWriter` as soon as it is converted (the layer's untouched tensors
copied byte for byte, its new attention tensors written in the source dtype), and ends with `finish`, which
writes config.json, the side files, the model card and kvshrink_report.json. Only one layer's tensors are in
memory at a time.
"""

from __future__ import annotations

import contextlib
import functools
import json
import platform
import re
import resource
import shutil
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvshrink.convert.attention import HeadCounts
from kvshrink.convert.check import load_tokenizer
from kvshrink.convert.checkpoint import SourceCheckpoint, header_size_bound, open_source
from kvshrink.convert.errors import KvshrinkError
from kvshrink.convert.families import FamilySpec, family_for
from kvshrink.convert.kvcache import kv_bytes_per_token
from kvshrink.convert.layers import HeapTrim, StockModel, resolve_device
from kvshrink.convert.maths import SourceRope, read_source_rope
from kvshrink.convert.model_card import REPORT_FILE, write_model_card
from kvshrink.convert.options import ConvertOptions, parse_size
from kvshrink.convert.outdir import atomic_output_dir, check_output_dir
from kvshrink.convert.safetensors_io import ShardedSafetensorsWriter

# target tensor -> the source row ranges it is made of, stacked: a split (Phi-3's fused gate_up_proj for DeepseekV3),
# a fusion ([gate; up] for GraniteMoeHybrid's input_linear) or a rename
Derived = dict[str, tuple[tuple[str, slice], ...]]
ALL_ROWS = slice(None)


def derived_tensor(read: Callable[[str], torch.Tensor], parts: tuple[tuple[str, slice], ...]) -> torch.Tensor:
    """A derived target tensor from its source parts (`read` gives a source tensor by name)."""
    pieces = [read(name)[rows] for name, rows in parts]
    return pieces[0].contiguous() if len(pieces) == 1 else torch.cat(pieces)


_STALE_BUFFERS = re.compile(r"rotary_emb\.inv_freq$")
_FREE_SPACE_MARGIN = 64 * 2**20  # headers, config, tokenizer files


@dataclass
class Conversion:
    """An open source checkpoint and the staging folder its conversion is written into."""

    source: str
    out: Path
    checkpoint: SourceCheckpoint
    spec: FamilySpec
    counts: HeadCounts
    staging: Path
    device: torch.device
    options: ConvertOptions
    started: float

    @property
    def written_dtype(self) -> torch.dtype:
        """The dtype converted tensors are written in: the source's attention weights' (copied ones keep theirs)."""
        return self.checkpoint.dtype(self.spec.tensor_name(0, next(iter(self.spec.attention))))

    @property
    def rms_norm_eps(self) -> float:
        """The source's norm epsilon (transformers' default where the config leaves it out)."""
        return float(self.checkpoint.config.get("rms_norm_eps", 1e-6))

    @functools.cached_property
    def rope(self) -> SourceRope:
        """The source's RoPE, read from its config once per conversion, when first asked for: a conversion that
        never needs it (a mean merge, a sliding window) is never refused over a RoPE transformers cannot build."""
        return read_source_rope(self.checkpoint.config, self.counts.head_dim)

    def source_model(self, attn_implementation: str | None = None) -> StockModel:
        """The source in its stock classes, read one layer at a time (with `attn_implementation` when a method
        must read the attention weights, which only "eager" returns)."""
        config = self.checkpoint.config
        if attn_implementation is not None:
            config = {**config, "attn_implementation": attn_implementation}
        return StockModel(config, self.checkpoint.tensor, set(self.checkpoint.names), self.device, HeapTrim())

    def target_model(self, config: dict[str, Any], derived: Derived | None = None) -> StockModel:
        """The output's stock classes under `config`, reading the source's tensors, or the `derived` ones made of
        their rows (converted attention tensors are passed to `StockModel.layer`)."""
        derived = derived or {}

        def read(name: str) -> torch.Tensor:
            if name in derived:
                return derived_tensor(self.checkpoint.tensor, derived[name])
            return self.checkpoint.tensor(name)

        return StockModel(config, read, set(self.checkpoint.names) | set(derived), self.device, HeapTrim())

    def changed_tensors(self, tensors: dict[str, torch.Tensor]) -> list[str]:
        """Names among `tensors` (full names, float32) that the source lacks or holds with other values."""
        return [name for name, tensor in tensors.items() if not same_as_source(self.checkpoint, name, tensor)]

    def require_tokenizer(self, why: str, alternative: str) -> None:
        """Refuse a source without a tokenizer, saying `why` one is needed and which `alternative` flags avoid it."""
        try:
            load_tokenizer(self.checkpoint.folder)
        except KvshrinkError:
            raise KvshrinkError(
                f"{self.source} has no usable tokenizer (no tokenizer files), and {why}: add the source's tokenizer "
                "files to the folder" + (f", or pass {alternative}" if alternative else "")
            ) from None


def same_as_source(checkpoint: SourceCheckpoint, name: str, tensor: torch.Tensor) -> bool:
    """Whether the source holds `name` with exactly the values of `tensor` (float32)."""
    return name in checkpoint and torch.equal(checkpoint.tensor(name).float(), tensor)


def _refuse_missing_tensors(conversion: Conversion) -> None:
    """Every tensor the attention spec and the stock class need is there, before anything is written."""
    spec, counts, checkpoint = conversion.spec, conversion.counts, conversion.checkpoint
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
    missing = conversion.source_model().missing_tensors()
    if missing:
        raise KvshrinkError(
            f"the checkpoint lacks {missing[0]} (and {len(missing) - 1} more) that its stock class "
            f"{(checkpoint.config.get('architectures') or [spec.model_type])[0]} needs: the download is incomplete, "
            "re-download it"
        )


def _refuse_mla_source(source: str | Path, config: dict[str, Any]) -> None:
    """An MLA checkpoint (what mha-to-mla writes) has no KV heads to merge, no attention to re-factor and no
    sliding window in its stock class."""
    if "kv_lora_rank" in config:
        raise KvshrinkError(
            f"{source} is an MLA checkpoint ({(config.get('architectures') or ['DeepseekV3'])[0]}), which no kvshrink "
            "converter takes as a source: convert (or window) the GQA/MQA or source model it was made from instead"
        )


@contextlib.contextmanager
def open_conversion(source: str | Path, out: str | Path, options: ConvertOptions) -> Iterator[Conversion]:
    """Open `source` and a staging folder for `out`: on success the staging folder becomes `out`, on any error
    (a refusal, Ctrl-C, a full disk) it is deleted and the source is untouched."""
    started = time.perf_counter()
    out = Path(out)
    source_path = Path(source)
    check_output_dir(out, options.overwrite, source_path if source_path.exists() else None, options.break_lock)
    device = resolve_device(options.device)
    try:
        with open_source(source, allow_pickle=options.allow_pickle) as checkpoint:
            _refuse_mla_source(source, checkpoint.config)
            spec = family_for(checkpoint.config)
            counts = HeadCounts.from_config(checkpoint.config)
            with atomic_output_dir(out, options.overwrite, options.break_lock) as staging:
                conversion = Conversion(str(source), out, checkpoint, spec, counts, staging, device, options, started)
                _refuse_missing_tensors(conversion)
                yield conversion
    except OSError as error:
        where = error.filename or out
        raise KvshrinkError(
            f"{error.strerror or error} at {where}: the source must be readable and {out.resolve().parent} needs "
            "room for the output (the source's size at most)"
        ) from None


def _tensor_bytes(model: StockModel, dtype: torch.dtype) -> int:
    """Bytes of every tensor a checkpoint of this stock model holds in `dtype` (tied heads once)."""
    state = model.skeleton.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop(f"{model.path(model.skeleton.get_output_embeddings())}.weight", None)
    return sum(tensor.numel() for tensor in state.values()) * dtype.itemsize


def require_free_space(conversion: Conversion, *targets: StockModel) -> None:
    """Refuse before writing when the output folder's disk cannot hold the outputs (the models in `targets`)."""
    # the written dtype, not the config's: StockModel configs say float32 (the dtype layers compute in)
    needed = sum(_tensor_bytes(target, conversion.written_dtype) + _FREE_SPACE_MARGIN for target in targets)
    free = shutil.disk_usage(conversion.staging).free
    if free < needed:
        raise KvshrinkError(
            f"{conversion.staging.parent} has {free / 1e9:.2f} GB free but the output needs about "
            f"{needed / 1e9:.2f} GB: free some space or choose an output folder on another disk"
        )


def zero_attention_biases(conversion: Conversion, target: StockModel, verbs: tuple[str, str],
                          supplied: Collection[str] = (), consumed: Collection[str] = ()) -> dict[str, torch.Tensor]:
    """Tensors the stock `target` needs that the source lacks: only attention biases, which are zero (adding
    nothing, so the layer computes what the source's does), besides the `supplied` ones the method writes itself.
    Anything else, or a source tensor the class would drop (besides the `consumed` ones its tensors are made of), is
    refused, saying the family cannot be `verbs[0]` ('windowed') there and what `verbs[1]` ('windowing') would drop."""
    needed = set(target.skeleton.state_dict())
    missing = set(target.missing_tensors()) - set(supplied)
    attention = {
        name for layer in range(conversion.counts.num_layers) for name in conversion.spec.attention_tensor_names(layer)
    }
    architecture = target.config.architectures[0]
    if missing - attention or any(not name.endswith(".bias") for name in missing):
        raise KvshrinkError(
            f"the stock class {architecture} needs {sorted(missing)[0]}, which the source cannot supply exactly: this "
            f"family cannot be {verbs[0]} in that class"
        )
    dropped = sorted(name for name in conversion.checkpoint.names
                     if name not in needed and name not in consumed and "rotary_emb" not in name)
    if dropped:
        raise KvshrinkError(
            f"the stock class {architecture} has no place for the source's {dropped[0]} (and {len(dropped) - 1} more): "
            f"{verbs[1]} it there would silently drop them"
        )
    shapes = target.skeleton.state_dict()
    return {name: torch.zeros(shapes[name].shape) for name in sorted(missing)}


class LayerWriter:
    """The converted checkpoint's tensors, written into `folder` as each layer is converted. Source tensors that
    `derived` tensors are made of (target name -> source row ranges) are written as those instead of copied."""

    def __init__(self, conversion: Conversion, folder: Path, derived: Derived | None = None):
        self.checkpoint, self.spec, self.derived = conversion.checkpoint, conversion.spec, derived or {}
        consumed = {name for parts in self.derived.values() for name, _ in parts}
        self.names = [name for name in self.checkpoint.names
                      if not _STALE_BUFFERS.search(name) and name not in consumed]
        self.attention = {name for layer in range(conversion.counts.num_layers)
                          for name in self.spec.attention_tensor_names(layer)}
        self.writer = ShardedSafetensorsWriter(
            folder, parse_size(conversion.options.out_shard_size),
            header_reserve=2 * header_size_bound(self.names + list(self.derived)) + 65536
        )
        self.changed: list[str] = []
        self.dtype = conversion.written_dtype

    def _copy(self, name: str) -> None:
        if name in self.derived:
            self.writer.add_tensor(name, derived_tensor(self.checkpoint.tensor, self.derived[name]))
        elif self.checkpoint.pickled is None:
            self.writer.add_copy(name, self.checkpoint.entries[name])
        else:
            self.writer.add_tensor(name, self.checkpoint.tensor(name))

    def write_layer(self, layer: int, tensors: dict[str, torch.Tensor]) -> None:
        """The layer's converted attention `tensors` (full output names, float32; ones equal to the source's are
        copied byte for byte) and every other tensor of the layer, copied."""
        prefix = self.spec.layer_prefix.format(layer=layer)
        for name in [*self.names, *self.derived]:
            if name.startswith(prefix) and name not in self.attention:
                self._copy(name)
        for name, tensor in tensors.items():
            unchanged = same_as_source(self.checkpoint, name, tensor)
            if unchanged and self.checkpoint.pickled is None:
                self.writer.add_copy(name, self.checkpoint.entries[name])
            else:
                self.writer.add_tensor(name, tensor.to(self.dtype))
            if not unchanged:
                self.changed.append(name)

    def finish(self, num_layers: int) -> list[str]:
        """Copy the tensors outside the decoder layers, close the shards; returns the names the conversion created
        or changed."""
        prefixes = tuple(self.spec.layer_prefix.format(layer=layer) for layer in range(num_layers))
        for name in [*self.names, *self.derived]:
            if not name.startswith(prefixes):
                self._copy(name)
        self.writer.finish()
        return self.changed


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    from kvshrink.convert import __version__

    return {
        "kvshrink": __version__,
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "python": platform.python_version(),
    }


def peak_memory(device: torch.device) -> dict[str, float]:
    """The process's peak resident memory (and the GPU's peak allocation when it ran there), in GiB."""
    peak = {"peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}
    if device.type == "cuda":
        peak["peak_cuda_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    return peak


def write_metadata(conversion: Conversion, config: dict[str, Any], folder: Path) -> None:
    """config.json and the source's tokenizer, chat template and generation files, beside the weights in `folder`."""
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for side_file in conversion.checkpoint.side_files():
        shutil.copy2(side_file, folder / side_file.name)


def finish(
    conversion: Conversion, *, method: str, config: dict[str, Any], summary: dict[str, Any],
    layers: list[dict[str, Any]], new_parameters: list[str], check: dict[str, Any] | None,
) -> dict[str, Any]:
    """Write kvshrink_report.json and the model card (README.md) into the staging folder; return the report."""
    checkpoint = conversion.checkpoint
    kv = {"source": kv_bytes_per_token(checkpoint.config), "target": kv_bytes_per_token(config)}
    report = {
        "source": conversion.source,
        "method": method,
        "source_architecture": (checkpoint.config.get("architectures") or [None])[0],
        "target_architecture": (config.get("architectures") or [None])[0],
        "source_heads": {"query": conversion.counts.num_heads, "kv": conversion.counts.num_kv_heads},
        **summary,
        "kv_bytes_per_token": kv,
        "kv_fraction": kv["target"] / kv["source"],
        "layers": layers,
        "new_parameters": new_parameters,
        "runtime": {"device": str(conversion.device), "dtype": "float32", **peak_memory(conversion.device)},
        "versions": _versions(),
    }
    if check is not None:
        report["check"] = check
    report["elapsed_seconds"] = round(time.perf_counter() - conversion.started, 2)
    (conversion.staging / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    write_model_card(report, conversion.staging, str(conversion.out))
    return report
