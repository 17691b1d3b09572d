"""``minimoe bench``: end to end in subprocesses on tiny models, and the parent's verdicts on its children."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import minimoe
from minimoe.tools import bench
from minimoe.tools.bench import Job, MemoryWatch

from conftest import FIXTURES

TINY = ("--prompt-tokens", "8", "--new-tokens", "4", "--repeat", "1")
FIXTURE = str(FIXTURES / "moe_bf16_sharded")  # bf16 in four shards, as the Hub's checkpoint


def run_bench(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minimoe", "bench", *args], capture_output=True, text=True,
                          timeout=120, env=None if env is None else os.environ | env)


def check_figures(result: dict, prompt_tokens: int = 8) -> None:
    """An engine that finished: sane figures, and the cold/warm runs it was asked for."""
    assert result["status"] == "ok"
    assert len(result["runs"]) == 2 and all(len(run["tokens"]) == 4 for run in result["runs"])
    figures = result["metrics"]
    assert set(figures) == {metric.key for metric in bench.METRICS}
    assert all(value > 0 for key, value in figures.items() if not key.startswith("disk_read")), figures
    for name, run in (("cold", result["runs"][0]), ("warm", result["runs"][1])):  # 0 when all is in the page cache
        assert figures[f"disk_read_{name}_gb"] == run["disk_read_bytes"] / 1e9 >= 0
    assert figures["peak_rss_anon_gb"] == result["peak_rss_anon_bytes"] / 1e9
    assert figures["prefill_cold_tok_s"] == prompt_tokens / result["runs"][0]["prefill_s"]
    assert figures["decode_warm_tok_s"] == 3 / result["runs"][1]["decode_s"]  # 4 new tokens: 3 decode steps
    assert result["runs"][0]["ttft_s"] >= result["runs"][0]["prefill_s"]


def test_bench_on_the_bundled_model(tmp_path):
    out = tmp_path / "bench.json"
    result = run_bench(*TINY, "--threads", "1", "--json", str(out))
    assert result.returncode == 0, result.stderr
    assert "run 2 of 2 (warm)" in result.stderr  # progress
    lines = result.stdout.splitlines()
    assert any(line.split()[:2] == ["status", "ok"] for line in lines)
    assert any(line.startswith("decode, warm (tokens/s)") for line in lines)
    summary = json.loads(out.read_text())
    assert summary["model"] == str(minimoe.default_model_path()) and len(summary["prompt"]) == 8
    assert list(summary["engines"]) == ["minimoe"] and "ratios" not in summary
    ours = summary["engines"]["minimoe"]
    check_figures(ours)
    assert ours["threads"] == 1


def test_bench_against_transformers(tmp_path):
    out = tmp_path / "bench.json"
    result = run_bench("--model", FIXTURE, "--against", "transformers", "--threads", "1", *TINY, "--json", str(out))
    assert result.returncode == 0, result.stderr
    assert "minimoe/transformers" in result.stdout.splitlines()[2]
    summary = json.loads(out.read_text())
    ours, theirs = summary["engines"]["minimoe"], summary["engines"]["transformers"]
    for engine in (ours, theirs):
        check_figures(engine)
        assert engine["threads"] == 1
    assert summary["ratios"] == {key: ours["metrics"][key] / theirs["metrics"][key] for key in ours["metrics"]
                                 if theirs["metrics"][key]}  # no ratio to a zero (e.g. nothing read from disk)
    load_row = next(line for line in result.stdout.splitlines() if line.startswith("load (s)"))
    assert load_row.split()[-1] == f"{summary['ratios']['load_s']:.2f}x"


def test_transformers_not_installed(tmp_path):
    (tmp_path / "torch.py").write_text("raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n")
    out = tmp_path / "bench.json"
    result = run_bench("--model", FIXTURE, "--against", "transformers", *TINY, "--json", str(out),
                       env={"PYTHONPATH": str(tmp_path)})  # the children import this torch.py first
    assert result.returncode == 1
    assert "minimoe: error: transformers is not installed (No module named 'torch'); pip install -e '.[test]'" \
        in result.stderr
    assert "Traceback" not in result.stderr
    summary = json.loads(out.read_text())  # minimoe's results are still reported
    check_figures(summary["engines"]["minimoe"])
    assert summary["engines"]["transformers"]["status"] == "not installed"


def test_watchdog_stops_a_child_that_would_exhaust_memory(tmp_path):
    # importing torch alone takes ~0.17 GB of RssAnon; minimoe on this fixture stays near 0.02 GB
    out = tmp_path / "bench.json"
    result = run_bench("--model", FIXTURE, "--against", "transformers", *TINY, "--memory-limit-gb", "0.1",
                       "--json", str(out))
    assert result.returncode == 0, result.stderr  # running out of memory is a result, not a failure
    theirs = json.loads(out.read_text())["engines"]["transformers"]
    assert theirs["status"] == "out of memory" and theirs["available_bytes"] == 10**8
    assert theirs["peak_rss_anon_bytes"] > 10**8
    assert f"transformers ran out of memory (peak {theirs['peak_rss_anon_bytes'] / 1e9:.2f} GB of 0.10 GB available" \
        in result.stdout


@pytest.mark.parametrize("args, message", [
    (("--model", "/no/such/model"), "minimoe: error: /no/such/model: no config.json found"),
    (("--model", FIXTURE, "--prompt-tokens", "40", "--new-tokens", "16"), "exceed the model's context of 48"),
    (("--new-tokens", "1"), "--new-tokens at least 2"),
    (("--repeat", "0"), "--repeat must be at least 1"),
])
def test_bad_input_is_an_error_message(args, message):
    result = run_bench(*args)
    assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr


def test_a_child_killed_by_signal_9_ran_out_of_memory():
    watch = MemoryWatch(pid=0)  # never stopped by the watchdog
    assert bench.child_outcome(-9, "", watch)["status"] == "out of memory"
    assert bench.child_outcome(-11, "", watch) == {"status": "failed", "message": "killed by signal 11; see the "
                                                   "messages above"}
    assert bench.child_outcome(0, '{"status": "ok"}', watch) == {"status": "ok"}


def test_memory_error_in_a_worker_is_reported(monkeypatch):
    def fail(self):
        raise MemoryError

    monkeypatch.setattr(bench.MinimoeEngine, "load", fail)
    job = Job("minimoe", str(minimoe.default_model_path()), [1, 2], new_tokens=2, repeat=1)
    assert bench.run_job(job)["status"] == "out of memory"


def test_roofline_table_on_a_bf16_checkpoint(tmp_path):
    """``--roofline``: each prompt's prefill beside the copy-bound and the cast-bound roofline."""
    out = tmp_path / "roofline.json"
    result = run_bench("--model", FIXTURE, "--roofline", "8", "--repeat", "1", "--json", str(out))
    assert result.returncode == 0, result.stderr
    top, names = (line.split() for line in result.stdout.splitlines()[:2])
    assert top[:5] == ["prompt", "prefill", "roofline", "cast-bound", "GEMM"]
    assert names[:6] == ["tokens", "tok/s", "tok/s", "fraction", "tok/s", "fraction"]
    (row,) = json.loads(out.read_text())["roofline"]
    assert row["tokens"] == 8 and row["measured_tok_s"] > 0
    assert row["fraction"] == pytest.approx(row["measured_tok_s"] / row["roofline_tok_s"])
    assert row["cast_fraction"] == pytest.approx(row["measured_tok_s"] / row["cast_roofline_tok_s"])
    assert row["gemm_gflops"] > 0 and row["copy_gb_s"] > 0 and row["cast_gb_s"] > 0


