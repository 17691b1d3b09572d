"""A model from scratch: a checkpoint of random weights drawn as transformers draws them.

    write_random_checkpoint(config_json_dict, "runs/scratch", seed=0, side_files_from=tokenizer_dir)

transformers' ``_init_weights`` for the Qwen2 / Qwen2-MoE family (and the others minimoe reads): every
matrix -- embeddings, projections, experts, the router, the shared expert's gate, the output head --
from N(0, ``initializer_range``), every bias 0, every RMSNorm weight 1.  The same seed gives the
same bytes; the numbers are NumPy's, not torch's, so a model from scratch here and one from
transformers are two draws from one distribution.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from ..checkpoint.names import expected_shapes
from ..checkpoint.writer import SIDE_FILES, write_checkpoint
from ..config import ModelConfig

INITIALIZER_RANGE = 0.02  # transformers' default for these configs


def initial_value(name: str, shape: tuple[int, ...], rng: np.random.Generator, std: float) -> np.ndarray:
    """One tensor's starting value, by what its name says it is: ``[shape]`` float32."""
    if name.endswith("norm.weight"):
        return np.ones(shape, dtype=np.float32)
    if name.endswith(".bias"):
        return np.zeros(shape, dtype=np.float32)
    return (rng.standard_normal(shape, dtype=np.float32) * np.float32(std)).astype(np.float32)


def write_random_checkpoint(config: dict, out: str | Path, seed: int = 0, side_files_from: str | Path | None = None,
                            dtype=np.float32) -> Path:
    """Write ``config`` (a config.json's contents) and random weights for it into the new folder ``out``.

    ``side_files_from``: a checkpoint folder whose tokenizer and generation files come along.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=False)
    parsed = ModelConfig.from_dict(config, source=f"{out}/config.json")
    std = float(config.get("initializer_range", INITIALIZER_RANGE))
    rng = np.random.default_rng(seed)
    shapes = expected_shapes(parsed)
    write_checkpoint(out, shapes, np.dtype(dtype),
                     ((name, initial_value(name, shape, rng, std).astype(dtype)) for name, shape in shapes.items()))
    if side_files_from is not None:
        for name in SIDE_FILES:
            if (Path(side_files_from) / name).is_file():
                shutil.copyfile(Path(side_files_from) / name, out / name)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


__all__ = ["write_random_checkpoint", "initial_value", "INITIALIZER_RANGE"]
