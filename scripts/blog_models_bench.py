#!/usr/bin/env python
"""Decode tokens/s of the five models in the Qwen1.5-MoE blog's table, measured by ``minimoe bench`` on stand-ins.

Each model is a real-shape stand-in of two decoder layers (random bf16 weights in the Hub's layout, written by
``scripts/make_real_shape_checkpoint.py --layers 2``), so all five fit on one small machine:

    for preset in mistral-7b gemma-7b qwen1.5-7b deepseek-moe-16b-base qwen1.5-moe-a2.7b; do
        python scripts/make_real_shape_checkpoint.py STANDINS/$preset --preset $preset --layers 2
    done
    python scripts/blog_models_bench.py STANDINS --rounds 3 --json docs/data/blog_models_decode.json

The machine may be shared, so the models are interleaved: every round runs ``minimoe bench`` once on each (in
an order rotated from round to round), and each model's figure is the median over rounds of the warm decode
tokens/s ``minimoe bench`` reports.  Beside each figure: the bytes one decoded token reads on that stand-in
(:func:`minimoe.inspect.params.token_cost`, bf16 weights and cache), and the two divided (GB/s).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from minimoe import ModelConfig
from minimoe.files import write_text
from minimoe.inspect.params import Architecture, token_cost

BLOG_TABLE = {  # the blog's label: the shipped config its stand-in is written from
    "Mistral-7B": "mistral-7b",
    "Qwen1.5-7B": "qwen1.5-7b",
    "Gemma-7B": "gemma-7b",
    "DeepSeekMoE 16B": "deepseek-moe-16b-base",
    "Qwen1.5-MoE-A2.7B": "qwen1.5-moe-a2.7b",
}


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def bench_once(folder: Path, prompt_tokens: int, new_tokens: int, repeat: int) -> float:
    """``minimoe bench`` on one checkpoint -> its warm decode tokens/s."""
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "bench.json"
        subprocess.run([sys.executable, "-m", "minimoe", "bench", "--model", str(folder), "--prompt-tokens",
                        str(prompt_tokens), "--new-tokens", str(new_tokens), "--repeat", str(repeat), "--json", str(out)],
                       check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())["engines"]["minimoe"]["metrics"]["decode_warm_tok_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("standins", type=Path, help="folder holding one stand-in per shipped config name")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=17)
    parser.add_argument("--repeat", type=int, default=2, help="warm runs per bench (their median is its figure)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()

    runs: dict[str, list[float]] = {label: [] for label in BLOG_TABLE}
    labels = list(BLOG_TABLE)
    with tqdm(total=args.rounds * len(labels), unit="bench") as progress:
        for round_ in range(args.rounds):
            for label in labels[round_ % len(labels):] + labels[:round_ % len(labels)]:
                progress.set_description(f"round {round_ + 1}: {label}")
                runs[label].append(bench_once(args.standins / BLOG_TABLE[label], args.prompt_tokens, args.new_tokens,
                                              args.repeat))
                progress.update()

    context = args.prompt_tokens + args.new_tokens // 2  # the cache's mean length while decoding
    rows = {}
    for label, name in BLOG_TABLE.items():
        arch = Architecture.from_model_config(ModelConfig.from_file(args.standins / name))
        gb = token_cost(arch, context).bytes_read / 1e9
        tok_s = float(np.median(runs[label]))
        rows[label] = {"config": name, "decode_tok_s": tok_s, "runs": runs[label], "gb_read_per_token": gb,
                       "gb_per_s": tok_s * gb}
    result = {"command": " ".join(["python", "scripts/blog_models_bench.py", "STANDINS", "--rounds", str(args.rounds),
                                   "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
                                   "--repeat", str(args.repeat)]),
              "cpu": cpu_name(), "layers": 2, "context": context, "models": rows}
    for label, row in rows.items():
        print(f"{label:18s} {row['decode_tok_s']:7.2f} tok/s  {row['gb_read_per_token']:5.2f} GB/token  "
              f"{row['gb_per_s']:5.2f} GB/s  runs {[round(r, 2) for r in row['runs']]}")
    if args.json:
        write_text(args.json, json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
