"""A memory budget for float32 working copies of the routed experts, kept least-recently-used.

The checkpoint's weights stay bf16 and memory-mapped; a matmul upcasts the rows it
needs into a small scratch buffer and forgets them (see :mod:`minimoe.backend`).
With a budget (``minimoe.load(path, max_memory="4GB")``), the upcast copy of each
weight is kept instead, up to that many bytes in all: the experts a text keeps
choosing stay float32 and skip the upcast, while cold ones are evicted (least
recently used first) and re-read from the mapped bf16 when next chosen.  This is
the expert cache of offloading engines (mixtral-offloading keeps hot experts on the
GPU; here the "fast tier" is float32 in RAM), with its hit rate on show in
:meth:`WeightCache.stats` so you can see how much reuse routing really has.
"""

from __future__ import annotations

import math
import re
import sys
import threading
from collections import OrderedDict

import numpy as np

from .errors import MinimoeError

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(value: int | float | str) -> int:
    """A byte count from ``4_000_000_000``, ``"4GB"``, ``"512 MiB"`` or ``"1.5GB"``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number, unit = float(value), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
        if not match or match.group(2).upper() not in _UNITS:
            raise MinimoeError(f"cannot read {value!r} as a memory size; write e.g. 4GB, 512MB or 2GiB")
        number, unit = float(match.group(1)), match.group(2).upper()
    if number < 0:
        raise MinimoeError(f"a memory size cannot be negative, got {value!r}")
    return int(number * _UNITS[unit])


class WeightCache:
    """float32 copies of weight matrices, at most ``budget_bytes`` in all, least-recently-used out first.

    Keys are the weight objects themselves (:class:`minimoe.backend.Linear`).  The
    protocol, used by :func:`minimoe.backend.project`:

    - :meth:`lookup` returns the cached copy (a hit, which also makes it the most
      recently used) or ``None`` (a miss);
    - after a miss, :meth:`allocate` returns a float32 array for the new copy, making
      room by evicting the least recently used copies (``None`` if it can never fit);
      the caller fills it and hands it to :meth:`store`.

    Allocated bytes count against the budget from the moment they are handed out, so
    the budget holds even while a copy is being filled.  An evicted copy's memory is
    reused for the new one when the sizes match (the experts' matrices all have the
    same size) and nothing else still holds it: freeing and re-allocating blocks of
    ~10 MB from several threads grows malloc's heaps well past the budget.  Thread-safe.
    """

    def __init__(self, budget_bytes: int):
        self.budget_bytes = int(budget_bytes)
        self.used_bytes = 0
        self.hits = self.misses = self.evictions = 0
        self._copies: OrderedDict[object, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def __contains__(self, key) -> bool:
        return key in self._copies

    def __len__(self) -> int:
        return len(self._copies)

    def keys(self) -> list:
        """Cached keys, least recently used first."""
        with self._lock:
            return list(self._copies)

    def lookup(self, key) -> np.ndarray | None:
        """The float32 copy of ``key``'s weight, or ``None`` when it is not cached."""
        with self._lock:
            copy = self._copies.get(key)
            if copy is None:
                self.misses += 1
                return None
            self._copies.move_to_end(key)
            self.hits += 1
            return copy

    def allocate(self, shape: tuple[int, ...]) -> np.ndarray | None:
        """An uninitialised float32 array of ``shape`` for a new copy, within the budget, or None."""
        nbytes = 4 * math.prod(shape)
        with self._lock:
            if nbytes > self.budget_bytes:  # would evict everything and still not fit
                return None
            while self.used_bytes + nbytes > self.budget_bytes and self._copies:
                _, evicted = self._copies.popitem(last=False)
                self.evictions += 1
                # Reuse its memory unless a matmul still reads it (held by more than `evicted` and
                # getrefcount's own argument).  Its bytes stay counted: they move to the new copy.
                if evicted.nbytes == nbytes and sys.getrefcount(evicted) == 2:
                    return evicted.reshape(shape)
                self.used_bytes -= evicted.nbytes
            if self.used_bytes + nbytes > self.budget_bytes:  # other threads' fills still pending
                return None
            self.used_bytes += nbytes
            return np.empty(shape, dtype=np.float32)

    def store(self, key, copy: np.ndarray) -> None:
        """Keep ``copy`` (an array from :meth:`allocate`, now filled) as the most recently used."""
        with self._lock:
            previous = self._copies.pop(key, None)
            if previous is not None:  # filled twice (two threads missed at once): keep one
                self.used_bytes -= previous.nbytes
            self._copies[key] = copy

    def release(self, copy: np.ndarray) -> None:
        """Give back the bytes of an allocated copy that will not be stored (its fill failed)."""
        with self._lock:
            self.used_bytes -= copy.nbytes

    def clear(self) -> None:
        """Drop every copy (the counters stay)."""
        with self._lock:
            self._copies.clear()
            self.used_bytes = 0

    def stats(self) -> dict:
        """Counters since the model was loaded: hits, misses, evictions, bytes used and budget, hit rate."""
        with self._lock:
            lookups = self.hits + self.misses
            return {
                "hits": self.hits, "misses": self.misses, "evictions": self.evictions,
                "hit_rate": self.hits / lookups if lookups else 0.0,
                "cached_weights": len(self._copies),
                "used_bytes": self.used_bytes, "budget_bytes": self.budget_bytes,
            }
