"""Writing a file so that a reader never sees half of it: :func:`atomic_write`.

The bytes go to a hidden file beside the target, which replaces it in one step
(``os.replace``) once they are all written.  A run killed or failing midway leaves
the old file (or none) and no partial one under the target's name.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import IO, Iterator


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb", **open_options) -> Iterator[IO]:
    """``with atomic_write(path, "w", encoding="utf-8") as handle: ...``: ``path`` appears whole, or not at all."""
    target = Path(path)
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        with open(partial, mode, **open_options) as handle:
            yield handle
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)  # after a failure; after success it is already the target


def write_text(path: str | Path, text: str) -> None:
    """``Path(path).write_text(text)`` in UTF-8, atomically (see :func:`atomic_write`)."""
    with atomic_write(path, "w", encoding="utf-8") as handle:
        handle.write(text)
