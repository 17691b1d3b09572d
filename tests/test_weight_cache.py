"""The float32 weight cache (``minimoe.load(path, max_memory=...)``): budget, eviction order, identical results."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

import minimoe
from minimoe import MinimoeError, backend
from minimoe.bench import proc_field_bytes
from minimoe.routing import trace_generation
from minimoe.weight_cache import WeightCache, parse_bytes

from conftest import FIXTURES, load_reference
from parity import check_logits

FIXTURE = FIXTURES / "moe_bf16_sharded"


@pytest.mark.parametrize("text, expected", [
    ("4GB", 4_000_000_000), ("512MB", 512_000_000), ("2GiB", 2 * 2**30), ("1.5 GB", 1_500_000_000),
    ("100", 100), (123, 123), ("0", 0), ("64kib", 65536),
])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["lots", "4 GBs", "-1GB", "", "1e9"])
def test_parse_bytes_rejects_nonsense(text):
    with pytest.raises(MinimoeError, match="memory size"):
        parse_bytes(text)


def _fill(cache: WeightCache, key, nbytes: int) -> bool:
    """What backend.project does on a miss: allocate, fill the copy, store it."""
    if cache.lookup(key) is not None:
        return True
    copy = cache.allocate((nbytes // 4,))
    if copy is None:
        return False
    copy[:] = 1.0
    cache.store(key, copy)
    return True


def test_least_recently_used_is_evicted_first():
    cache = WeightCache(300)
    for key in "abc":
        _fill(cache, key, 100)
    assert cache.lookup("a") is not None  # a is now the most recent: b is the oldest
    _fill(cache, "d", 100)
    assert cache.keys() == ["c", "a", "d"]
    _fill(cache, "e", 200)  # needs two slots: c and a go
    assert cache.keys() == ["d", "e"]
    assert cache.stats()["evictions"] == 3


def test_budget_is_never_exceeded_and_oversized_weights_are_not_admitted():
    cache = WeightCache(1000)
    rng = np.random.default_rng(0)
    for step in range(500):
        key = int(rng.integers(0, 20))
        _fill(cache, key, 50 + 30 * key)  # sizes 50..620 bytes
        assert cache.used_bytes <= cache.budget_bytes
        assert cache.used_bytes == sum(cache.lookup(k).nbytes for k in cache.keys())
    assert cache.allocate((251,)) is None
    assert len(cache) > 0, "an oversized request must not evict anything"


def test_an_evicted_copy_is_reused_unless_still_in_use():
    cache = WeightCache(400)
    _fill(cache, "a", 400)
    a = cache.lookup("a")
    held = cache.allocate((100,))  # evicts a, which a caller still holds: fresh memory
    assert held is not None and not np.shares_memory(held, a)
    cache.store("b", held)
    address = held.__array_interface__["data"][0]
    del a, held
    reused = cache.allocate((10, 10))  # evicts b, held by no one: its memory again
    assert reused.__array_interface__["data"][0] == address and reused.shape == (10, 10)
    assert cache.used_bytes == 400 and cache.stats()["evictions"] == 2


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RssAnon from /proc (Linux)")
def test_churn_stays_within_the_budget_in_memory():
    """Evicting and refilling 10 MB copies from two threads must not grow the process past the budget."""
    budget = 60_000_000
    cache = WeightCache(budget)
    before = rss_anon()
    peak = 0

    def churn(offset):
        nonlocal peak
        rng = np.random.default_rng(offset)
        for _ in range(60):
            key = int(rng.integers(0, 30))
            if cache.lookup(key) is None and (copy := cache.allocate((2_500_000,))) is not None:
                copy.fill(1.0)  # touch every page
                cache.store(key, copy)
            peak = max(peak, rss_anon() - before)

    threads = [threading.Thread(target=churn, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert cache.stats()["evictions"] > 20
    # Slack: a copy evicted while the other thread still holds it is freed, not reused (the allocator
    # may keep that block); without reuse at all this grows by ~110 MB.
    assert peak <= budget + 35_000_000, f"grew by {peak / 1e6:.0f} MB for a {budget / 1e6:.0f} MB budget"


def rss_anon() -> int:
    return proc_field_bytes("/proc/self/status", "RssAnon")


def test_counters():
    cache = WeightCache(100)
    _fill(cache, "a", 60)
    _fill(cache, "a", 60)
    _fill(cache, "b", 60)  # evicts a
    _fill(cache, "a", 60)  # evicts b
    stats = cache.stats()
    assert (stats["hits"], stats["misses"], stats["evictions"]) == (1, 3, 2)
    assert stats["hit_rate"] == pytest.approx(0.25)
    assert (stats["used_bytes"], stats["budget_bytes"], stats["cached_weights"]) == (60, 100, 1)


@pytest.fixture
def blocked(monkeypatch):
    """The fixtures' weights are small enough to be upcast once at load; make them go through
    the blocked (and cacheable) path, in several blocks per matrix."""
    monkeypatch.setattr(backend, "SMALL_MATRIX_ELEMENTS", 0)
    monkeypatch.setattr(backend, "BLOCK_ELEMENTS_DECODE", 100)
    monkeypatch.setattr(backend, "BLOCK_ELEMENTS_PREFILL", 300)


def _expert_weights(model) -> list:
    return [w for layer in model.decoder if layer.is_sparse for e in layer.mlp.experts for w in (e.gate, e.up, e.down)]


def _prompt() -> np.ndarray:
    return load_reference(FIXTURE)["ids"][0]


def test_only_routed_experts_are_cached(blocked):
    model = minimoe.load(FIXTURE, max_memory="1GB")
    experts = _expert_weights(model)
    assert experts and all(w.cache is model.weight_cache for w in experts)
    others = [model.lm_head]
    for layer in model.decoder:
        others += [layer.attention.q, layer.attention.o]
        if layer.is_sparse:
            others += [layer.mlp.shared.gate, layer.mlp.shared.down]
    assert all(w.cache is None for w in others)


def test_results_identical_with_and_without_cache_and_match_transformers(blocked):
    reference = load_reference(FIXTURE)
    ids = _prompt()
    plain = minimoe.load(FIXTURE)
    expected_logits = plain.forward(ids)
    expected_tokens = plain.generate(ids[:6], 8, temperature=0)
    total = sum(w.weight.size * 4 for w in _expert_weights(plain))
    for budget in (0, total // 2, 2 * total):  # half: more than one token's experts, so LRU can hit
        model = minimoe.load(FIXTURE, max_memory=budget)
        for _ in range(2):  # the second pass reads whatever the first one kept
            np.testing.assert_array_equal(model.forward(ids), expected_logits)
            assert model.weight_cache.used_bytes <= budget
        assert model.generate(ids[:6], 8, temperature=0) == expected_tokens
        assert model.weight_cache.used_bytes <= budget
        check_logits(model, reference)
        hits = model.cache_stats()["hits"]
        assert (hits > 0) == (budget > 0), f"budget {budget}: {hits} hits"


def test_everything_is_cached_when_it_fits_and_second_pass_only_hits(blocked):
    model = minimoe.load(FIXTURE, max_memory="1GB")
    model.forward(_prompt())
    first = model.cache_stats()
    assert first["hits"] == 0 and first["evictions"] == 0 and first["misses"] > 0
    model.forward(_prompt())
    second = model.cache_stats()
    assert second["misses"] == first["misses"] and second["hits"] == first["misses"]
    for linear in model.weight_cache.keys():  # each copy is exactly its bf16 weight, upcast
        np.testing.assert_array_equal(model.weight_cache.lookup(linear), linear.weight.astype(np.float32))


def test_small_budget_keeps_the_last_layers_chosen_experts(blocked):
    """Room for one expert's three matrices: after a step, what is left is one the last sparse layer chose."""
    model = minimoe.load(FIXTURE, max_memory="1GB")
    expert = model.decoder[-1].mlp.experts[0]
    one_expert = sum(w.weight.size * 4 for w in (expert.gate, expert.up, expert.down))
    model = minimoe.load(FIXTURE, max_memory=one_expert)
    trace = model.trace(_prompt()[:1])
    last = model.decoder[trace.layers[-1]].mlp.experts
    chosen = {w for e in trace.expert_ids[-1, 0] for w in (last[e].gate, last[e].up, last[e].down)}
    kept = model.weight_cache.keys()
    assert len(kept) == 3 and set(kept) <= chosen


