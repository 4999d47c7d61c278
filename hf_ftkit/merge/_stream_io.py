"""Tensor-at-a-time reading and writing of safetensors files, for merges whose RAM must stay bounded.

``safetensors.safe_open`` memory-maps the whole file, and every page a read touches stays in the process's
resident set until the file is closed; ``safetensors.torch.save_file`` needs every tensor of a shard in memory
at once. A streaming merge can afford neither, so this module reads one tensor's bytes with ``os.pread`` and
writes a shard whose header is known in advance (all shapes and dtypes are), tensor by tensor, in the layout
the safetensors format specifies (little-endian u64 header length, JSON header, 8-byte aligned, raw data).
The files it writes are read back with the ``safetensors`` library itself in the tests.
"""

from __future__ import annotations

import errno
import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from hf_ftkit.errors import BadInputError

# The dtype names of the safetensors format (its spec), mapped to torch.
ST_DTYPES: dict[str, torch.dtype] = {
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
ST_NAMES = {dtype: name for name, dtype in ST_DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024
_CHUNK = 64 * 1024 * 1024


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies in a safetensors file."""

    file: Path
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file
    nbytes: int


def read_header(path: Path) -> tuple[list[TensorEntry], dict[str, str]]:
    """The tensors of one safetensors file (in file order) and its ``__metadata__``.

    Raises:
        BadInputError: the file is not a complete safetensors file.
    """
    size = path.stat().st_size
    try:
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > min(_MAX_HEADER, size - 8):
                raise ValueError("header length past the end of the file")
            header = json.loads(handle.read(length))
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise BadInputError(f"{path} is not a valid safetensors file ({exc}); re-download or re-save it.") from None
    metadata = header.pop("__metadata__", None) or {}
    entries = []
    for name, info in header.items():
        start, end = info["data_offsets"]
        if info["dtype"] not in ST_DTYPES:
            raise BadInputError(f"{path}: tensor {name} has dtype {info['dtype']}, which hf-ftkit cannot merge.")
        entries.append(
            TensorEntry(path, name, ST_DTYPES[info["dtype"]], tuple(info["shape"]), 8 + length + start, end - start)
        )
    end_of_data = max((e.offset + e.nbytes for e in entries), default=8 + length)
    if end_of_data > size:
        raise BadInputError(
            f"{path} is truncated ({size:,} bytes, its header needs {end_of_data:,}); re-download or re-save it."
        )
    entries.sort(key=lambda e: e.offset)
    return entries, metadata


def read_tensor(entry: TensorEntry, into: torch.Tensor | None = None) -> torch.Tensor:
    """Read one tensor (no mmap: nothing stays resident after it is dropped).

    ``into``, a flat uint8 buffer of at least ``entry.nbytes``, is filled and viewed instead of allocating:
    reusing buffers avoids re-faulting fresh pages for every tensor, which dominates a streaming merge's time.
    """
    if into is None:
        into = torch.empty(entry.nbytes, dtype=torch.uint8)
    target = into[: entry.nbytes]
    if entry.nbytes:
        view = memoryview(target.numpy()).cast("B")  # type: ignore[arg-type]
        with entry.file.open("rb", buffering=0) as handle:
            done = 0
            while done < entry.nbytes:
                got = os.preadv(handle.fileno(), [view[done:]], entry.offset + done)
                if got <= 0:
                    raise BadInputError(f"{entry.file} ended while reading {entry.name}; the file is truncated.")
                done += got
    return target.view(entry.dtype).reshape(entry.shape)


def iter_raw_chunks(entry: TensorEntry, chunk: int = _CHUNK, start: int = 0) -> Iterator[bytes]:
    """A tensor's bytes in chunks (from byte ``start``), for copying it without holding it whole."""
    with entry.file.open("rb", buffering=0) as handle:
        done = start
        while done < entry.nbytes:
            data = os.pread(handle.fileno(), min(chunk, entry.nbytes - done), entry.offset + done)
            if not data:
                raise BadInputError(f"{entry.file} ended while reading {entry.name}; the file is truncated.")
            done += len(data)
            yield data


@dataclass(frozen=True)
class OutTensor:
    """A tensor the writer will receive: name, dtype and shape known before any data."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * torch.empty((), dtype=self.dtype).element_size()


class ShardWriter:
    """Writes one safetensors file whose tensors arrive one at a time, in the declared order."""

    def __init__(self, path: Path, tensors: list[OutTensor], metadata: dict[str, str] | None = None) -> None:
        header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        for tensor in tensors:
            header[tensor.name] = {
                "dtype": ST_NAMES[tensor.dtype],
                "shape": list(tensor.shape),
                "data_offsets": [offset, offset + tensor.nbytes],
            }
            offset += tensor.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self._pending = list(tensors)
        self._handle = path.open("wb", buffering=0)  # unbuffered: copy_from writes through the fd directly
        self._write_all(struct.pack("<Q", len(encoded)) + encoded)

    def write_tensor(self, name: str, tensor: torch.Tensor) -> None:
        expected = self._next(name)
        if tensor.dtype != expected.dtype or tuple(tensor.shape) != expected.shape:
            raise RuntimeError(f"{name}: got {tensor.dtype}{tuple(tensor.shape)}, declared {expected}")
        flat = tensor.contiguous().reshape(-1)
        if flat.numel():
            self._write_all(flat.view(torch.uint8).numpy().data)

    def copy_from(self, name: str, entry: TensorEntry) -> None:
        """Copy an unchanged tensor's bytes file to file inside the kernel (``copy_file_range``), no user memory."""
        expected = self._next(name)
        if expected.nbytes != entry.nbytes:
            raise RuntimeError(f"{name}: source has {entry.nbytes} bytes, declared {expected.nbytes}")
        with entry.file.open("rb", buffering=0) as source:
            done = 0
            try:
                while done < entry.nbytes:
                    copied = os.copy_file_range(source.fileno(), self._handle.fileno(), entry.nbytes - done,
                                                entry.offset + done)
                    if copied <= 0:
                        raise BadInputError(f"{entry.file} ended while reading {name}; the file is truncated.")
                    done += copied
            except (AttributeError, OSError) as exc:  # no copy_file_range here (or across these filesystems)
                if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                    raise
                for chunk in iter_raw_chunks(entry, start=done):
                    self._write_all(chunk)

    def write_raw(self, name: str, chunks: Iterator[bytes]) -> None:
        expected = self._next(name)
        written = 0
        for chunk in chunks:
            self._write_all(chunk)
            written += len(chunk)
        if written != expected.nbytes:
            raise RuntimeError(f"{name}: wrote {written} bytes, declared {expected.nbytes}")

    def _write_all(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        while view:  # an unbuffered write may take less than it was given
            written = self._handle.write(view)
            view = view[written or 0:]

    def close(self) -> None:
        if self._pending:
            raise RuntimeError(f"shard closed with {len(self._pending)} tensors unwritten")
        os.fsync(self._handle.fileno())
        self._handle.close()

    def abort(self) -> None:
        self._handle.close()

    def _next(self, name: str) -> OutTensor:
        if not self._pending or self._pending[0].name != name:
            raise RuntimeError(f"tensor {name} written out of the declared order")
        return self._pending.pop(0)


def split_shards(tensors: list[OutTensor], max_shard_bytes: int) -> list[list[OutTensor]]:
    """Greedy split in order, like ``transformers``' ``max_shard_size`` (a tensor larger than it gets its own)."""
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    """The file names transformers gives a checkpoint of ``count`` shards."""
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def base_entries(model_dir: Path) -> dict[str, TensorEntry]:
    """Every tensor of a (possibly sharded) safetensors checkpoint, by name, in file order."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = list(dict.fromkeys(weight_map.values()))
    elif (model_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise BadInputError(
            f"{model_dir} has no model.safetensors or model.safetensors.index.json; "
            "convert the base to safetensors (save_pretrained(..., safe_serialization=True))."
        )
    entries: dict[str, TensorEntry] = {}
    for file in files:
        path = model_dir / file
        if not path.is_file():
            raise BadInputError(f"{model_dir}: shard {file} named in the index is missing; re-download the model.")
        for entry in read_header(path)[0]:
            entries[entry.name] = entry
    return entries
