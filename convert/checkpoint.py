"""Source checkpoints: a local Hugging Face folder, a hub id, or a GGUF file, read lazily tensor by tensor."""

from __future__ import annotations

import copy

import contextlib
import json
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvshrink.convert.errors import KvshrinkError
from kvshrink.convert.safetensors_io import TensorEntry, read_header, read_tensor

# Files a converted folder keeps from its source, besides config.json and the weights.
SIDE_FILE_PATTERNS = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "*.model",
    "*.tiktoken",
    "chat_template.*",
    "generation_config.json",
    "preprocessor_config.json",
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_PICKLE_HINT = "pass --allow-pickle to load it with torch.load(weights_only=True), or convert it to safetensors"


def _all_finite(tensor: torch.Tensor) -> bool:
    """Whether no element is NaN or inf. A NaN or inf element makes the sum NaN or inf, so a finite sum (a fast
    vectorized reduction, several times cheaper than isfinite on bf16) settles it; only a non-finite sum, which a
    float16 sum of large finite values can also give, needs the element-wise check."""
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


@dataclass
class SourceCheckpoint:
    """A checkpoint folder whose tensors are read one at a time, never all at once."""

    folder: Path
    config: dict[str, Any]
    entries: dict[str, TensorEntry]  # safetensors sources
    pickled: dict[str, torch.Tensor] | None = None  # opt-in .bin sources, memory-mapped

    @property
    def names(self) -> list[str]:
        return list(self.pickled if self.pickled is not None else self.entries)

    def __contains__(self, name: str) -> bool:
        return name in (self.pickled if self.pickled is not None else self.entries)

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor, refused when it holds NaN or inf: a conversion must not turn corrupt values into a model."""
        tensor = self.pickled[name] if self.pickled is not None else read_tensor(self.entries[name])
        if tensor.is_floating_point() and not _all_finite(tensor):
            raise KvshrinkError(
                f"tensor {name} in {self.folder} holds NaN or inf values: the checkpoint is corrupt, re-download or "
                "repair it"
            )
        return tensor

    def dtype(self, name: str) -> torch.dtype:
        if self.pickled is not None:
            return self.pickled[name].dtype
        return self.entries[name].torch_dtype

    def side_files(self) -> list[Path]:
        found = {path for pattern in SIDE_FILE_PATTERNS for path in self.folder.glob(pattern) if path.is_file()}
        return sorted(found)


def stock_config(config: dict[str, Any]):
    """The transformers config class `config` (a config.json as a dict) describes, built from a copy: transformers
    standardizes nested RoPE dicts in place, which would silently edit the caller's config."""
    from transformers import AutoConfig

    return AutoConfig.for_model(**copy.deepcopy(config))


def _read_config(folder: Path) -> dict[str, Any]:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise KvshrinkError(f"{folder} has no config.json: pass a Hugging Face model folder, hub id or .gguf file")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise KvshrinkError(f"{config_file} is not valid JSON ({error}): fix or re-download it") from None


def _safetensors_entries(folder: Path) -> dict[str, TensorEntry] | None:
    index_file = folder / "model.safetensors.index.json"
    if index_file.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index_file.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError):
            raise KvshrinkError(f"{index_file} is not a valid safetensors index: re-download it") from None
        headers: dict[str, dict[str, TensorEntry]] = {}
        entries = {}
        for name, file_name in weight_map.items():
            shard = folder / file_name
            if file_name not in headers:
                if not shard.is_file():
                    raise KvshrinkError(f"{index_file} names shard {file_name}, which is missing: re-download it")
                headers[file_name] = read_header(shard)
            if name not in headers[file_name]:
                raise KvshrinkError(
                    f"{index_file} says tensor {name} is in {file_name}, but that shard lacks it: "
                    "the checkpoint is incomplete, re-download it"
                )
            entries[name] = headers[file_name][name]
        return entries
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    entries = {}
    for file in files:
        entries.update(read_header(file))
    return entries


def _pickled_tensors(folder: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    index_file = folder / "pytorch_model.bin.index.json"
    files = (
        sorted({folder / f for f in json.loads(index_file.read_text())["weight_map"].values()})
        if index_file.is_file()
        else sorted(folder.glob("*.bin"))
    )
    if not files:
        raise KvshrinkError(f"{folder} holds no weights (*.safetensors or *.bin): pass a complete model folder")
    if not allow_pickle:
        raise KvshrinkError(f"{folder} has only pickled .bin weights, which can run code when loaded: {_PICKLE_HINT}")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            tensors.update(torch.load(file, map_location="cpu", weights_only=True, mmap=True))
        except Exception as error:  # torch raises several types for a corrupt or unsafe pickle
            raise KvshrinkError(f"{file} could not be loaded safely ({error}): re-download or convert it") from None
    return tensors


def open_folder(folder: Path, allow_pickle: bool = False) -> SourceCheckpoint:
    config = _read_config(folder)
    entries = _safetensors_entries(folder)
    if entries is not None:
        return SourceCheckpoint(folder, config, entries)
    return SourceCheckpoint(folder, config, {}, _pickled_tensors(folder, allow_pickle))


def _download(hub_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(
            snapshot_download(hub_id, allow_patterns=["*.json", "*.safetensors", *SIDE_FILE_PATTERNS])
        )
    except LocalEntryNotFoundError:
        raise KvshrinkError(
            f"{hub_id} is not in the local Hugging Face cache and the hub cannot be reached (offline): "
            "download it first with network access, or pass a local folder"
        ) from None
    except RepositoryNotFoundError:
        raise KvshrinkError(
            f"hub repository {hub_id} was not found: check the id, or log in for a gated model"
        ) from None
    except HfHubHTTPError as error:
        raise KvshrinkError(f"downloading {hub_id} failed ({error}): check the id and your network") from None


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(4) == b"GGUF"


@contextlib.contextmanager
def open_source(source: str | Path, allow_pickle: bool = False) -> Iterator[SourceCheckpoint]:
    """Open a model folder, a hub id or a .gguf file (dequantized into a temporary folder) for reading."""
    path = Path(source)
    if path.is_file():
        if path.suffix != ".gguf" and not _is_gguf(path):
            raise KvshrinkError(f"{path} is a file but not a .gguf model: pass a model folder, hub id or .gguf file")
        if not _is_gguf(path):
            raise KvshrinkError(f"{path} is not a GGUF file (bad magic bytes): pass a valid .gguf file")
        from kvshrink.convert.example import materialize_gguf

        with tempfile.TemporaryDirectory(prefix="kvshrink-gguf-") as scratch:
            materialize_gguf(path, Path(scratch))
            yield open_folder(Path(scratch))
        return
    if path.is_dir():
        yield open_folder(path, allow_pickle)
        return
    if _HUB_ID.match(str(source)) and not str(source).startswith((".", "/")):
        yield open_folder(_download(str(source)), allow_pickle)
        return
    raise KvshrinkError(f"source {source} does not exist: pass a model folder, a hub id (org/name) or a .gguf file")


def header_size_bound(names: list[str]) -> int:
    """Bytes enough for a safetensors header listing all `names` with shapes of up to 4 large dimensions."""
    per_entry = len('"":{"dtype":"F8_E4M3","shape":[],"data_offsets":[,]},') + 4 * 21 + 2 * 21
    return 64 + sum(len(name.encode()) + per_entry for name in names)

