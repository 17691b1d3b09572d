"""Files minimoe writes appear whole or not at all."""

from __future__ import annotations

import numpy as np
import pytest

import minimoe
from minimoe.files import atomic_write, write_text


def test_a_failed_write_leaves_the_old_file_and_no_partial_one(tmp_path):
    target = tmp_path / "out.json"
    write_text(target, "old")
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_write(target, "w") as handle:
            handle.write("half of the new")
            raise RuntimeError("killed midway")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_a_whole_write_replaces_the_file(tmp_path):
    target = tmp_path / "out.bin"
    write_text(target, "old")
    with atomic_write(target) as handle:
        handle.write(b"new")
    assert target.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_trace_exports_keep_the_name_they_are_given(tmp_path):
    """An .npz is written through a handle (numpy adds ".npz" to a name without it), whole or not at all."""
    trace = minimoe.load(minimoe.default_model_path()).trace([1, 2, 3])
    trace.save_npz(tmp_path / "trace.data")
    trace.to_json(tmp_path / "trace.json")
    trace.write_csv(tmp_path / "trace.csv")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trace.csv", "trace.data", "trace.json"]
    np.testing.assert_array_equal(minimoe.RoutingTrace.load_npz(tmp_path / "trace.data").expert_ids, trace.expert_ids)
