"""Streaming safetensors reading and writing with memory bounded by one tensor.

We parse the safetensors header ourselves instead of going through `safe_open`: reading with plain file reads
keeps the process's resident memory at one tensor (a memory map of a 5 GB shard counts every touched page), lets
untouched tensors be copied file-to-file by the kernel without entering Python, and lets a truncated or corrupt
shard be named precisely before anything is written.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from kvshrink.convert.errors import KvshrinkError

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_MAX_HEADER_BYTES = 100_000_000
_COPY_CHUNK = 64 << 20


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes lie in a safetensors file."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def read_header(file: Path) -> dict[str, TensorEntry]:
    """Parse and validate a safetensors file's header: every tensor must lie inside the file."""
    corrupt = f"{file} is truncated or not a safetensors file"
    fix = "re-download or re-save the checkpoint"
    size = file.stat().st_size
    with open(file, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise KvshrinkError(f"{corrupt} (only {size} bytes): {fix}")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(_MAX_HEADER_BYTES, size - 8):
            raise KvshrinkError(f"{corrupt} (header length {header_len} exceeds the file): {fix}")
        try:
            header = json.loads(handle.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise KvshrinkError(f"{corrupt} (unreadable header): {fix}") from None
    data_start = 8 + header_len
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = info["data_offsets"]
            dtype, shape = info["dtype"], tuple(int(d) for d in info["shape"])
        except (KeyError, TypeError, ValueError):
            raise KvshrinkError(f"{corrupt} (bad header entry for {name}): {fix}") from None
        if dtype not in DTYPES:
            raise KvshrinkError(f"{file}: tensor {name} has unsupported dtype {dtype}: convert it to F32/F16/BF16")
        if data_start + end > size:
            raise KvshrinkError(f"{file} is truncated: tensor {name} ends at byte {data_start + end} of {size}: {fix}")
        entries[name] = TensorEntry(file, dtype, shape, data_start + begin, end - begin)
    return entries


def read_tensor(entry: TensorEntry) -> torch.Tensor:
    buffer = bytearray(entry.nbytes)
    with open(entry.file, "rb") as handle:
        handle.seek(entry.offset)
        if handle.readinto(buffer) != entry.nbytes:
            raise KvshrinkError(f"{entry.file} is truncated: re-download or re-save the checkpoint")
    if entry.nbytes == 0:
        return torch.empty(entry.shape, dtype=entry.torch_dtype)
    return torch.frombuffer(buffer, dtype=entry.torch_dtype).reshape(entry.shape)


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().contiguous().cpu().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def _copy_range_in_kernel(source_fd: int, target_fd: int, entry: TensorEntry) -> None:
    offset, remaining = entry.offset, entry.nbytes
    while remaining:
        copied = os.copy_file_range(source_fd, target_fd, remaining, offset)
        if copied == 0:
            raise KvshrinkError(f"{entry.file} is truncated: re-download or re-save the checkpoint")
        offset += copied
        remaining -= copied


class ShardedSafetensorsWriter:
    """Writes tensors in arrival order into shards of at most `max_shard_bytes`, then names them and the index.

    Each shard reserves room for its header up front (padded with spaces, which the format allows), streams
    tensor bytes, and fills the header in when it closes, so no shard is ever held in memory.
    """

    def __init__(self, out_dir: Path, max_shard_bytes: int, header_reserve: int):
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self.header_reserve = header_reserve
        self._shards: list[tuple[Path, list[str]]] = []
        self._handle = None
        self._entries: dict = {}
        self._data_bytes = 0

    def _open_shard(self) -> None:
        path = self.out_dir / f"shard-{len(self._shards):05d}.tmp"
        self._handle = open(path, "wb")
        self._handle.write(b"\0" * (8 + self.header_reserve))
        self._shards.append((path, []))
        self._entries = {}
        self._data_bytes = 0

    def _close_shard(self) -> None:
        header = json.dumps({"__metadata__": {"format": "pt"}, **self._entries}, separators=(",", ":"))
        header_bytes = header.encode()
        if len(header_bytes) > self.header_reserve:
            raise AssertionError("header reserve underestimated; this is a kvshrink bug")
        self._handle.seek(0)
        self._handle.write(struct.pack("<Q", self.header_reserve))
        self._handle.write(header_bytes + b" " * (self.header_reserve - len(header_bytes)))
        self._handle.close()
        self._handle = None

    def _start_entry(self, name: str, dtype: str, shape: tuple[int, ...], nbytes: int) -> None:
        if self._handle is None or (self._data_bytes and self._data_bytes + nbytes > self.max_shard_bytes):
            if self._handle is not None:
                self._close_shard()
            self._open_shard()
        self._entries[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [self._data_bytes, self._data_bytes + nbytes],
        }
        self._data_bytes += nbytes
        self._shards[-1][1].append(name)

    def add_tensor(self, name: str, tensor: torch.Tensor) -> None:
        data = _tensor_bytes(tensor)
        self._start_entry(name, DTYPE_NAMES[tensor.dtype], tuple(tensor.shape), data.nbytes)
        self._handle.write(data)

    def add_copy(self, name: str, entry: TensorEntry) -> None:
        """Copy a source tensor's bytes unchanged, file to file in the kernel."""
        self._start_entry(name, entry.dtype, entry.shape, entry.nbytes)
        self._handle.flush()
        start = self._handle.tell()
        with open(entry.file, "rb") as source:
            try:
                _copy_range_in_kernel(source.fileno(), self._handle.fileno(), entry)
            except OSError:  # filesystems without copy_file_range: copy through a bounded buffer
                self._handle.seek(start)
                self._handle.truncate()
                source.seek(entry.offset)
                remaining = entry.nbytes
                while remaining:
                    chunk = source.read(min(remaining, _COPY_CHUNK))
                    if not chunk:
                        raise KvshrinkError(f"{entry.file} is truncated: re-download or re-save the checkpoint")
                    self._handle.write(chunk)
                    remaining -= len(chunk)
        self._handle.seek(0, os.SEEK_END)

    def finish(self) -> list[Path]:
        """Close the last shard, give shards their final names and write the index if there are several."""
        if self._handle is not None:
            self._close_shard()
        count = len(self._shards)
        weight_map, total = {}, 0
        final_paths = []
        for number, (path, names) in enumerate(self._shards, 1):
            final = self.out_dir / (
                "model.safetensors" if count == 1 else f"model-{number:05d}-of-{count:05d}.safetensors"
            )
            path.rename(final)
            final_paths.append(final)
            total += final.stat().st_size - 8 - self.header_reserve
            weight_map.update({name: final.name for name in names})
        if count > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return final_paths
