"""Every shell command in README.md and docs/*.md works as written.

The commands are read from the pages' ```bash blocks (and the plain ``` blocks whose lines are
commands), a line at a time, ``&&`` splitting a line into commands.  Each is checked as far as this
machine can, offline:

* a ``minimoe`` command runs in-process on the bundled model, its placeholders given a meaning
  (``DIR`` the bundled model, ``DENSE_DIR`` the shipped Qwen1.5-1.8B config, ``OUT_DIR`` and
  ``report/`` a temporary folder, ``some.py`` a small Python file); one that needs what cannot be
  had here (a checkpoint you download or make first, the minutes of ``bench``) is parsed by the
  command's own parser instead, so a wrong or missing flag still fails;
* ``python scripts/X.py`` and ``python -m minimoe...``: the script exists, and its ``--help`` runs
  and lists every flag the command uses;
* ``pip install -e ".[extra]"``: the extras exist in pyproject.toml;
* setting up an environment or downloading (``python3 -m venv``, ``. .venv/bin/activate``, ``pip
  install`` from an index, ``huggingface-cli``, ``jupyter``, ``python -m pytest``) is left to CI,
  which runs the README's test command exactly (``.ci/run``: held here).

An unknown kind of command fails the test: say here how to check it.
"""

from __future__ import annotations

import io
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import minimoe
from minimoe.tools import cli

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
SHELL_WORDS = {"minimoe", "python", "python3", "pip", "huggingface-cli", "jupyter", "."}
ENVIRONMENT = {"venv": "makes an environment", "pytest": "the test suite itself"}
# A short Python text for the commands' input files: long enough for every query and plot of a report.
SOURCE = "import os\n\n\ndef read_config(path):\n    with open(path) as f:\n        return f.read()\n" * 8


def shell_commands(text: str) -> list[tuple[int, str]]:
    """(line number, command) of every command in a page's shell blocks, comments dropped, ``&&`` split."""
    commands = []
    for block in BLOCK.finditer(text):
        language, body = block.group(1), block.group(2)
        first_line = text.count("\n", 0, block.start()) + 2
        lines = body.splitlines()
        is_shell = language in ("bash", "sh", "shell") or (language == "" and all(map(is_command, lines)))
        if not is_shell:
            continue
        for offset, line in continued(lines):
            words = shlex.split(line, comments=True)
            starts = [0] + [i + 1 for i, word in enumerate(words) if word == "&&"]
            ends = [i for i, word in enumerate(words) if word == "&&"] + [len(words)]
            commands += [(first_line + offset, shlex.join(words[a:b])) for a, b in zip(starts, ends) if b > a]
    return commands


def continued(lines: list[str]) -> list[tuple[int, str]]:
    """(offset of its first line, text) of each command, a line ending in a backslash joined to the next."""
    commands, start, parts = [], 0, []
    for offset, line in enumerate(lines):
        if not parts:
            start = offset
        parts.append(line.rstrip().removesuffix("\\"))
        if not line.rstrip().endswith("\\"):
            commands.append((start, " ".join(parts)))
            parts = []
    return commands


def is_command(line: str) -> bool:
    """Whether a line of a plain ``` block is a shell command (or blank), not code."""
    try:
        words = without_env(shlex.split(line, comments=True))
    except ValueError:  # unbalanced quotes: Python, not a command
        return False
    return not words or words[0] in SHELL_WORDS


def without_env(words: list[str]) -> list[str]:
    """The command without leading ``NAME=value`` environment settings or a ``taskset -c CPUS`` prefix."""
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
        words = words[1:]
    if words[:2] == ["taskset", "-c"]:
        words = without_env(words[3:])
    return words


COMMANDS = [(page, line, command) for page in PAGES
            for line, command in shell_commands(page.read_text(encoding="utf-8"))]
# Each distinct command once, with every place it is written (README and docs repeat a few).
WHERE: dict[str, list[str]] = {}
for page, line, command in COMMANDS:
    WHERE.setdefault(command, []).append(f"{page.name}:{line}")


def test_the_commands_are_found():
    pages = {page.name for page, _, _ in COMMANDS}
    assert {"README.md", "index.md", "routing.md", "real-weights.md", "benchmarks.md", "gpu.md"} <= pages
    assert any(command.startswith("minimoe upcycle") for _, _, command in COMMANDS)


