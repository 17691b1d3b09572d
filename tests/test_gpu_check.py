"""python -m minimoe.gpu_check without a GPU: its arithmetic, table, arguments, its clear exit, and its
checks themselves run over emulated kernels (tests/gpu_emulation.py) at small shapes."""

from __future__ import annotations

import functools
import json
import sys

import numpy as np
import pytest

from minimoe import ModelConfig, gpu_check
from minimoe.cli import shipped_configs

import gpu_emulation

QWEN_MOE = ModelConfig.from_dict(json.loads(shipped_configs()["qwen1.5-moe-a2.7b"].read_text()), source="test")


def test_decode_bytes_per_token_of_qwen_moe():
    h, v, e, layers = 2048, 151936, 60, 24
    attention = 4 * h * h + 3 * h  # q, k, v, o + the q/k/v biases
    per_layer = attention + 2 * h + e * h + 3 * h * 5632 + h + 4 * 3 * h * 1408  # norms, router, shared + gate, 4 experts
    expected = 2 * (layers * per_layer + h + v * h + h)  # final norm, lm_head, one embedding row; 2 bytes each
    assert gpu_check.decode_bytes_per_token(QWEN_MOE) == expected
    assert expected / 1e9 == pytest.approx(4.76, abs=0.01)  # 2.07B active non-embedding + 0.31B head, in bf16
    assert gpu_check.bandwidth_bound(expected) == pytest.approx(4.3e12 / expected)
    assert 900 < gpu_check.bandwidth_bound(expected) < 960  # tokens/s at batch 1 on an H200


def test_format_table_aligns_columns():
    table = gpu_check.format_table(["check", "error"], [["rms_norm", 1.5e-7], ["route ids", 0]]).splitlines()
    assert table[0] == "check        error"
    assert table[1] == "---------  -------"
    assert table[2] == "rms_norm   1.5e-07"
    assert table[3] == "route ids        0"


def test_parse_args_defaults_and_options(tmp_path):
    args = gpu_check.parse_args([])
    assert (args.no_bench, args.bench_layers, args.prefill, args.decode, args.checkpoint) == (False, 8, 512, 64, None)
    args = gpu_check.parse_args(["--no-bench", "--decode", "8", "--checkpoint", str(tmp_path), "--json", "out.json"])
    assert args.no_bench and args.decode == 8 and args.checkpoint == tmp_path and args.json.name == "out.json"


def test_benchmark_rows_state_both_decode_targets():
    ours = {"prefill_tok_s": 5000.0, "decode_tok_s": 300.0, "memory_gb": 6.0}
    theirs = {"prefill_tok_s": 4000.0, "decode_tok_s": 50.0, "memory_gb": 7.0}
    rows = gpu_check.benchmark_rows(ours, theirs, bound=1000.0)
    assert rows[0][4] == "6.00x (target >= 3x)" and rows[0][5] == "30% of 1,000 (target >= 40%)"
    assert rows[1][:4] == ["transformers (bf16, eager)", 4000.0, 50.0, 7.0]
    rows = gpu_check.benchmark_rows(ours, {"error": "torch and transformers are needed"}, bound=1000.0)
    assert rows[1][1] == "torch and transformers are needed" and rows[0][4].startswith("nanx")


def test_benchmark_rows_hold_the_graph_decode_to_the_same_targets():
    ours = {"prefill_tok_s": 5000.0, "decode_tok_s": 300.0, "memory_gb": 6.0, "launches_per_token": 400.0,
            "host_ms_per_token": 3.0, "graph": {"decode_tok_s": 450.0, "launches_per_token": 0.0,
                                                "host_ms_per_token": 0.1}}
    theirs = {"prefill_tok_s": 4000.0, "decode_tok_s": 50.0, "memory_gb": 7.0}
    rows = gpu_check.benchmark_rows(ours, theirs, bound=1000.0)
    assert rows[1][:3] == ["minimoe (cupy), CUDA-graph decode", 5000.0, 450.0]
    assert rows[1][4] == "9.00x (target >= 3x)" and rows[1][5] == "45% of 1,000 (target >= 40%)"
    assert gpu_check.launch_rows(ours) == [["eager", 300.0, 400.0, 3.0, 1e3 / 300], ["CUDA graph", 450.0, 0.0, 0.1,
                                                                                     1e3 / 450]]
    failed = ours | {"graph": {"error": "CUDA-graph decode failed: RuntimeError: x"}}
    assert gpu_check.benchmark_rows(failed, theirs, 1000.0)[1][1] == "CUDA-graph decode failed: RuntimeError: x"
    assert len(gpu_check.launch_rows(failed)) == 1


def test_format_benchmark_states_the_setting_and_the_bound():
    result = {"checkpoint": "real-shape", "layers": 8, "prefill_tokens": 512, "decode_steps": 64,
              "bytes_per_token": 2_000_000_000, "bound_tok_s": 2150.0,
              "minimoe": {"prefill_tok_s": 5000.0, "decode_tok_s": 300.0, "memory_gb": 11.0,
                          "launches_per_token": 410.0, "host_ms_per_token": 3.2},
              "transformers": {"prefill_tok_s": 4000.0, "decode_tok_s": 60.0, "memory_gb": 12.0}}
    text = gpu_check.format_benchmark(result)
    assert text.startswith("Benchmark: real-shape, 8 layers of Qwen1.5-MoE-A2.7B's shapes; prefill 512 tokens, "
                           "then 64 greedy decode steps, batch 1.  Bound = 2.00 GB of bf16 weights per token / 4.3 TB/s.")
    assert "5.00x (target >= 3x)" in text and "14% of 2,150 (target >= 40%)" in text
    assert text.splitlines()[-1].split() == ["eager", "300", "410", "3.2", "3.333"]


def test_without_cupy_it_exits_1_with_a_reason(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "cupy", None)
    assert gpu_check.main(["--no-bench"]) == 1
    assert "gpu_check: nothing to check here: backend 'cupy' needs CuPy" in capsys.readouterr().err


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


def emulate(monkeypatch):
    """The emulated kernels, and GraphDecoder's step run eagerly (there are no CUDA graphs to capture here)."""
    gpu_emulation.install(monkeypatch)
    monkeypatch.setattr(gpu_check, "check_graph_decode", functools.partial(gpu_check.check_graph_decode, capture=False))


def test_the_checks_pass_on_emulated_kernels(monkeypatch):
    emulate(monkeypatch)
    import cupy

    checks = gpu_check.check_kernels(cupy, np.random.default_rng(0), SMALL)
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
    assert "model logits: tiny-moe (prefill 30 + 10 decode steps, fixed buffers, eager)" in names
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("check") and f"{len(names)}/{len(names)} checks passed" in out


def test_time_decode_counts_the_eager_steps_launches(monkeypatch):
    emulate(monkeypatch)
    import cupy

    import minimoe

    model = minimoe.load(minimoe.default_model_path(), backend="cupy")
    c = model.config
    result = gpu_check.time_decode(cupy, model, np.arange(5), 3, graph=False)
    # gather; per layer norm, qkv, rope, attention, o, add_norm; per sparse layer 11 more (router .. combine); head
    assert result["launches_per_token"] == 1 + 6 * c.num_hidden_layers + 11 * len(c.sparse_layers) + 1
    assert result["decode_tok_s"] > 0 and result["host_ms_per_token"] > 0
