"""python -m minimoe.gpu_check without a GPU: its arithmetic, table, arguments, its clear exit, and its
checks themselves run over emulated kernels (tests/gpu_emulation.py) at small shapes."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from minimoe import ModelConfig
from minimoe.tools import gpu_check
from minimoe.checkpoint import names as minimoe_names
from minimoe.config import shipped_configs

import gpu_emulation

REPO = Path(__file__).resolve().parent.parent

QWEN_MOE = ModelConfig.from_dict(json.loads(shipped_configs()["qwen1.5-moe-a2.7b"].read_text()), source="test")


def test_decode_bytes_per_token_of_qwen_moe():
    h, v, e, layers = 2048, 151936, 60, 24
    attention = 4 * h * h + 3 * h  # q, k, v, o + the q/k/v biases
    per_layer = attention + 2 * h + e * h + 3 * h * 5632 + h + 4 * 3 * h * 1408  # norms, router, shared + gate, 4 experts
    expected = 2 * (layers * per_layer + h + v * h + h)  # final norm, lm_head, one embedding row; 2 bytes each
    assert gpu_check.decode_bytes_per_token(QWEN_MOE) == expected
    assert expected / 1e9 == pytest.approx(4.76, abs=0.01)  # 2.07B active non-embedding + 0.31B head, in bf16
    assert gpu_check.bandwidth_bound(expected, 4.3e12) == pytest.approx(4.3e12 / expected)


def test_kv_bytes_per_token_count_every_cached_key_and_value():
    # 24 layers x (k, v) x 16 heads x 128 dims x 4 bytes (float32) per position: 226 MB at 576 keys, 1.6 GB at 4k
    assert gpu_check.kv_bytes_per_token(QWEN_MOE, 576) == 24 * 2 * 16 * 128 * 4 * 576
    assert gpu_check.kv_bytes_per_token(QWEN_MOE, 576) / 1e6 == pytest.approx(226.5, abs=0.1)
    assert gpu_check.kv_bytes_per_token(QWEN_MOE, 4096) / 1e9 == pytest.approx(1.61, abs=0.01)


def test_format_table_aligns_columns():
    table = gpu_check.format_table(["check", "error"], [["rms_norm", 1.5e-7], ["route ids", 0]]).splitlines()
    assert table[0] == "check        error"
    assert table[1] == "---------  -------"
    assert table[2] == "rms_norm   1.5e-07"
    assert table[3] == "route ids        0"


def test_parse_args_defaults_and_options(tmp_path):
    args = gpu_check.parse_args([])
    assert (args.stages, args.shapes, args.bench_layers, args.prefill, args.decode, args.checkpoint) == (
        ["kernels", "models", "train", "bench"], ["real", "odd"], 24, 512, 64, None)
    args = gpu_check.parse_args(["--no-bench", "--decode", "8", "--checkpoint", str(tmp_path), "--json", "out.json"])
    assert args.stages == ["kernels", "models", "train"] and args.decode == 8 and args.checkpoint == tmp_path
    assert args.json.name == "out.json"
    args = gpu_check.parse_args(["--stages", "kernels", "--shapes", "odd"])
    assert (args.stages, args.shapes) == (["kernels"], ["odd"])


def test_parse_args_names_an_unknown_stage(capsys):
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--stages", "kernels,speed"])
    assert "--stages: unknown speed; choose from kernels, models, train, bench" in capsys.readouterr().err


def measured(decode_tok_s: float, launches: float, host_ms: float) -> dict:
    return {"decode_tok_s": decode_tok_s, "ms_per_token": 1e3 / decode_tok_s, "launches_per_token": launches,
            "host_ms_per_token": host_ms, "tokens": [1, 2]}


def test_benchmark_rows_hold_eager_and_graph_decode_to_both_targets():
    ours = {"prefill_tok_s": 5000.0, "memory_gb": 6.0, "eager": measured(300.0, 400.0, 3.0),
            "graph": measured(600.0, 0.0, 0.1)}
    theirs = {"prefill_tok_s": 4000.0, "decode_tok_s": 50.0, "memory_gb": 7.0}
    rows = gpu_check.benchmark_rows(ours, theirs, bound=1000.0)
    assert rows[0][:3] == ["minimoe (cupy), eager decode", 5000.0, 300.0]
    assert rows[0][4] == "6.00x (target >= 3x)" and rows[0][5] == "30% of 1,000 (target >= 50%)"
    assert rows[1][:3] == ["minimoe (cupy), CUDA-graph decode", 5000.0, 600.0]
    assert rows[1][4] == "12.00x (target >= 3x)" and rows[1][5] == "60% of 1,000 (target >= 50%)"
    assert rows[2][:4] == ["transformers (bf16, eager)", 4000.0, 50.0, 7.0]
    assert gpu_check.launch_rows(ours) == [["eager", 300.0, 400.0, 3.0, 1e3 / 300],
                                           ["CUDA graph", 600.0, 0.0, 0.1, 1e3 / 600]]


def test_benchmark_rows_say_why_a_part_is_missing():
    ours = {"prefill_tok_s": 5000.0, "memory_gb": 6.0, "eager": measured(300.0, 400.0, 3.0),
            "graph": {"error": "CUDA-graph decode failed: RuntimeError: x"}}
    rows = gpu_check.benchmark_rows(ours, {"error": "transformers could not be timed: OutOfMemoryError: y"}, 1000.0)
    assert rows[1][:2] == ["minimoe (cupy), CUDA-graph decode", "CUDA-graph decode failed: RuntimeError: x"]
    assert rows[2][1] == "transformers could not be timed: OutOfMemoryError: y" and rows[0][4].startswith("nanx")
    assert len(gpu_check.launch_rows(ours)) == 1


def test_format_benchmark_states_the_setting_and_the_bound():
    result = {"source": "random weights (made on the GPU)", "layers": 24, "prefill_tokens": 512, "decode_steps": 64,
              "mean_keys": 545.5, "weight_bytes_per_token": 4_760_000_000, "kv_bytes_per_token": 214_000_000,
              "copy_gb_s": 4300.0, "bound_tok_s": 864.5,
              "minimoe": {"prefill_tok_s": 5000.0, "memory_gb": 31.0, "eager": measured(300.0, 410.0, 3.2)},
              "transformers": {"prefill_tok_s": 4000.0, "decode_tok_s": 60.0, "memory_gb": 32.0}}
    text = gpu_check.format_benchmark(result)
    assert text.startswith("Benchmark: 24 layers of Qwen1.5-MoE-A2.7B's shapes (random weights (made on the GPU)); "
                           "prefill 512 tokens, then 64 greedy decode steps, batch 1.  Bound = 4.97 GB per token "
                           "(4.76 GB of bf16 weights + 0.21 GB of float32 KV cache at 546 keys) / 4,300 GB/s measured.")
    assert "5.00x (target >= 3x)" in text and "35% of 864 (target >= 50%)" in text
    assert text.splitlines()[-1].split() == ["eager", "300", "410", "3.2", "3.333"]


def test_without_cupy_it_exits_1_with_a_reason_also_in_the_json(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "cupy", None)
    assert gpu_check.main(["--no-bench", "--json", str(tmp_path / "out.json")]) == 1
    assert "gpu_check: nothing to check here: backend 'cupy' needs CuPy" in capsys.readouterr().err
    assert json.loads((tmp_path / "out.json").read_text())["error"].startswith("backend 'cupy' needs CuPy")


def installed_copy(tmp_path: Path) -> Path:
    """The package alone in a folder, as a wheel installs it: no tests/ or scripts/ beside it."""
    import shutil

    site = tmp_path / "site"
    shutil.copytree(REPO / "minimoe", site / "minimoe", ignore=shutil.ignore_patterns("__pycache__"))
    return site


def test_it_starts_with_numpy_and_cupy_alone(tmp_path):
    """Installed without the repository around it, and without threadpoolctl, ml_dtypes, tqdm or tokenizers,
    the check still starts and reports: imports of them fail in a child process, and it must still get as
    far as saying CuPy is missing."""
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text("import sys\nfor name in ('threadpoolctl', 'ml_dtypes', 'tqdm', 'tokenizers', 'cupy'):\n"
                       "    sys.modules[name] = None\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(installed_copy(tmp_path))])}
    result = subprocess.run([sys.executable, "-m", "minimoe.gpu_check", "--json", str(tmp_path / "out.json")],
                            capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert "nothing to check here: backend 'cupy' needs CuPy" in result.stderr and "Traceback" not in result.stderr
    assert json.loads((tmp_path / "out.json").read_text())["error"].startswith("backend 'cupy' needs CuPy")


def test_installed_it_checks_the_bundled_model_and_says_why_transformers_is_not_timed(tmp_path):
    """From a wheel the test fixtures and scripts/transformers_reference.py are absent: the models stage
    checks the bundled model alone, and the transformers row carries the reason instead of stopping the run."""
    code = ("from minimoe.tools import gpu_check; import numpy as np; "
            "print([p.name for p in gpu_check.model_folders()]); "
            "print(gpu_check.time_transformers('x', np.zeros(4, dtype=np.int64), 2, True)['error'])")
    env = {**os.environ, "PYTHONPATH": str(installed_copy(tmp_path))}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    folders, error = result.stdout.splitlines()
    assert folders == "['tiny-moe']"
    assert error.startswith("transformers could not be timed: MinimoeError: comparing with transformers needs a "
                            "checkout of minimoe's repository")


def test_a_failed_check_is_reported():
    assert gpu_check.Check("x", 2e-4, 1e-4).passed is False
    assert gpu_check.Check("ids", 0, 0).passed is True


def test_a_check_that_raises_becomes_one_failed_check(capsys):
    def broken():
        raise RuntimeError("nvrtc: error: identifier \"uint4\" is undefined\nmore lines")

    (check,) = gpu_check.guarded("norms", broken)
    assert check.name == 'norms: raised RuntimeError: nvrtc: error: identifier "uint4" is undefined'
    assert not check.passed
    assert "Traceback" in capsys.readouterr().err
    assert gpu_check.guarded("fine", lambda: [gpu_check.Check("x", 0.0, 1e-4)])[0].passed


SMALL = dict(hidden=64, heads=8, head_dim=16, experts=12, moe_intermediate=24, shared_intermediate=40, top_k=3,
             vocab=300)


DEVICE = {"name": "emulated", "multiprocessors": 1, "memory_gb": 1.0, "compute_capability": "0.0", "cupy": "numpy",
          "cuda_runtime": 0, "cuda_driver": 0, "copy_gb_s": 10.0}


def emulate(monkeypatch):
    """The emulated kernels, GraphDecoder's step run eagerly (there are no CUDA graphs to capture here), and a
    device described instead of asked."""
    gpu_emulation.install(monkeypatch)
    import minimoe.gpu.decode as decode
    from minimoe.gpu import profile

    monkeypatch.setattr(profile, "gpu_held", lambda ms=100.0: contextlib.nullcontext())  # no spin kernel to hold it
    monkeypatch.setattr(gpu_check, "check_graph_decode", functools.partial(gpu_check.check_graph_decode, capture=False))
    monkeypatch.setattr(decode, "GraphDecoder", functools.partial(decode.GraphDecoder, capture=False))
    monkeypatch.setattr(gpu_check, "device_info", lambda cp: DEVICE)


def test_the_checks_pass_on_emulated_kernels(monkeypatch):
    emulate(monkeypatch)
    import cupy

    checks = list(gpu_check.check_kernels(cupy, np.random.default_rng(0), SMALL))
    checks += gpu_check.check_models(np.random.default_rng(0), gpu_check.model_folders()[-2:])
    assert len(checks) > 30
    assert [c.name for c in checks if not c.passed] == []


def test_the_command_reports_every_check_on_emulated_kernels(monkeypatch, tmp_path, capsys):
    emulate(monkeypatch)
    monkeypatch.setattr(gpu_check, "REAL_SHAPES", SMALL)  # the real shapes would take minutes on a CPU
    monkeypatch.setattr(gpu_check, "ODD_SHAPES", SMALL | dict(hidden=70, head_dim=20, experts=11))
    assert gpu_check.main(["--no-bench", "--json", str(tmp_path / "checks.json")]) == 0
    report = json.loads((tmp_path / "checks.json").read_text())
    names = [check["name"] for check in report["checks"]]
    assert all(check["passed"] for check in report["checks"]) and "benchmark" not in report
    assert "model logits: tiny-moe (prefill 40; prefill 30 + decode 10)" in names
    assert "[odd] rms_norm" in names and "[real] rms_norm" in names
    assert "model logits: tiny-moe (prefill 30 + 10 decode steps, fixed buffers, eager, capacity 256)" in names
    assert "model logits: tiny-moe (prefill 2 + 10 decode steps, fixed buffers, eager, capacity 1024)" in names
    assert "model logits: tiny-moe (prefill 6 + 10 decode steps, fixed buffers, eager, capacity 8 grown to 16)" in names
    assert any(name.startswith("training step gradients, worst of 779: tiny-moe (batch 2 x 24, top-k margin")
               for name in names)  # 4 layers of 60 experts x 3 matrices, attention, norms, shared expert: 779 tensors
    assert report["device"] == DEVICE
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("Device: emulated") and out[1].split() == ["error", "tol", "check"]
    assert out[2].startswith("ok") and f"{len(names)}/{len(names)} checks passed" in out[-1]


def test_a_stage_that_raises_is_a_failed_row_and_the_json_keeps_the_rest(monkeypatch, tmp_path):
    emulate(monkeypatch)
    monkeypatch.setattr(gpu_check, "REAL_SHAPES", SMALL)

    def broken(rng, folders=None):
        yield gpu_check.Check("first model", 0.0, 1e-3)
        raise MemoryError("out of memory")

    monkeypatch.setattr(gpu_check, "check_models", broken)
    with pytest.raises(MemoryError):  # a generator that raises mid-stage: the rows before it are kept
        gpu_check.main(["--stages", "kernels,models", "--shapes", "real", "--json", str(tmp_path / "out.json")])
    names = [check["name"] for check in json.loads((tmp_path / "out.json").read_text())["checks"]]
    assert "[real] rms_norm" in names


def test_the_benchmark_writes_each_part_and_holds_graph_tokens_to_eager_ones(monkeypatch, tmp_path, capsys):
    """The whole benchmark stage over emulated kernels, on the bundled model: minimoe's rates, the graph-vs-eager
    tokens check, every profile table, and the transformers row (skipped here) -- all in the JSON."""
    emulate(monkeypatch)
    from minimoe.gpu import profile

    import minimoe

    monkeypatch.setattr(profile, "decode_attention_sweep", functools.partial(profile.decode_attention_sweep,
                                                                             keys_list=(40,), repeats=1))
    monkeypatch.setattr(profile, "gemv_variants", functools.partial(profile.gemv_variants, repeats=1))
    out = tmp_path / "bench.json"
    code = gpu_check.main(["--stages", "bench", "--checkpoint", str(minimoe.default_model_path()), "--prefill", "12",
                           "--decode", "4", "--no-transformers", "--json", str(out)])
    report = json.loads(out.read_text())
    assert code == 0, report["checks"]
    assert [c["name"] for c in report["checks"]] == [
        "benchmark: CUDA-graph decode's 4 tokens equal the eager decode's (mismatches)"]
    bench = report["benchmark"]
    assert bench["minimoe"]["eager"]["tokens"] == bench["minimoe"]["graph"]["tokens"]
    assert bench["bound_tok_s"] == pytest.approx(10e9 / (bench["weight_bytes_per_token"] + bench["kv_bytes_per_token"]))
    step = bench["profile"]["decode_step"]
    c = minimoe.load(minimoe.default_model_path()).config
    # gather; per layer norm, qkv, rope, attention, o, add_norm; per sparse layer router (with the shared gate),
    # route_dispatch, the experts' gate/up and down (the shared expert among them: 352 = 4 x 88), combine; the
    # final norm and the head
    assert c.shared_expert_intermediate_size % c.moe_intermediate_size == 0
    kernels_per_token = 1 + 6 * c.num_hidden_layers + 5 * len(c.sparse_layers) + 2
    assert sum(row["launches"] for row in step["kernels"]) == kernels_per_token
    head = next(row for row in step["kernels"] if "output head" in row["kernel"])
    assert head["bytes"] == c.vocab_size * c.hidden_size * 2 + c.hidden_size * 4 + c.vocab_size * 4  # bf16 W, x, y
    experts = next(row for row in step["kernels"] if "experts gate/up" in row["kernel"])
    assert f"{c.num_experts_per_tok + 4} of {c.num_experts + 4} groups" in experts["kernel"]  # 4 shared groups
    prefill = bench["profile"]["prefill"]
    assert any(row["tflop_s"] > 0 for row in prefill["kernels"]) and prefill["tokens"] == 12
    assert {row["splits"] for row in bench["profile"]["decode_attention"]} >= {1, 2, 3}
    assert {row["unroll"] for row in bench["profile"]["gemv"]} == {1, 2, 4, 8}
    assert bench["transformers"] == {"error": "not run (--no-transformers)"}
    assert "not run (--no-transformers)" in capsys.readouterr().out


def test_time_decode_counts_the_eager_steps_launches(monkeypatch):
    emulate(monkeypatch)
    import cupy

    import minimoe

    model = minimoe.load(minimoe.default_model_path(), backend="cupy")
    c = model.config
    result = gpu_check.time_decode(cupy, model, np.arange(5), 3, graph=False)
    # gather; per layer norm, qkv, rope, attention, o, add_norm; per sparse layer router (with the shared gate),
    # route_dispatch, gate/up and down of the experts and the shared expert's 4 groups, combine; final norm, head
    assert result["launches_per_token"] == 1 + 6 * c.num_hidden_layers + 5 * len(c.sparse_layers) + 2
    assert result["decode_tok_s"] > 0 and result["host_ms_per_token"] > 0


def test_the_training_stage_holds_the_device_backward_to_numpys(monkeypatch):
    """cupy-plain's training step (here NumPy standing in for CuPy) against the numpy backend's, every family; and
    a device whose gradients are off is caught."""
    emulate(monkeypatch)
    checks = list(gpu_check.check_training(np.random.default_rng(0)))
    assert len(checks) == 2 * len(gpu_check.training_folders()) and all(check.passed for check in checks)
    assert {c.name.split(": ")[1].split(" ")[0] for c in checks} >= {"moe_olmoe", "moe_qwen3", "moe_mixtral", "tiny-moe"}

    from minimoe import train

    real = train.loss_and_grads

    def off_on_the_device(model, ids, *args, **kwargs):
        loss, grads = real(model, ids, *args, **kwargs)
        if model.backend == "cupy-plain":
            grads[minimoe_names.FINAL_NORM] = grads[minimoe_names.FINAL_NORM] * 1.001
        return loss, grads

    monkeypatch.setattr(train, "loss_and_grads", off_on_the_device)
    loss_check, grads_check = gpu_check.check_training_step(gpu_check.training_folders()[-1], np.random.default_rng(0))
    assert loss_check.passed and not grads_check.passed and grads_check.name.endswith(": model.norm.weight")
