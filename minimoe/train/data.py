"""Training data: text files in, one stream of token ids out, cut into windows in a seed-determined order.

    stream = read_token_stream(["docs/", "notes.txt"], tokenizer, eos_id)   # [N] int32
    batch = training_batch(stream, context=256, batch=16, seed=0, step=41)   # [16, 256] int64
    held = held_out_windows(eval_stream, context=256, limit=32)              # [<=32, 256] int64

Every document's ids are followed by an end-of-text id, so the model learns where a text stops
(as the bundled models were trained).  A training batch is ``batch`` windows of ``context``
consecutive ids starting at random offsets drawn from a generator seeded by ``(seed, step)``:
any step's batch can be rebuilt alone, which is what lets ``--resume`` continue bit for bit.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Iterable

import numpy as np

from ..errors import MinimoeError


def text_files(paths: Iterable[str | Path]) -> list[Path]:
    """The files named, and every file under the folders named (sorted; hidden ones and ``__pycache__`` skipped)."""
    found = []
    for path in map(Path, paths):
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.is_file() and not any(
                part.startswith(".") or part == "__pycache__" for part in p.relative_to(path).parts)))
        else:
            raise MinimoeError(f"{path}: no such file or folder (--data and --eval take text files or folders)")
    return found


def read_token_stream(paths: Iterable[str | Path], tokenizer, eos_id: int) -> np.ndarray:
    """Every text file under ``paths`` tokenized, each followed by ``eos_id``: ``[N]`` int32.

    Files holding a NUL byte are binary, not text, and skipped; bytes that are not UTF-8 are
    read as U+FFFD.
    """
    ids: list[int] = []
    for path in text_files(paths):
        raw = path.read_bytes()
        if b"\0" in raw:
            continue
        ids.extend(tokenizer.encode(raw.decode("utf-8", errors="replace")))
        ids.append(eos_id)
    return np.array(ids, dtype=np.int32)


def check_stream(stream: np.ndarray, context: int, what: str) -> None:
    """MinimoeError unless ``stream`` holds at least one window of ``context`` ids."""
    if len(stream) < context:
        raise MinimoeError(f"{what}: {len(stream):,} tokens, shorter than one window of --context {context}; "
                           f"give more text or a shorter context")


def training_batch(stream: np.ndarray, context: int, batch: int, seed: int, step: int) -> np.ndarray:
    """Step ``step``'s ``batch`` windows of ``context`` ids at offsets drawn by ``(seed, step)``: ``[batch, context]`` int64."""
    starts = np.random.default_rng([seed, step]).integers(0, len(stream) - context + 1, batch)
    return np.stack([stream[start : start + context] for start in starts]).astype(np.int64)


def held_out_windows(stream: np.ndarray, context: int, limit: int | None = None) -> np.ndarray:
    """Consecutive non-overlapping windows of ``stream`` (the remainder dropped), at most ``limit``: ``[n, context]`` int64."""
    count = len(stream) // context if limit is None else min(limit, len(stream) // context)
    return stream[: count * context].reshape(count, context).astype(np.int64)


def fingerprint(stream: np.ndarray) -> str:
    """A short checksum of the token stream, to refuse resuming on other data."""
    return f"{len(stream)}:{zlib.crc32(np.ascontiguousarray(stream, dtype=np.int32).tobytes()):08x}"


__all__ = ["text_files", "read_token_stream", "check_stream", "training_batch", "held_out_windows", "fingerprint"]
