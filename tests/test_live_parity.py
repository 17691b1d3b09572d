"""The same comparisons as test_parity, on models transformers makes fresh in this run.

These need the reference implementation (torch + transformers, the ``test`` extra)
and are skipped, with that reason, where it is not installed.
"""

from __future__ import annotations

import dataclasses

import pytest

torch = pytest.importorskip("torch", reason="live parity needs torch (pip install -e '.[test]')")
pytest.importorskip("transformers", reason="live parity needs transformers (pip install -e '.[test]')")

import minimoe  # noqa: E402
import make_fixtures  # noqa: E402  (scripts/, put on sys.path by conftest)
from parity import check_cached_decoding, check_logits, check_routing  # noqa: E402

LIVE_SEED = 1000  # different weights and prompts from the recorded fixtures


@pytest.mark.parametrize("spec", make_fixtures.SPECS, ids=lambda spec: spec.name)
def test_fresh_model_matches_transformers(spec, tmp_path):
    fresh = dataclasses.replace(spec, seed=spec.seed + LIVE_SEED)
    reference = make_fixtures.build_fixture(fresh, tmp_path / spec.name)
    model = minimoe.load(tmp_path / spec.name)
    check_logits(model, reference)
    check_cached_decoding(model, reference)
    if model.config.num_experts > 0:  # a dense model has no routing to compare
        check_routing(model, reference)
