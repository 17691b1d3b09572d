"""Reading safetensors checkpoints without loading them.

A safetensors file is ``[u64 little-endian header length N][N bytes of JSON][data]``.
The JSON maps each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}``
with offsets relative to the start of the data section.

We parse the header ourselves (so BF16 works with plain NumPy via ``ml_dtypes``,
and so every inconsistency gets a clear :class:`MinimoeError`) and memory-map
the file: a tensor is a read-only NumPy view into the mapping, and its bytes are
read from disk only when a matmul touches them.  The 28.6 GB Qwen1.5-MoE
checkpoint therefore opens in well under a second and needs no RAM up front.

Nothing here ever unpickles anything.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from ..errors import MinimoeError

try:
    import ml_dtypes
except ImportError:  # a dependency; without it (a bare GPU machine) reading a bf16 tensor says what is missing
    ml_dtypes = None

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# The safetensors reference implementation refuses headers over 100 MB; so do we.
MAX_HEADER_BYTES = 100 * 1024 * 1024

DTYPES = {
    "BF16": np.dtype(ml_dtypes.bfloat16) if ml_dtypes is not None else None,
    "F16": np.dtype(np.float16),
    "F32": np.dtype(np.float32),
}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, dtype, shape and byte range in the data section."""

    name: str
    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


