#!/usr/bin/env python
"""The Qwen1.5-MoE blog's speed claim, measured with minimoe: MoE vs dense decode tokens/s, side by side.

The blog says Qwen1.5-MoE-A2.7B "accelerates inference speed by a factor of 1.74" against
Qwen1.5-7B, without saying how that was measured (docs/real-weights.md).  Here
both stand-in checkpoints (random weights, the real shapes and layout; written by
``scripts/make_real_shape_checkpoint.py``) are run by ``minimoe bench`` one after the
other, and the table sets the measured ratio beside the two ratios that explain it: the
weight bytes each token reads (what a bandwidth-bound decoder's speed follows) and the
bytes each warm run had to read from disk (non-zero when the checkpoint is larger than
what the page cache can hold).

    python scripts/make_real_shape_checkpoint.py /data/moe-full
    python scripts/make_real_shape_checkpoint.py /data/qwen-7b --preset qwen1.5-7b
    python scripts/moe_vs_dense.py /data/moe-full /data/qwen-7b --json moe_vs_dense.json

This is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from minimoe import ModelConfig
from minimoe.tools.bench import benchmark
from minimoe.inspect.params import count_parameters

BLOG_RATIO = 1.74  # the blog's "accelerates inference speed by a factor of 1.74" (how it was measured: not said)


def measure(folder: Path, args: argparse.Namespace) -> dict:
    """minimoe's bench figures for one checkpoint, plus its active weight bytes per token and size on disk."""
    summary = benchmark(folder, ["minimoe"], args.prompt_tokens, args.new_tokens, args.repeat)
    figures = summary["engines"]["minimoe"]["metrics"]
    config = ModelConfig.from_file(folder)
    counts = count_parameters(config)
    # bf16 weights each token reads: the activated parameters, less the embedding table (one row per token).
    active_bytes = 2 * (counts.activated - config.vocab_size * config.hidden_size)
    checkpoint_bytes = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    return {"model": str(folder), "active_gb_per_token": active_bytes / 1e9, "checkpoint_gb": checkpoint_bytes / 1e9,
            **figures}


ROWS = [
    ("checkpoint on disk (GB)", "checkpoint_gb", "{:.1f}"),
    ("bf16 weights read per token (GB)", "active_gb_per_token", "{:.2f}"),
    ("prefill, warm (tokens/s)", "prefill_warm_tok_s", "{:.2f}"),
    ("decode, warm (tokens/s)", "decode_warm_tok_s", "{:.3f}"),
    ("read from disk, cold run (GB)", "disk_read_cold_gb", "{:.2f}"),
    ("read from disk, warm run (GB)", "disk_read_warm_gb", "{:.2f}"),
    ("peak RssAnon (GB)", "peak_rss_anon_gb", "{:.2f}"),
]


def table(moe: dict, dense: dict) -> list[str]:
    lines = [f"{'':36}{'MoE':>10}{'dense':>10}{'MoE/dense':>11}"]
    for label, key, fmt in ROWS:
        ratio = moe[key] / dense[key] if dense[key] else float("nan")
        lines.append(f"{label:36}{fmt.format(moe[key]):>10}{fmt.format(dense[key]):>10}{ratio:>10.2f}x")
    bound = dense["active_gb_per_token"] / moe["active_gb_per_token"]
    lines += ["", f"decode speed-up, measured: {moe['decode_warm_tok_s'] / dense['decode_warm_tok_s']:.2f}x; "
              f"the blog: {BLOG_RATIO}x; a purely bandwidth-bound decoder with every weight in RAM: {bound:.2f}x"]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("moe", type=Path, help="the Qwen1.5-MoE-A2.7B-shaped checkpoint folder")
    parser.add_argument("dense", type=Path, help="the Qwen1.5-7B-shaped checkpoint folder")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=9)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    moe, dense = measure(args.moe, args), measure(args.dense, args)
    print("\n".join(table(moe, dense)))
    if args.json:
        args.json.write_text(json.dumps({"moe": moe, "dense": dense, "blog_ratio": BLOG_RATIO}, indent=2) + "\n")


if __name__ == "__main__":
    main()
