"""The minimoe command line, end to end in subprocesses, on the bundled model."""

from __future__ import annotations

import json.decoder
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import minimoe
from minimoe.tools.cli import TOKEN_COLUMN, routing_table
from minimoe.inspect.params import describe_model
from minimoe.inspect.trace import RoutingTrace

from conftest import FIXTURES


def run(*args: str, stdin: str | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minimoe", *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout)


BUNDLED = minimoe.default_model_path()
DEMO_PROMPT = "def read_config(path):\n"


def demo_table(stdout: str) -> tuple[list[str], list[str], list[str]]:
    """The demo's routing table: (its two header lines, the prompt's rows, the generated tokens' rows)."""
    lines = stdout.splitlines()
    top = next(i for i, line in enumerate(lines) if line.startswith("token "))
    rule = next(i for i, line in enumerate(lines) if line.startswith("---- ") and "prompt tokens above" in line)
    return lines[top : top + 2], lines[top + 2 : rule], lines[rule + 1 :]


def row_tokens(rows: list[str]) -> list[str]:
    """The token column of table rows (each token's repr)."""
    return [row[:TOKEN_COLUMN].rstrip() for row in rows]


def row_numbers(row: str, layers: int) -> np.ndarray:
    """A table row's numbers, one line per sparse layer: its expert ids, their weights' sum (and the shared gate)."""
    return np.array(row[TOKEN_COLUMN:].split(), dtype=np.float64).reshape(layers, -1)


def test_demo_marks_the_prompt_and_shows_every_token_with_its_shared_gate():
    result = run("demo", "--prompt", DEMO_PROMPT, "--max-new-tokens", "6", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    model, tok = minimoe.load(BUNDLED), minimoe.load_tokenizer(BUNDLED)
    config = model.config
    prompt = tok.encode(DEMO_PROMPT)
    generated = model.generate(prompt, 6, temperature=0)  # what the demo generated (greedy: the same tokens)
    assert describe_model(config) in result.stdout and "tokens/s" in result.stdout
    assert f"--- prompt ({len(prompt)} tokens) ---\n{DEMO_PROMPT}--- generated ---\n" in result.stdout
    assert f"\n--- {len(generated)} tokens in " in result.stdout
    assert "'shared' is the shared expert's gate" in result.stdout

    header, prompt_rows, generated_rows = demo_table(result.stdout)
    assert all(f"layer {layer}" in header[0] for layer in config.sparse_layers)
    assert header[1].split() == ["experts", "sum", "shared"] * len(config.sparse_layers)
    assert row_tokens(prompt_rows) == [repr(tok.decode([t]))[: TOKEN_COLUMN - 1] for t in prompt]
    assert len(generated_rows) == len(generated)  # the last generated token has its row too
    assert len(prompt_rows) + len(generated_rows) == len(prompt) + len(generated)

    trace = model.trace(prompt + generated)  # the routing the rows should show
    shown = np.stack([row_numbers(row, len(config.sparse_layers)) for row in prompt_rows + generated_rows],
                     axis=1)  # [S, T, k + 2]
    np.testing.assert_array_equal(shown[..., :-2], trace.expert_ids)
    np.testing.assert_allclose(shown[..., -2], trace.expert_weights.sum(axis=-1), atol=0.006)
    np.testing.assert_allclose(shown[..., -1], trace.shared_gate, atol=0.006)
    assert np.all((trace.shared_gate > 0) & (trace.shared_gate < 1))  # a sigmoid: strictly inside (0, 1)


def test_demo_of_a_prompt_without_a_final_newline_says_where_the_generation_continues():
    result = run("demo", "--prompt", "x = 1\nimport os", "--max-new-tokens", "2", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    prompt = minimoe.load_tokenizer(BUNDLED).encode("x = 1\nimport os")
    assert (f"--- prompt ({len(prompt)} tokens) ---\nx = 1\nimport os\n"
            "--- generated (after the prompt's last line, repeated) ---\nimport os") in result.stdout
    _, prompt_rows, _ = demo_table(result.stdout)
    assert len(prompt_rows) == len(prompt)


def test_demo_of_no_new_tokens_shows_the_prompt():
    result = run("demo", "--max-new-tokens", "0")
    assert result.returncode == 0, result.stderr
    _, prompt_rows, generated_rows = demo_table(result.stdout)
    assert len(prompt_rows) == len(minimoe.load_tokenizer(BUNDLED).encode(DEMO_PROMPT)) and generated_rows == []


def test_routing_table_of_a_model_without_a_shared_expert():
    model = minimoe.load(FIXTURES / "moe_mixtral")  # no shared expert; 96 tokens, no tokenizer
    trace = model.trace([5, 6, 7, 8, 9])
    trace.tokens = ["a", "b", "c", "d", "e"]
    lines = routing_table(trace, prompt_tokens=3, shared=False)
    layers = len(model.config.sparse_layers)
    assert lines[1].split() == ["experts", "sum"] * layers
    assert lines[5] == "---- 3 prompt tokens above, 2 generated below ----"
    rows = lines[2:5] + lines[6:]
    assert row_tokens(rows) == ["'a'", "'b'", "'c'", "'d'", "'e'"]
    shown = np.stack([row_numbers(row, layers) for row in rows], axis=1)  # [S, T, k + 1]: no shared gate
    np.testing.assert_array_equal(shown[..., :-1], trace.expert_ids)
    assert routing_table(trace, shared=False) == lines[:5] + lines[6:]  # no prompt length given: no rule


def dense_checkpoint(folder: Path) -> Path:
    """The dense test fixture beside the bundled tokenizer: a model that loads but has no router."""
    folder.mkdir()
    for source in (FIXTURES / "dense_qwen2" / "config.json", FIXTURES / "dense_qwen2" / "model.safetensors",
                   BUNDLED / "tokenizer.json", BUNDLED / "tokenizer_config.json"):
        shutil.copy(source, folder)
    return folder


def context_of_the_bundled_model() -> int:
    return minimoe.load(BUNDLED).config.max_position_embeddings


@pytest.mark.parametrize("args, message", [
    (("--max-new-tokens", "-1"), "--max-new-tokens must be a non-negative integer, got -1"),
    (("--temperature", "-0.5"), "--temperature must be a finite number >= 0 (0 is greedy), got -0.5"),
    (("--temperature", "nan"), "--temperature must be a finite number >= 0"),
    (("--top-k", "0"), "--top-k must be >= 1, got 0"),
    (("--top-p", "0"), "--top-p must be in (0, 1], got 0.0"),
    (("--top-p", "1.5"), "--top-p must be in (0, 1], got 1.5"),
    (("--seed", "-1"), "--seed must be a non-negative integer, got -1"),
    (("--stop", ""), "--stop must be non-empty, got ''"),
    (("--model", "/nonexistent/model"), "/nonexistent/model: not a folder"),
    (("--model", "{tmp}"), "config.json"),  # an empty folder: not a checkpoint
    (("--model", "{dense}"), "a dense model, with no router: there is no routing to show"),
    (("--prompt", ""), "the prompt is empty"),
    (("--prompt", "{long}"), "new tokens exceeds the context of"),
    (("--max-new-tokens", "{context}"), "new tokens exceeds the context of"),
])
def test_demo_rejects_each_bad_flag_before_printing_anything(tmp_path, args, message):
    context = context_of_the_bundled_model()
    values = dict(tmp=str(tmp_path), dense=str(dense_checkpoint(tmp_path / "dense")), long="x = 1\n" * context,
                  context=str(context))
    result = run("demo", *(arg.format(**values) for arg in args))
    assert result.returncode == 1
    assert result.stdout == ""  # not even the "minimoe demo: ..." header
    assert result.stderr.startswith("minimoe: error: ") and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr


@pytest.mark.parametrize("command, stdin", [(("generate", "--prompt", "x"), None), (("chat",), "hello\n")])
def test_generate_and_chat_check_the_same_flags_before_printing(command, stdin):
    result = run(*command, "--top-p", "1.5", stdin=stdin)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == "minimoe: error: --top-p must be in (0, 1], got 1.5\n"


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
    config = minimoe.load(minimoe.default_model_path()).config
    result = run("params")
    assert result.returncode == 0 and f"{config.num_experts} experts (top-{config.num_experts_per_tok})" in result.stdout


@pytest.mark.parametrize("args, message", [
    (("generate", "--prompt", "x", "--top-p", "1.5"), "--top-p must be in (0, 1]"),
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
    from safetensors import safe_open

    with safe_open(minimoe.default_model_path() / "model.safetensors", "np") as f:  # counted from the file itself
        total = sum(int(np.prod(f.get_slice(name).get_shape())) for name in f.keys())
    result = run("params")
    assert f"M  ({total:,})" in result.stdout and f"{total / 1e6:.2f}M" in result.stdout
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
    (("--expert", "1:99"), 1, "expert 99 is outside [0, "),
    (("--expert", "9:1"), 1, "layer 9 is not a sparse layer"),
    (("--token-id", "99999"), 1, "token id 99999 is outside the vocabulary [0, 4096)"),
    (("--expert", "seven"), 2, "'seven' is not LAYER:EXPERT"),
])
def test_inspect_bad_queries_and_windows(tmp_path, args, code, message):
    result = run("inspect", "--text", "def f(x):\n    return x\n", "--out", str(tmp_path / "out"), *args)
    assert result.returncode == code and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


# --- what a new user meets first ---------------------------------------------------------------

@pytest.mark.parametrize("command, mistyped", [
    (("inspect", "--text", "x y", "--out", "o", "--jsn"), "--jsn"),
    (("demo", "--temprature", "0"), "--temprature 0"),
    (("params", "--bogus"), "--bogus"),
])
def test_a_mistyped_flag_shows_the_usage_of_its_command(command, mistyped):
    result = run(*command)
    assert result.returncode == 2
    assert result.stderr.startswith(f"usage: minimoe {command[0]} "), result.stderr
    assert result.stderr.endswith(f"minimoe {command[0]}: error: unrecognized arguments: {mistyped}\n")


def test_chat_on_the_bundled_model_says_it_is_a_base_model_not_a_chat_model():
    result = run("chat", "--max-new-tokens", "2", "--temperature", "0", stdin="Hello\n")
    assert result.returncode == 0, result.stderr
    note = " ".join(result.stderr.split())
    assert "is a base model trained on the Python standard library's sources, not a chat model" in note
    from minimoe.tools.cli import is_bundled

    assert is_bundled(BUNDLED) and is_bundled(minimoe.default_model_path("dense"))
    assert not is_bundled(FIXTURES / "moe_bf16_sharded")


SHAPE = ("--experts", "64", "--shared-experts", "4", "--top-k", "4")


def test_upcycle_help_marks_the_shape_flags_required_without_numbers_that_read_as_defaults():
    result = run("upcycle", "--help")
    assert result.returncode == 0
    required = result.stdout[result.stdout.index("required arguments"):]
    assert all(flag in required for flag in ("--experts", "--shared-experts", "--top-k", "--expert-size"))
    assert "(64)" not in result.stdout and "(4)" not in result.stdout and "(1408)" not in result.stdout


def test_upcycle_dry_run_takes_a_shipped_config_as_params_does(tmp_path):
    result = run("upcycle", "qwen1.5-1.8b", str(tmp_path / "moe"), "--dry-run", *SHAPE, "--expert-size", "1408")
    assert result.returncode == 0, result.stderr
    # Qwen1.5-MoE-A2.7B's own counts, from its shipped config (the blog's 14.3B / 2.7B)
    params = run("params", "qwen1.5-moe-a2.7b").stdout.splitlines()[1:]
    assert result.stdout.splitlines()[-3:] == params and not (tmp_path / "moe").exists()
    real = run("upcycle", "qwen1.5-1.8b", str(tmp_path / "moe"), *SHAPE, "--expert-size", "1408")
    assert real.returncode == 1 and "qwen1.5-1.8b is a shipped config, without weights" in real.stderr


def test_upcycle_prints_the_new_models_counts_and_that_it_is_untrained(tmp_path):
    dense = minimoe.default_model_path("dense")
    result = run("upcycle", str(dense), str(tmp_path / "moe"), *SHAPE, "--expert-size", "88")
    assert result.returncode == 0, result.stderr
    counted = run("params", str(tmp_path / "moe")).stdout.splitlines()[1:]  # counted from the written config
    assert counted and all(line in result.stdout for line in counted)
    assert "Untrained:" in result.stdout
