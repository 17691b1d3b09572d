"""The minimoe command line, end to end in subprocesses, on the bundled model."""

from __future__ import annotations

import json.decoder
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import minimoe
from minimoe.routing import RoutingTrace


def run(*args: str, stdin: str | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minimoe", *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout)


def test_demo_generates_and_shows_routing():
    result = run("demo")
    assert result.returncode == 0, result.stderr
    assert "16 experts (top-4) + a gated shared expert" in result.stdout
    assert "tokens/s" in result.stdout
    header = next(line for line in result.stdout.splitlines() if line.startswith("token "))
    assert all(f"layer {layer}" in header for layer in range(4))
    assert "'def'" in result.stdout  # the prompt's first token has its own row


def test_generate_streams_and_reports_speed():
    result = run("generate", "--prompt", "import os\n", "--max-new-tokens", "12", "--temperature", "0.8",
                 "--top-k", "20", "--top-p", "0.9", "--seed", "1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("import os\n")
    assert "tokens/s]" in result.stderr
    again = run("generate", "--prompt", "import os\n", "--max-new-tokens", "12", "--temperature", "0.8",
                "--top-k", "20", "--top-p", "0.9", "--seed", "1")
    assert again.stdout == result.stdout  # same seed, same text
    model = minimoe.load(minimoe.default_model_path())  # ... and the text the library samples
    tok = minimoe.load_tokenizer(minimoe.default_model_path())
    ids = model.generate(tok.encode("import os\n"), 12, temperature=0.8, top_k=20, top_p=0.9, seed=1)
    assert result.stdout.rstrip("\n") == ("import os\n" + tok.decode(ids, skip_special_tokens=True)).rstrip("\n")


def test_generate_greedy_equals_the_library():
    result = run("generate", "--prompt", "class Parser:\n", "--max-new-tokens", "10", "--temperature", "0")
    model = minimoe.load(minimoe.default_model_path())
    tok = minimoe.load_tokenizer(minimoe.default_model_path())
    ids = model.generate(tok.encode("class Parser:\n"), 10, temperature=0)
    assert result.stdout.rstrip("\n") == ("class Parser:\n" + tok.decode(ids, skip_special_tokens=True)).rstrip("\n")


def test_chat_reads_turns_from_stdin():
    result = run("chat", "--max-new-tokens", "8", "--temperature", "0", stdin="hello\nwhat is a list?\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("assistant> ") == 2


def test_params_defaults_to_the_bundled_model():
    result = run("params")
    assert result.returncode == 0 and "16 experts (top-4)" in result.stdout


@pytest.mark.parametrize("args, message", [
    (("generate", "--prompt", "x", "--top-p", "1.5"), "top_p must be in (0, 1]"),
    (("generate", "--prompt", "x", "--max-new-tokens", "5000"), "exceeds the context of 1024"),
    (("generate", "--prompt", "x", "--model", "/nonexistent/model"), "/nonexistent/model: not a folder"),
    (("generate", "--prompt", ""), "the prompt is empty"),
])
def test_bad_input_exits_1_with_a_clear_message(args, message):
    result = run(*args)
    assert result.returncode == 1
    assert result.stderr.startswith("minimoe: error:") and message in result.stderr


@pytest.mark.parametrize("args", [(), ("generate",), ("generate", "--prompt", "x", "--top-k", "many"), ("fly",)])
def test_usage_errors_exit_2(args):
    result = run(*args)
    assert result.returncode == 2 and "usage:" in result.stderr


def test_help_lists_the_commands():
    result = run("--help")
    assert result.returncode == 0
    for command in ("demo", "generate", "chat", "params"):
        assert command in result.stdout


def test_version():
    result = run("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"minimoe {minimoe.__version__}"


def test_params_of_a_small_model_are_in_millions():
    result = run("params")
    assert "  total                         3.29M  (3,288,192)" in result.stdout
    big = run("params", "qwen1.5-moe-a2.7b")
    assert big.returncode == 0 and "B  (" in big.stdout and "M  (" not in big.stdout


STDLIB_MODULE = Path(json.decoder.__file__)  # a whole stdlib module: several thousand tokens


def test_inspect_a_long_file_with_token_and_expert_queries(tmp_path):
    tok = minimoe.load_tokenizer(minimoe.default_model_path())
    tokens = len(tok.encode(STDLIB_MODULE.read_text(encoding="utf-8")))
    assert tokens > 3000  # longer than the context of 1,024: windows
    result = run("inspect", "--file", str(STDLIB_MODULE), "--out", str(tmp_path), "--token", "def",
                 "--token-id", "345", "--expert", "1:3", timeout=600)
    assert result.returncode == 0, result.stderr
    assert "traced 6 windows of up to 1,024 tokens, each re-reading the 512 tokens before it" in result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("token 'def' (id 489): ") and "token ' def' (id 353): " in result.stdout
    assert "token ' return' (id 345): " in result.stdout
    assert "expert 3 of layer 1: the tokens it takes most often" in result.stdout
    header = lines.index("  layer top-1 same top-1 most chosen experts: times, mean weight")
    assert [line.split()[0] for line in lines[header + 1 : header + 5]] == ["0", "1", "2", "3"]
    assert lines[-1] == str(tmp_path / "report.html")
    trace = RoutingTrace.load_npz(tmp_path / "trace.npz")
    np.testing.assert_array_equal(trace.positions, np.arange(tokens))
    for name in ("token_routing.png", "expert_tokens_layer1_expert3.png", "token_experts.png"):
        assert (tmp_path / name).stat().st_size > 0


@pytest.mark.parametrize("args, code, message", [
    (("--window", "4096"), 1, "window must be an integer from 2 to the model's context of 1024"),
    (("--overlap", "2000", "--window", "64"), 1, "overlap must be an integer from 0 to window - 1 = 63"),
    (("--token", "qqqqzzzz"), 1, "'qqqqzzzz' is not one token of this vocabulary"),
    (("--expert", "1:99"), 1, "expert 99 is outside [0, 16)"),
    (("--expert", "9:1"), 1, "layer 9 is not a sparse layer"),
    (("--token-id", "99999"), 1, "token id 99999 is outside the vocabulary [0, 4096)"),
    (("--expert", "seven"), 2, "'seven' is not LAYER:EXPERT"),
])
def test_inspect_bad_queries_and_windows(tmp_path, args, code, message):
    result = run("inspect", "--text", "def f(x):\n    return x\n", "--out", str(tmp_path / "out"), *args)
    assert result.returncode == code and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