def roofline_row(gemm_gflops: float, **figures) -> dict:
    """A row of ``format_roofline`` with wide figures (a large model's, a fast machine's)."""
    return {"tokens": 1024, "measured_tok_s": 123456.7, "roofline_tok_s": 234567.8, "fraction": 0.53,
            "gemm_gflops": gemm_gflops, "copy_gb_s": 123.4, "roofline_matmul_s": 123.456,
            "roofline_bandwidth_s": 12.345, "roofline_attention_s": 1.234, "cast_gb_s": 56.7,
            "cast_roofline_tok_s": 234567.8, "cast_fraction": 0.53, "cast_roofline_bandwidth_s": 12.345} | figures


def test_roofline_table_fits_120_columns():
    lines = bench.format_roofline([roofline_row(12345.0), roofline_row(3.0, tokens=64)])
    assert len(lines) == 4 and max(map(len, lines)) <= 120, "\n".join(lines)


def test_a_roofline_faster_than_its_limit_is_measured_again_and_never_reported(monkeypatch, capsys):
    """A GEMM rate measured while the cores were busy makes the limit too low: a prefill "above" it is impossible."""
    from minimoe.tools import roofline

    real = roofline.measure_rates
    calls = []

    def busy_then_idle(tokens, hidden):
        calls.append(tokens)
        rates = real(tokens, hidden)
        return roofline.Rates(1.0, rates.copy_bytes, rates.cast_bytes) if len(calls) == 1 else rates  # 1 FLOP/s

    monkeypatch.setattr(roofline, "measure_rates", busy_then_idle)
    (row,) = bench.prefill_roofline(FIXTURE, [8], repeat=1)
    assert len(calls) == 2 and row["fraction"] <= 1 and row["cast_fraction"] <= 1 and row["gemm_gflops"] > 1e-9
    err = capsys.readouterr().err
    assert "8 tokens: prefill at " in err and "x the roofline" in err and "not reported; measuring again" in err

    monkeypatch.setattr(roofline, "measure_rates", lambda tokens, hidden: roofline.Rates(1.0, 1e12, 1e12))
    with pytest.raises(minimoe.MinimoeError, match="the roofline of 8 tokens could not be measured: in 3 attempts"):
        bench.prefill_roofline(FIXTURE, [8], repeat=1)
