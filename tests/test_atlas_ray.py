"""The atlas on Ray (a local cluster of 2 CPUs): the same atlas as the local engine, bit for bit, even when an
actor is killed mid-shard."""

from __future__ import annotations

import pytest

import minimoe.atlas
from minimoe.atlas.engine import KILL_ONCE

from test_atlas import MODEL, WINDOW, assert_same, write_corpus

ray = pytest.importorskip("ray", reason="the ray extra is not installed")


@pytest.fixture(scope="module")
def marker(tmp_path_factory):
    """A file whose presence kills the first actor to find it (its workers inherit the environment at ray.init)."""
    marker = tmp_path_factory.mktemp("ray") / "kill-once"
    patch = pytest.MonkeyPatch()
    patch.setenv(KILL_ONCE, str(marker))
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    patch.delenv(KILL_ONCE)  # the local engine's workers (below) must not find it
    yield marker
    ray.shutdown()


def test_ray_gives_the_local_atlas_even_when_an_actor_dies(marker, tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    options = dict(window=WINDOW, progress=False, page=False)
    local = minimoe.atlas.build([corpus], tmp_path / "local", MODEL, shard_size=3, **options)
    marker.touch()
    on_ray = minimoe.atlas.build([corpus], tmp_path / "ray", MODEL, engine="ray", workers=2, shard_size=1, **options)
    assert not marker.exists()  # an actor did die, and its shard was computed again
    assert_same(local, on_ray)
