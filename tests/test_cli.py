"""The minimoe command line, end to end in subprocesses, on the bundled model."""

from __future__ import annotations

import subprocess
import sys

import pytest

import minimoe


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minimoe", *args], input=stdin, capture_output=True, text=True,
                          timeout=120)


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


def test_max_memory_reaches_the_model_and_bad_sizes_are_refused():
    plain = run("generate", "--prompt", "import os\n", "--max-new-tokens", "6", "--temperature", "0")
    cached = run("generate", "--prompt", "import os\n", "--max-new-tokens", "6", "--temperature", "0",
                 "--max-memory", "64MB")
    assert cached.returncode == 0, cached.stderr
    assert cached.stdout == plain.stdout
    bad = run("generate", "--prompt", "import os\n", "--max-memory", "lots")
    assert bad.returncode == 1
    assert "memory size" in bad.stderr and "Traceback" not in bad.stderr
