#!/usr/bin/env python
"""Draw what a GPU check measured: where a decode step's time goes, and decode attention's split counts.

    python scripts/plot_gpu_check.py [docs/data/gpu/gpu_check.json] [--out docs/images]

Reads the JSON ``python -m minimoe.gpu_check --json`` writes (docs/data/gpu/gpu_check.json holds
the H200 run docs/gpu.md reports) and writes docs/images/gpu_decode_step.png: one bar per kernel
of an eager decode step, its microseconds per token and the GB/s it reached against the
measured copy rate; and docs/images/gpu_decode_attention.png: decode attention's time at each
split count, at 577 and 4,096 keys, the chosen count marked.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from matplotlib.figure import Figure

ROOT = Path(__file__).resolve().parent.parent
STREAMING = ("gemv", "attention_decode", "rope_store_kv")  # kernels whose bytes are their work


def decode_step_figure(result: dict) -> Figure:
    """Horizontal bars: each kernel's microseconds in one decode step, labelled with its GB/s."""
    step = result["benchmark"]["profile"]["decode_step"]
    rows = step["kernels"][::-1]  # the largest at the top
    copy_rate = result["device"]["copy_gb_s"]
    figure = Figure(figsize=(11, 0.38 * len(rows) + 1.8))
    axes = figure.subplots()
    labels = [row["kernel"].replace("_grouped", "").replace("gemv1", "gemv") for row in rows]
    bars = axes.barh(labels, [row["us"] for row in rows], color="#4c72b0")
    for bar, row in zip(bars, rows):
        if row["kernel"].startswith(STREAMING) and not row["kernel"].endswith("merge"):  # how close to the copy rate
            axes.text(bar.get_width(), bar.get_y() + bar.get_height() / 2,
                      f"  {row['gb_s']:,.0f} GB/s ({row['gb_s'] / copy_rate:.0%})", va="center", fontsize=8)
    graph = result["benchmark"]["minimoe"]["graph"]
    axes.set_xlabel(f"microseconds per decoded token (a kernel's launches in all layers, each timed by CUDA events);\n"
                    f"GB/s against the {copy_rate:,.0f} GB/s a device-to-device copy moves (read + written)", fontsize=9)
    axes.set_title(f"One decode step, Qwen1.5-MoE-A2.7B's shapes, {result['device']['name']}, {step['keys']} keys: "
                   f"kernels sum to {step['kernel_us']:,.0f} us;\nas a CUDA graph a token takes "
                   f"{graph['ms_per_token'] * 1e3:,.0f} us ({graph['decode_tok_s']:.0f} tokens/s)", fontsize=9)
    axes.tick_params(axis="y", labelsize=8)
    axes.set_xlim(0, max(row["us"] for row in rows) * 1.35)
    figure.tight_layout()
    return figure


def attention_figure(result: dict) -> Figure:
    """Decode attention's microseconds against split count, one line per cache length."""
    sweep = result["benchmark"]["profile"]["decode_attention"]
    figure = Figure(figsize=(7, 4))
    axes = figure.subplots()
    for keys in sorted({row["keys"] for row in sweep}):
        rows = [row for row in sweep if row["keys"] == keys]
        axes.plot([row["splits"] for row in rows], [row["us"] for row in rows], marker="o", label=f"{keys} keys")
        for row in rows:
            if row["chosen"]:
                axes.annotate("chosen", (row["splits"], row["us"]), textcoords="offset points", xytext=(4, 8),
                              fontsize=8)
    axes.set_xscale("log", base=2)
    axes.set_xlabel("splits per head (blocks = 16 x splits)")
    axes.set_ylabel("microseconds per call (with the merge)")
    axes.set_title(f"Decode attention, 16 heads of 128, batch 1, {result['device']['name']}", fontsize=9)
    axes.legend()
    figure.tight_layout()
    return figure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", type=Path, nargs="?", default=ROOT / "docs" / "data" / "gpu" / "gpu_check.json")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    args = parser.parse_args()
    result = json.loads(args.json.read_text())
    args.out.mkdir(parents=True, exist_ok=True)
    for name, figure in (("gpu_decode_step.png", decode_step_figure(result)),
                         ("gpu_decode_attention.png", attention_figure(result))):
        figure.savefig(args.out / name, dpi=90)
        print(args.out / name)


if __name__ == "__main__":
    main()
