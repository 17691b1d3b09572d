"""Shared test helpers: the reference fixtures written by scripts/make_fixtures.py."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
FIXTURE_NAMES = sorted(p.name for p in FIXTURES.iterdir() if (p / "config.json").exists())
MOE_FIXTURES = [name for name in FIXTURE_NAMES if name.startswith("moe_")]

# scripts/ holds the fixture maker, which the live tests reuse.
sys.path.insert(0, str(ROOT / "scripts"))


def load_reference(folder: Path) -> dict[str, np.ndarray]:
    """What transformers computed on a fixture (recorded by scripts/make_fixtures.py)."""
    return load_file(str(folder / "reference.safetensors"))


@pytest.fixture(params=FIXTURE_NAMES)
def fixture_dir(request) -> Path:
    return FIXTURES / request.param
