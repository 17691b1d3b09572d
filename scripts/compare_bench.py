#!/usr/bin/env python
"""Compare two checkouts of minimoe with ``minimoe bench``, in interleaved runs.

    git worktree add /tmp/before HEAD~3
    python scripts/compare_bench.py /tmp/before . --model CKPT --rounds 4

Each round runs ``minimoe bench`` once with each checkout's package (``PYTHONPATH``),
alternating which goes first, so that a machine that gets busier or quieter during the
comparison affects both alike.  Prints each round's prefill and decode tokens/s (warm)
and the median of each, and the after/before ratio of the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

FIGURES = ("prefill_warm_tok_s", "decode_warm_tok_s")


def bench_once(checkout: Path, model: Path, prompt_tokens: int, new_tokens: int, repeat: int) -> dict[str, float]:
    """One ``minimoe bench`` run with ``checkout``'s package; its warm figures."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        env = os.environ | {"PYTHONPATH": str(checkout.resolve())}
        subprocess.run([sys.executable, "-m", "minimoe", "bench", "--model", str(model), "--prompt-tokens",
                        str(prompt_tokens), "--new-tokens", str(new_tokens), "--repeat", str(repeat), "--json", str(out)],
                       env=env, check=True, stdout=subprocess.DEVNULL, cwd=checkout)
        metrics = json.loads(out.read_text())["engines"]["minimoe"]["metrics"]
    return {name: metrics[name] for name in FIGURES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=17)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    results = {"before": [], "after": []}
    for round_ in range(args.rounds):
        order = ["before", "after"] if round_ % 2 == 0 else ["after", "before"]
        for name in order:
            figures = bench_once(getattr(args, name), args.model, args.prompt_tokens, args.new_tokens, args.repeat)
            results[name].append(figures)
            print(f"round {round_ + 1} {name:6s} " + "  ".join(f"{k} {v:7.2f}" for k, v in figures.items()), flush=True)
    for figure in FIGURES:
        medians = {name: statistics.median(r[figure] for r in runs) for name, runs in results.items()}
        print(f"{figure}: before {medians['before']:.2f}, after {medians['after']:.2f}, "
              f"after/before {medians['after'] / medians['before']:.3f}")


if __name__ == "__main__":
    main()
