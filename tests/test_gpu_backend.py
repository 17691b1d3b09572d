"""The backend switch: a clear error without CuPy or a GPU, and the cupy backend's host code on emulated kernels."""

from __future__ import annotations

import subprocess
import sys
import types

import numpy as np
import pytest

import minimoe
from minimoe import MinimoeError
from minimoe.tools.gpu_check import relative_error  # (got, expected), reading device arrays

from conftest import FIXTURE_NAMES, FIXTURES, ROOT
from minimoe import ModelConfig
from minimoe.gpu.launch import GPU_MODEL_TYPES
import gpu_emulation


def test_importing_minimoe_does_not_import_cupy():
    code = "import sys, minimoe, minimoe.gpu, minimoe.gpu.launch, minimoe.gpu_check; print('cupy' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                            env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert result.stdout.strip() == "False", result.stderr


def test_cupy_backend_without_cupy_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # what `import cupy` sees when it is not installed
    with pytest.raises(MinimoeError, match=r"backend 'cupy' needs CuPy, which is not installed: pip install -e '.\[gpu\]'"):
        minimoe.load(minimoe.default_model_path(), backend="cupy")


def test_cupy_backend_without_a_gpu_is_a_clear_error(monkeypatch):
    def no_driver():
        raise RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")

    cupy = types.ModuleType("cupy")
    cupy.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=no_driver))
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    with pytest.raises(MinimoeError, match="CuPy is installed but finds no usable GPU .*cudaErrorNoDevice"):
        minimoe.load(minimoe.default_model_path(), backend="cupy")


def test_unknown_backend_lists_every_backend():
    with pytest.raises(MinimoeError, match=r"unknown backend 'tpu'; choose one of \('numpy', 'cupy', 'cupy-plain'\)"):
        minimoe.load(minimoe.default_model_path(), backend="tpu")


def test_to_numpy_passes_numpy_through_and_reads_device_arrays():
    array = np.arange(3.0)
    assert minimoe.to_numpy(array) is array

    class DeviceArray:  # what minimoe.to_numpy relies on in a CuPy array
        __cuda_array_interface__ = {}

        def get(self):
            return array

    assert minimoe.to_numpy(DeviceArray()) is array


# --- the cupy backend on emulated kernels ------------------------------------------------------------

@pytest.fixture
def emulated(monkeypatch):
    gpu_emulation.install(monkeypatch)


def both(folder):
    return minimoe.load(folder), minimoe.load(folder, backend="cupy")


# The families the GPU backend implements (the others are refused at load: tests/test_moe_family.py).
GPU_FIXTURES = [name for name in FIXTURE_NAMES if ModelConfig.from_file(FIXTURES / name).model_type in GPU_MODEL_TYPES]


@pytest.mark.parametrize("name", GPU_FIXTURES)
def test_gpu_model_matches_numpy_on_every_fixture(emulated, name):
    cpu, gpu = both(FIXTURES / name)
    assert isinstance(gpu, minimoe.Model) and gpu.backend == "cupy" and type(gpu.ops).__name__ == "KernelOperations"
    ids = np.arange(21) * 7 % cpu.config.vocab_size  # 21 tokens: the GEMM path (more than GEMV_MAX_ROWS)
    assert relative_error(gpu.forward(ids), cpu.forward(ids)) < 1e-5
    batch = np.stack([ids[:5], ids[5:10]])  # 5 tokens x 2: GEMV path, batched attention
    assert relative_error(gpu.forward(batch), cpu.forward(batch)) < 1e-5


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_plain_cupy_runs_the_reference_operations_on_every_fixture(emulated, name):
    """backend="cupy-plain": the model's one composition with the reference operations of minimoe.ops, every
    family (no kernel is involved, so none is refused), through the KV cache too."""
    cpu, plain = minimoe.load(FIXTURES / name), minimoe.load(FIXTURES / name, backend="cupy-plain")
    assert plain.backend == "cupy-plain" and type(plain.ops).__name__ == "Operations"
    ids = np.arange(12) * 7 % cpu.config.vocab_size
    assert relative_error(plain.forward(ids), cpu.forward(ids)) < 1e-5
    caches = cpu.new_cache(), plain.new_cache()
    for model, cache in zip((cpu, plain), caches):
        model.forward(ids[:10], cache=cache)
    assert relative_error(plain.forward(ids[10:], cache=caches[1]), cpu.forward(ids[10:], cache=caches[0])) < 1e-5


def test_gpu_decoding_through_the_cache_matches_numpy(emulated):
    cpu, gpu = both(minimoe.default_model_path())
    ids = np.arange(30) * 11 % cpu.config.vocab_size
    caches = cpu.new_cache(capacity=16), gpu.new_cache(capacity=16)  # grows past 16 while decoding
    for model, cache in zip((cpu, gpu), caches):
        model.forward(ids[:12], cache=cache)
    for position in range(12, 30):
        expected = cpu.forward(ids[position : position + 1], cache=caches[0])
        assert relative_error(gpu.forward(ids[position : position + 1], cache=caches[1]), expected) < 1e-5
    assert cpu.generate(ids[:8], 6, temperature=0) == gpu.generate(ids[:8], 6, temperature=0)