def test_trace_reports_which_chosen_experts_were_cached(blocked):
    model = minimoe.load(FIXTURE, max_memory="1GB")
    first, second = model.trace(_prompt()), model.trace(_prompt())
    assert not first.cache_hit.any()  # cold: every chosen expert was upcast
    assert second.cache_hit.all()  # everything fit: every chosen expert was a float32 copy already
    small = minimoe.load(FIXTURE, max_memory=model.weight_cache.used_bytes // 2)
    _, trace = trace_generation(small, _prompt()[:4], 8, temperature=0)
    decoded = trace.cache_hit[:, 4:]  # the generated tokens, one forward each
    assert decoded.any() and not decoded.all()
    uncached = minimoe.load(FIXTURE).trace(_prompt())
    assert uncached.cache_hit.shape == uncached.expert_ids.shape and not uncached.cache_hit.any()


def test_a_failed_fill_gives_its_bytes_back(blocked):
    model = minimoe.load(FIXTURE, max_memory="1GB")
    expert = model.decoder[-1].mlp.experts[0]
    with pytest.raises(ValueError):  # wrong input width: the matmul fails after the copy was allocated
        backend.project([expert.gate, expert.up], np.ones((1, expert.gate.shape[1] + 1), dtype=np.float32))
    assert model.weight_cache.used_bytes == 0 and len(model.weight_cache) == 0


def test_no_cache_without_a_budget():
    model = minimoe.load(FIXTURE)
    assert model.weight_cache is None and model.cache_stats() is None


def test_bad_budget_is_a_clear_error():
    with pytest.raises(MinimoeError, match="memory size"):
        minimoe.load(FIXTURE, max_memory="a lot")


def test_max_memory_is_for_the_numpy_backend_only():
    with pytest.raises(MinimoeError, match="NumPy backend"):
        minimoe.load(FIXTURE, backend="cupy", max_memory="1GB")