def test_the_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    test_command = next(line for line in readme.splitlines() if line.endswith("python -m pytest"))
    assert test_command in ci and test_command.startswith("python3 -m venv .venv && . .venv/bin/activate && ")
    demo_command = next(line for line in readme.splitlines() if line.endswith("minimoe demo"))
    assert demo_command.startswith("python3 -m venv .venv && . .venv/bin/activate && ")  # one environment for both


def substitute(words: list[str], tmp_path: Path) -> list[str]:
    """The placeholders of a documented command, given a meaning on this machine."""
    source = tmp_path / "source.py"
    source.write_text(SOURCE, encoding="utf-8")
    meaning = {"DIR": str(minimoe.default_model_path()), "CKPT": str(minimoe.default_model_path()),
               "DENSE_DIR": "qwen1.5-1.8b", "OUT_DIR": str(tmp_path / "out"), "report/": str(tmp_path / "report")}
    return [meaning.get(word, str(source) if word.endswith((".py", ".txt")) else word) for word in words]


def missing_path(argv: list[str]) -> str | None:
    """A path the command reads that is not here (a checkpoint to download or make first), or None."""
    for flag, value in zip(argv, argv[1:]):
        if flag == "--model" and not Path(value).exists():
            return value
    return None


def check_minimoe(argv: list[str], monkeypatch, capsys) -> None:
    parser = cli.build_parser()
    args = parser.parse_args(argv)  # a wrong or missing flag: SystemExit, the test fails here
    if argv[0] in ("bench", "train", "atlas"):
        return  # minutes of measuring, training or tracing a corpus: parsed only (test_train_cli, test_atlas run them)
    if missing_path(argv):
        return  # a checkpoint to download or make first: parsed only
    if argv[0] == "upcycle" and not args.dry_run:
        argv = [*argv, "--dry-run"]  # writes a checkpoint of the real model's size: its recipe checked on the config
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # chat: the conversation ends at once
    code = cli.main(argv)
    assert code == 0, capsys.readouterr().err


def check_help(command: list[str], flags: list[str]) -> None:
    result = subprocess.run([sys.executable, *command, "--help"], capture_output=True, text=True, cwd=ROOT,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert [flag for flag in flags if flag not in result.stdout] == []


def check_pip(words: list[str]) -> None:
    """``pip install -e .`` or ``-e ".[extras]"``: the extras exist.  Installing from an index is left to CI."""
    if "-e" not in words:
        return
    target = words[words.index("-e") + 1]
    match = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", target)
    assert match, f"pip install -e {target}: not this project"
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(filter(None, (match.group(1) or "").split(","))) <= set(extras)


@pytest.mark.parametrize("command", list(WHERE), ids=[f"{WHERE[c][0]}:{c[:40]}" for c in WHERE])
def test_the_documented_command_works(command, tmp_path, monkeypatch, capsys):
    where = ", ".join(WHERE[command])
    monkeypatch.chdir(tmp_path)
    words = without_env(shlex.split(command))
    flags = [word.split("=")[0] for word in words if word.startswith("--")]
    if words[0] == "minimoe":
        check_minimoe(substitute(words[1:], tmp_path), monkeypatch, capsys)
    elif words[0] in ("python", "python3") and words[1] == "-m" and words[2] in ENVIRONMENT:
        pytest.skip(f"{command}: {ENVIRONMENT[words[2]]}, checked by CI's run of the README's test command")
    elif words[0] in ("python", "python3") and words[1] == "-m":
        assert words[2].startswith("minimoe"), f"{where}: {command}"
        check_help(words[1:3], flags)
    elif words[0] in ("python", "python3"):
        assert (ROOT / words[1]).is_file(), f"{where}: {words[1]} does not exist"
        check_help([str(ROOT / words[1])], flags)
    elif words[0] == "pip":
        check_pip(words)
    elif words[0] in (".", "huggingface-cli", "jupyter"):
        pytest.skip(f"{command}: an environment or a download, not something to run offline")
    else:
        pytest.fail(f"{where}: {command!r}: a kind of command this test does not know how to check")
