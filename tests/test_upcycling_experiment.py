"""scripts/upcycling_experiment.py's code paths, on a few steps: every arm starts, trains, and is reported.

The full experiment takes hours on 2 cores (its results are in docs/data/upcycling_experiment_minimoe.json,
the torch reference's in docs/data/upcycling_experiment.json); here each arm runs a handful of steps on a
few documents, so what is checked is the plumbing: the starting points, the shared data order, the
evaluations, the summary arithmetic, the comparison of engines and the figures.
"""

from __future__ import annotations

import json

import pytest

import upcycling_experiment as experiment  # noqa: E402  (scripts/, put on sys.path by conftest)

TINY = ["--tokens", "256", "--context", "32", "--batch", "2", "--evaluations", "2", "--eval-windows", "2",
        "--max-documents", "5", "--warmup", "2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("runs")
    experiment.main(["--arms", "scratch,copy,qwen,dense", *TINY, "--runs", str(folder)])
    return folder


def test_every_arm_writes_its_curve_from_the_same_budget(runs):
    results = {p.stem: json.loads(p.read_text()) for p in runs.glob("*.json")}
    assert sorted(results) == ["copy-seed0", "dense-seed0", "qwen-seed0", "scratch-seed0"]
    for run in results.values():
        assert run["tokens"] == [0, 128, 256] and len(run["loss"]) == 3
        assert run["tokens_seen"] == 256
    moe, dense = results["qwen-seed0"], results["dense-seed0"]
    assert dense["active_parameters"] < moe["active_parameters"] < moe["parameters"]


def test_upcycled_arms_start_near_the_parent_and_scratch_far_from_it(runs):
    start = {p.stem.split("-seed")[0]: json.loads(p.read_text())["loss"][0] for p in runs.glob("*.json")}
    assert abs(start["copy"] - start["dense"]) < 1.0  # the copies compute almost what the parent does
    assert start["scratch"] > start["dense"] + 2.0  # an untrained model: about ln(4096) = 8.3 nats


def test_report_writes_the_table_json_and_figures(runs, tmp_path, capsys):
    results, figure, engines = tmp_path / "results.json", tmp_path / "figure.png", tmp_path / "engines.png"
    experiment.main(["--report", "--runs", str(runs), "--results", str(results), "--figure", str(figure),
                     "--torch-runs", str(runs), "--engines-figure", str(engines)])  # an engine against itself
    written = json.loads(results.read_text())
    summary = written["summary"]
    assert set(written["engines"]) == set(summary["arms"])
    rows = [row for arm in written["engines"].values() for row in arm]
    assert [row["tokens"] for row in written["engines"]["qwen"]] == [128, 256]
    assert all(row["gap"] == 0 and row["agree"] for row in rows)
    assert engines.read_bytes().startswith(b"\x89PNG")
    assert set(summary["arms"]) == {"scratch", "copy", "qwen", "dense"}
    assert summary["parent_loss"] == json.loads((runs / "dense-seed0.json").read_text())["loss"][0]
    assert figure.read_bytes().startswith(b"\x89PNG")
    assert "tokens to parent" in capsys.readouterr().out


def test_an_unfinished_run_counts_in_the_comparison_of_engines_up_to_where_it_got_but_not_in_the_summary(runs, tmp_path):
    folder = tmp_path / "runs"
    folder.mkdir()
    for path in runs.glob("*.json"):
        (folder / path.name).write_text(path.read_text())
    unfinished = json.loads((runs / "qwen-seed0.json").read_text())
    unfinished.update(seed=1, tokens=unfinished["tokens"][:2], loss=unfinished["loss"][:2], partial=True)
    (folder / "qwen-seed1.json").write_text(json.dumps(unfinished))
    results = tmp_path / "results.json"
    experiment.main(["--report", "--runs", str(folder), "--results", str(results), "--figure", str(tmp_path / "f.png"),
                     "--torch-runs", str(runs), "--engines-figure", str(tmp_path / "e.png")])
    written = json.loads(results.read_text())
    assert written["summary"]["arms"]["qwen"]["seeds"] == [0]
    assert [row["tokens"] for row in written["engines"]["qwen"]] == [128]  # seed 1 stopped after it
    assert [run["seed"] for run in written["partial_runs"]] == [1]


def test_tokens_to_reach_interpolates_between_evaluations():
    assert experiment.tokens_to_reach([0, 100, 200], [5.0, 4.0, 3.0], 3.5) == 150
    assert experiment.tokens_to_reach([0, 100], [3.0, 2.0], 3.5) == 0  # never above the target
    assert experiment.tokens_to_reach([0, 100, 200], [3.5, 4.0, 3.0], 3.5) == 150  # re-warmed, then back
    assert experiment.tokens_to_reach([0, 100], [5.0, 4.0], 3.5) is None


def test_unknown_arms_are_refused():
    with pytest.raises(SystemExit):
        experiment.main(["--arms", "scratch,bogus"])