# moe_norm_topk's shared expert runs on its own (24 wide, experts 16); the bundled model's as 4 of its experts
# (352 = 4 x 88).  5 tokens route and dispatch in one launch, 12 in two.
@pytest.mark.parametrize("folder", [FIXTURES / "moe_norm_topk", minimoe.default_model_path()], ids=["own", "groups"])
@pytest.mark.parametrize("tokens", [5, 12])
def test_gpu_traces_and_interventions_match_numpy(emulated, folder, tokens):
    cpu, gpu = both(folder)
    ids = np.arange(tokens) * 5 % cpu.config.vocab_size
    layer = cpu.config.sparse_layers[0]
    for change in ({}, {"disabled_experts": {layer: [0, 3]}}, {"forced_experts": {layer: [1, 2]}}, {"top_k": 2},
                   {"shared_expert": False}):
        a, b = cpu.trace(ids, interventions=change), gpu.trace(ids, interventions=change)
        assert np.array_equal(a.expert_ids, b.expert_ids), change
        for field in ("router_logits", "router_probs", "expert_weights", "shared_gate", "shared_norm", "routed_norm",
                      "attention_norm", "logits"):
            want = getattr(a, field)  # float32 sums in another order: noise at the field's own scale
            scale = np.abs(want[np.isfinite(want)]).max(initial=1.0)
            np.testing.assert_allclose(getattr(b, field), want, rtol=1e-4, atol=1e-6 * scale, err_msg=str(change))
    assert gpu.aux_loss(ids) == pytest.approx(cpu.aux_loss(ids), rel=1e-5)


def test_the_graph_decoders_fixed_buffer_step_matches_numpy(emulated):
    from minimoe.tools import gpu_check

    (check,) = gpu_check.check_graph_decode(minimoe.default_model_path(), np.random.default_rng(0), capture=False,
                                            prompt=10, steps=14, capacity=16)  # the cache grows past 16 on the way
    assert check.error < 1e-5, check


def test_the_graph_decoder_counts_one_launch_per_kernel_and_refuses_a_large_batch(emulated):
    from minimoe.gpu import kernels
    from minimoe.gpu.decode import GraphDecoder

    gpu = minimoe.load(FIXTURES / "moe_gqa", backend="cupy")
    cache = gpu.new_cache()
    gpu.forward(np.ones((2, 3), dtype=int), cache=cache)
    decoder = GraphDecoder(gpu, cache, capture=False)
    before = kernels.launches
    decoder([1, 2])
    c = gpu.config
    sparse, dense = len(c.sparse_layers), c.num_hidden_layers - len(c.sparse_layers)
    # per layer: norm, qkv, rope, attention (+ merge when split), o, add_norm; sparse: router (with the shared
    # gate), route_dispatch, gate_up, down, shared gate_up, shared down (24 wide: not whole experts of 16), combine;
    # dense: gate_up, down; then the final norm and the output head
    per_layer = 6 + (launch_splits(gpu, cache) > 1)
    assert kernels.launches - before == 1 + c.num_hidden_layers * per_layer + 7 * sparse + 2 * dense + 2
    big = gpu.new_cache()
    gpu.forward(np.ones((9, 2), dtype=int), cache=big)
    with pytest.raises(MinimoeError, match="batches of up to 8 sequences"):
        GraphDecoder(gpu, big)
    with pytest.raises(MinimoeError, match="run the prompt through model.forward"):
        GraphDecoder(gpu, gpu.new_cache())


def launch_splits(model, cache) -> int:
    from minimoe.gpu import launch

    return launch.decode_splits(cache.capacity, model.config.num_attention_heads, cache.batch_size)


def test_rope_store_kv_refuses_to_write_past_the_caches_capacity(emulated):
    import cupy

    from minimoe.gpu import kernels

    heads, kv_heads, D, tokens = 2, 1, 8, 3
    rows = cupy.zeros((tokens, (heads + 2 * kv_heads) * D), dtype=np.float32)
    cos, sin = np.ones((tokens, D), np.float32), np.zeros((tokens, D), np.float32)
    k_cache, v_cache = (cupy.zeros((1, kv_heads, 5, D), dtype=np.float32) for _ in range(2))
    kernels.rope_store_kv(rows, cos, sin, k_cache, v_cache, 2, tokens, heads, kv_heads, D)  # positions 2..4: fits
    with pytest.raises(MinimoeError, match="positions 3..5 is past its capacity of 5"):
        kernels.rope_store_kv(rows, cos, sin, k_cache, v_cache, 3, tokens, heads, kv_heads, D)


def test_emulated_router_breaks_ties_by_lower_id_and_survives_unusable_rows(emulated):
    import cupy

    from minimoe.tools import gpu_check

    inputs = gpu_check.Inputs(cupy, np.random.default_rng(0), dict(experts=10, top_k=3, hidden=24))
    checks = gpu_check.check_router_ties(inputs, 50) + gpu_check.check_unusable_router_rows(inputs)
    assert [(c.name, c.error) for c in checks if not c.passed] == []


def test_step_through_asks_for_the_numpy_backend(emulated):
    gpu = minimoe.load(FIXTURES / "moe_gqa", backend="cupy")
    with pytest.raises(MinimoeError, match="step_through runs on the numpy backend"):
        gpu.step_through([1, 2, 3], layer=0)
