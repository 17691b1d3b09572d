#!/usr/bin/env python
"""What tracing costs: ``model.trace(ids)`` against a plain ``model.forward(ids)``.

Runs both on the same prompt (default: 256 tokens of the Python standard library's
source, encoded with the model's tokenizer), alternating them so that drift in the
machine's speed hits both alike, and reports the median time of each and the ratio.

    python scripts/bench_trace.py                   # the bundled model, 256 tokens
    python scripts/bench_trace.py --model PATH --tokens 512 --repeat 21

A benchmark, not a test: it prints a ratio measured in this run.
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import time
from pathlib import Path

import minimoe


def prompt_ids(tokenizer, tokens: int) -> list[int]:
    text = inspect.getsource(json.decoder) * 4  # plenty of ordinary Python source
    ids = tokenizer.encode(text)[:tokens]
    if len(ids) < tokens:
        raise SystemExit(f"the sample text gives only {len(ids)} tokens")
    return ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=minimoe.default_model_path())
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()

    model, tokenizer = minimoe.load(args.model), minimoe.load_tokenizer(args.model)
    ids = prompt_ids(tokenizer, args.tokens)
    runs = {"forward": lambda: model.forward(ids), "trace": lambda: model.trace(ids)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for name, run in runs.items():  # warm-up
        run()
    for _ in range(args.repeat):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    forward, trace = statistics.median(times["forward"]), statistics.median(times["trace"])
    print(f"{args.model.name}: {args.tokens} tokens, median of {args.repeat} alternating runs")
    print(f"  forward {forward * 1e3:8.2f} ms")
    print(f"  trace   {trace * 1e3:8.2f} ms   ({trace / forward - 1:+.1%} over forward)")


if __name__ == "__main__":
    main()
