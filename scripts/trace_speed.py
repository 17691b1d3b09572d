#!/usr/bin/env python
"""Time ``model.trace`` on a Python text: tokens/s cold (page cache dropped) and warm, and peak RssAnon.

    python scripts/trace_speed.py CHECKPOINT --tokens 1024 [--cold]

The text is the start of a stdlib module (``json/decoder.py`` and what follows it in the
stdlib), encoded with the bundled model's tokenizer: its ids are valid for any Qwen
vocabulary, and on a checkpoint of random weights the routing, not the text, is what costs.
``--cold`` drops the page cache first (needs root): the first trace then reads the weights
from disk.  Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import minimoe
from minimoe.tools.bench import disk_read_bytes, proc_field_bytes


def python_text_ids(tokens: int) -> list[int]:
    import json as json_module

    tok = minimoe.load_tokenizer(minimoe.default_model_path())
    ids: list[int] = []
    for path in sorted(Path(json_module.__file__).parent.parent.glob("*.py")):
        ids += tok.encode(path.read_text(encoding="utf-8", errors="replace"))
        if len(ids) >= tokens:
            return ids[:tokens]
    raise SystemExit("not enough stdlib text")


class PeakRss(threading.Thread):
    """Samples this process's RssAnon every 10 ms; ``peak`` is the largest seen."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.running = 0, True

    def run(self):
        while self.running:
            self.peak = max(self.peak, proc_field_bytes("/proc/self/status", "RssAnon") or 0)
            time.sleep(0.01)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--cold", action="store_true", help="drop the page cache first (root)")
    args = parser.parse_args()
    ids = python_text_ids(args.tokens)
    watch = PeakRss()
    watch.start()
    model = minimoe.load(args.model)
    if args.cold:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    result = {"tokens": args.tokens}
    for run in ("cold" if args.cold else "first", "warm"):
        read_before, start = disk_read_bytes(), time.perf_counter()
        model.trace(ids)
        seconds = time.perf_counter() - start
        result[run] = {"seconds": round(seconds, 2), "tok_s": round(args.tokens / seconds, 2),
                       "disk_read_gb": round((disk_read_bytes() - read_before) / 1e9, 2)}
    watch.running = False
    result["peak_rss_anon_gb"] = round(watch.peak / 1e9, 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
