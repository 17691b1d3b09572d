"""Writing safetensors checkpoints one tensor at a time, sharded as on the Hub.

The reading side (:mod:`minimoe.checkpoint.reader`) describes the format:
``[u64 little-endian header length N][N bytes of JSON][data]``.  To write a file
one tensor at a time we need the whole header first, so the caller says up front
which tensors will come (``shapes``, in order) and then hands them over one by one;
each is written and forgotten.  A checkpoint larger than ``shard_bytes`` is split
into ``model-0000i-of-0000n.safetensors`` files with a ``model.safetensors.index.json``
mapping each tensor to its file, as ``save_pretrained`` does; a smaller one is a
single ``model.safetensors``.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Iterable

import numpy as np

from ..errors import MinimoeError
from ..files import atomic_write, write_text
from .reader import DTYPES, INDEX_FILE, SINGLE_FILE

DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
SHARD_BYTES = 4 * 10**9  # about the size of the Hub's Qwen1.5 shards
# The files of a checkpoint folder besides config.json and the weights, which a new checkpoint made from it carries along.
SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
              "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json")


def plan_shards(shapes: dict[str, tuple[int, ...]], itemsize: int, shard_bytes: int) -> list[list[str]]:
    """Group tensor names, in order, into shards of at most ``shard_bytes`` (one tensor may exceed it alone)."""
    shards: list[list[str]] = []
    current: list[str] = []
    size = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * itemsize
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    if current:
        shards.append(current)
    return shards


def shard_file_names(count: int) -> list[str]:
    """``model.safetensors`` alone, or ``model-00001-of-0000n.safetensors`` ... as the Hub names shards."""
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{number:05d}-of-{count:05d}.safetensors" for number in range(1, count + 1)]


def header_bytes(names: list[str], shapes: dict[str, tuple[int, ...]], dtype: np.dtype) -> bytes:
    """The length prefix and JSON header of a file holding ``names`` in order, data aligned to 8 bytes."""
    header, offset = {}, 0
    for name in names:
        nbytes = math.prod(shapes[name]) * dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shapes[name]), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob


def write_checkpoint(folder: str | Path, shapes: dict[str, tuple[int, ...]], dtype: np.dtype,
                     tensors: Iterable[tuple[str, np.ndarray]], shard_bytes: int = SHARD_BYTES) -> list[Path]:
    """Write ``tensors`` into ``folder`` (which must exist) as safetensors; returns the files written.

    ``tensors`` yields ``(name, array)`` in exactly the order of ``shapes``, each array
    already in ``dtype`` (bf16, f16 or f32); only one is held at a time.  A tensor out
    of order, of the wrong shape or dtype is a bug in the caller and raises ``ValueError``.
    """
    dtype = np.dtype(dtype)
    if dtype not in DTYPE_NAMES:
        raise MinimoeError(f"cannot write dtype {dtype} to safetensors (supported: {sorted(DTYPE_NAMES.values())})")
    folder = Path(folder)
    shards = plan_shards(shapes, dtype.itemsize, shard_bytes)
    files = shard_file_names(len(shards))
    stream = iter(tensors)
    for names, file_name in zip(shards, files):
        with atomic_write(folder / file_name) as handle:
            handle.write(header_bytes(names, shapes, dtype))
            for name in names:
                handle.write(_checked(next(stream, None), name, shapes[name], dtype))
    if next(stream, None) is not None:
        raise ValueError("more tensors were given than shapes listed")
    if len(files) > 1:
        total = sum(math.prod(shape) for shape in shapes.values()) * dtype.itemsize
        weight_map = {name: file_name for names, file_name in zip(shards, files) for name in names}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        write_text(folder / INDEX_FILE, json.dumps(index, indent=2) + "\n")
    return [folder / name for name in files]


def _checked(item: tuple[str, np.ndarray] | None, name: str, shape: tuple[int, ...], dtype: np.dtype) -> memoryview:
    """The bytes of the tensor ``name``, after checking it is the one planned (no copy when contiguous)."""
    if item is None:
        raise ValueError(f"the tensors ran out before {name}")
    given, array = item
    if given != name or array.shape != tuple(shape) or array.dtype != dtype:
        raise ValueError(f"expected {name} {list(shape)} {dtype}, got {given} {list(array.shape)} {array.dtype}")
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8).data