class SafetensorsFile:
    """One memory-mapped ``.safetensors`` file; tensors are views, read lazily."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tensors, self.metadata, self._data_start = _read_header(self.path)
        self._map: np.memmap | None = None

    def array(self, name: str) -> np.ndarray:
        """The tensor ``name`` as a read-only view into the file (no copy, no upcast)."""
        info = self.tensors[name]
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        raw = self._map[self._data_start + info.begin : self._data_start + info.end]
        # A plain ndarray view (its base is the map): slicing a np.memmap runs Python code
        # in __array_finalize__, which the blocked matmul would pay on every block.
        return raw.view(np.ndarray).view(info.dtype).reshape(info.shape)


def _read_header(path: Path) -> tuple[dict[str, TensorInfo], dict, int]:
    """Parse and validate the header; returns (tensors, metadata, offset of the data section)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise MinimoeError(f"{path}: file is {size} bytes, too short to be safetensors (truncated?)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES:
                raise MinimoeError(
                    f"{path}: header claims {header_len} bytes, over the {MAX_HEADER_BYTES}-byte limit (corrupt file?)"
                )
            if 8 + header_len > size:
                raise MinimoeError(
                    f"{path}: header claims {header_len} bytes but the file has only {size - 8} after the "
                    "length prefix (truncated?)"
                )
            header_bytes = handle.read(header_len)
    except FileNotFoundError:
        raise MinimoeError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise MinimoeError(f"{path}: is a directory, expected a .safetensors file") from None

    try:
        header = json.loads(header_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MinimoeError(f"{path}: header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise MinimoeError(f"{path}: header is not a JSON object")

    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    data_size = size - data_start
    tensors = {name: _tensor_info(path, name, entry, data_size) for name, entry in header.items()}
    _check_no_overlap(path, tensors.values())
    return tensors, metadata, data_start


def _tensor_info(path: Path, name: str, entry: object, data_size: int) -> TensorInfo:
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise MinimoeError(f"{where}: header entry is not an object")
    dtype_name, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype_name not in DTYPES:
        raise MinimoeError(f"{where}: dtype {dtype_name!r} is not supported (expected one of {sorted(DTYPES)})")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise MinimoeError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise MinimoeError(f"{where}: data_offsets {offsets!r} is not a pair of non-negative integers")
    begin, end = offsets
    dtype = DTYPES[dtype_name]
    if dtype is None:
        raise MinimoeError(f"{where}: reading {dtype_name} tensors needs the ml_dtypes package: pip install ml_dtypes")
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize if shape else dtype.itemsize
    if end < begin or end - begin != expected:
        raise MinimoeError(
            f"{where}: data_offsets [{begin}, {end}] hold {end - begin} bytes, but shape {shape} of "
            f"{dtype_name} needs {expected}"
        )
    if end > data_size:
        raise MinimoeError(
            f"{where}: data_offsets end at byte {end}, past the {data_size}-byte data section (truncated file?)"
        )
    return TensorInfo(name, path, dtype, tuple(shape), begin, end)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_no_overlap(path: Path, infos: Iterable[TensorInfo]) -> None:
    previous: TensorInfo | None = None
    for info in sorted(infos, key=lambda i: (i.begin, i.end)):
        if previous is not None and info.begin < previous.end:
            raise MinimoeError(
                f"{path}: tensors {previous.name!r} [{previous.begin}, {previous.end}] and "
                f"{info.name!r} [{info.begin}, {info.end}] overlap"
            )
        if info.end > info.begin:  # empty tensors take no room
            previous = info


class Checkpoint:
    """A Hugging Face checkpoint folder: one ``model.safetensors`` or shards with an index.

    ``checkpoint.array(name)`` returns a read-only memory-mapped view of a tensor;
    ``checkpoint.names`` lists every tensor.  Shard names from the index must stay
    inside the folder.
    """

    def __init__(self, folder: str | Path, progress: Callable[[Iterable], Iterable] | None = None):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise MinimoeError(f"{self.folder}: not a folder (expected a Hugging Face checkpoint folder)")
        shard_names = self._shard_names()
        shards = progress(shard_names) if progress else shard_names
        self.files = {shard: SafetensorsFile(self._inside(shard)) for shard in shards}
        self._where: dict[str, SafetensorsFile] = {}
        for shard, file in self.files.items():
            for name in file.tensors:
                if name in self._where:
                    raise MinimoeError(f"{self.folder}: tensor {name!r} appears in two files ({shard} and another)")
                self._where[name] = file
        self._check_index_agrees()

    def _shard_names(self) -> list[str]:
        index_path = self.folder / INDEX_FILE
        if index_path.exists():
            try:
                index = json.loads(index_path.read_text(encoding="utf-8"))
                weight_map = index["weight_map"]
                if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                    raise TypeError("weight_map must map tensor names to file names")
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
                raise MinimoeError(f"{index_path}: not a valid safetensors index ({exc!r})") from None
            self._index = weight_map
            return sorted(set(weight_map.values()))
        if (self.folder / SINGLE_FILE).exists():
            self._index = None
            return [SINGLE_FILE]
        raise MinimoeError(f"{self.folder}: neither {SINGLE_FILE} nor {INDEX_FILE} found")

    def _inside(self, shard: str) -> Path:
        """The path of a shard named by the index, refusing any name that leaves the folder.

        The check is on the name itself (a plain file name: no separators, no ``..``, not
        absolute), not on where it resolves to: the Hugging Face cache lays out a snapshot as
        symlinks into a ``blobs/`` folder beside it, and those links are the user's own.
        """
        plain = shard not in ("", ".", "..") and "/" not in shard and "\\" not in shard and ":" not in shard
        if not plain or os.path.isabs(shard):
            raise MinimoeError(f"{self.folder / INDEX_FILE}: shard {shard!r} points outside the model folder")
        target = self.folder / shard
        if not target.is_file():
            raise MinimoeError(f"{self.folder}: shard {shard!r} named by {INDEX_FILE} is missing")
        return target

    def _check_index_agrees(self) -> None:
        if self._index is None:
            return
        for name, shard in self._index.items():
            found = self._where.get(name)
            if found is None or found is not self.files[shard]:
                raise MinimoeError(f"{self.folder / INDEX_FILE}: tensor {name!r} is listed in {shard} but not there")

    @property
    def names(self) -> list[str]:
        return list(self._where)

    def info(self, name: str) -> TensorInfo:
        return self._where[name].tensors[name]

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def array(self, name: str) -> np.ndarray:
        """The tensor as stored (bf16/f16/f32), memory-mapped and read-only."""
        try:
            file = self._where[name]
        except KeyError:
            raise MinimoeError(f"{self.folder}: tensor {name!r} not found in the checkpoint") from None
        return file.array(name)

    @property
    def nbytes(self) -> int:
        """Total bytes of tensor data across all files."""
        return sum(i.end - i.begin for f in self.files.values() for i in f.tensors.values())
