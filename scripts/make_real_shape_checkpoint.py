#!/usr/bin/env python
"""Write a random checkpoint with the real model's tensor names, shapes, dtype and config.

The real Qwen1.5-MoE-A2.7B weights cannot be downloaded in CI or on the benchmark
machine; this stands in for them byte for byte in layout: the shipped config.json
(optionally with fewer layers), every tensor of :func:`minimoe.checkpoint.names.expected_shapes`
in bf16, split into shards with a ``model.safetensors.index.json`` as on the Hub when
larger than ``--shard-gb`` (one ``model.safetensors`` otherwise), by :mod:`minimoe.checkpoint.writer`.
Values are random at a scale that keeps activations sane (std 1/sqrt(fan_in)).

    python scripts/make_real_shape_checkpoint.py OUT --layers 2             # the core benchmark
    python scripts/make_real_shape_checkpoint.py OUT --preset qwen1.5-7b    # the dense sibling
    python scripts/make_real_shape_checkpoint.py OUT --preset qwen1.5-1.8b  # what Qwen1.5-MoE was upcycled from
    python scripts/make_real_shape_checkpoint.py OUT --preset gemma-7b --layers 2   # any shipped config, e.g. the
                                                                                   # blog's comparison models

Tensors are generated and written one at a time, so memory stays at one tensor.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import ml_dtypes
import numpy as np
from tqdm import tqdm

from minimoe import ModelConfig
from minimoe.config import shipped_configs
from minimoe.checkpoint.writer import write_checkpoint
from minimoe.checkpoint.names import expected_shapes, random_init

BF16 = np.dtype(ml_dtypes.bfloat16)


def random_tensor(rng: np.random.Generator, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Random bf16 values at :func:`minimoe.checkpoint.names.random_init`'s scale."""
    mean, std = random_init(name, shape)
    return (mean + std * rng.standard_normal(shape, dtype=np.float32)).astype(BF16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to write (created)")
    parser.add_argument("--preset", default="qwen1.5-moe-a2.7b", choices=sorted(shipped_configs()))
    parser.add_argument("--layers", type=int, default=None, help="keep only the first N decoder layers")
    parser.add_argument("--shard-gb", type=float, default=4.0, help="shard size in GB (default 4, about the Hub's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    raw = json.loads(shipped_configs()[args.preset].read_text())
    if args.layers is not None:
        raw["n_layers" if raw["model_type"] == "dbrx" else "num_hidden_layers"] = args.layers  # DBRX's own key
    config = ModelConfig.from_dict(raw, source=args.preset)
    shapes = expected_shapes(config)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")

    total = sum(math.prod(s) for s in shapes.values()) * BF16.itemsize
    rng = np.random.default_rng(args.seed)
    tensors = ((name, random_tensor(rng, name, shape)) for name, shape in shapes.items())
    progress = tqdm(tensors, total=len(shapes), unit="tensor", desc=f"writing {args.out.name}")
    files = write_checkpoint(args.out, shapes, BF16, progress, shard_bytes=int(args.shard_gb * 1e9))
    print(f"{args.out}: {len(shapes)} tensors, {total / 1e9:.2f} GB in {len(files)} shards")


if __name__ == "__main__":
    main()
