"""The safetensors reader: correct loads, and one clear MinimoeError for every kind of bad file."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.numpy import save_file

import minimoe
from minimoe import MinimoeError
from minimoe.checkpoint.reader import MAX_HEADER_BYTES, Checkpoint, SafetensorsFile

from conftest import FIXTURES

try:  # the reference reader for BF16 (safetensors' NumPy API cannot hold bfloat16)
    import torch
except ImportError:
    torch = None


def write_raw(path: Path, header: dict, data: bytes) -> Path:
    """A safetensors file with an arbitrary (possibly inconsistent) header."""
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def entry(dtype: str, shape: list, begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def test_reads_every_supported_dtype_bit_exactly(tmp_path):
    rng = np.random.default_rng(0)
    f32 = rng.standard_normal((3, 5)).astype(np.float32)
    arrays = {"a.f32": f32, "b.f16": f32.astype(np.float16)}
    save_file(arrays, str(tmp_path / "x.safetensors"))
    bf16 = f32.astype(ml_dtypes.bfloat16)
    header = {"c.bf16": entry("BF16", [3, 5], 0, bf16.nbytes), "__metadata__": {"format": "pt"}}
    write_raw(tmp_path / "y.safetensors", header, bf16.tobytes())

    x = SafetensorsFile(tmp_path / "x.safetensors")
    assert np.array_equal(x.array("a.f32"), arrays["a.f32"])
    assert np.array_equal(x.array("b.f16"), arrays["b.f16"])
    y = SafetensorsFile(tmp_path / "y.safetensors")
    assert y.metadata == {"format": "pt"}
    assert y.array("c.bf16").dtype == ml_dtypes.bfloat16
    assert np.array_equal(y.array("c.bf16").view(np.uint16), bf16.view(np.uint16))


def test_arrays_are_read_only_views(tmp_path):
    save_file({"w": np.ones((2, 2), np.float32)}, str(tmp_path / "x.safetensors"))
    array = SafetensorsFile(tmp_path / "x.safetensors").array("w")
    with pytest.raises(ValueError):
        array[0, 0] = 5.0
    assert np.array_equal(np.ones((2, 2)), SafetensorsFile(tmp_path / "x.safetensors").array("w"))


# --- each bad file: the error names the file (and the tensor when there is one) -----------------

def bad_file_cases(tmp_path: Path):
    ok = entry("F32", [2], 0, 8)
    yield "missing", tmp_path / "absent.safetensors", "file not found"
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\x05\x00")
    yield "too short", short, "too short to be safetensors"
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}")
    yield "header too large", huge, "over the 104857600-byte limit"
    past = tmp_path / "past.safetensors"
    past.write_bytes(struct.pack("<Q", 1000) + b"{}")
    yield "header past the end", past, "header claims 1000 bytes but the file has only 2"
    yield "truncated data", write_raw(tmp_path / "trunc.safetensors", {"w": ok}, b"\x00" * 5), \
        "tensor 'w': data_offsets end at byte 8, past the 5-byte data section"
    yield "overlap", write_raw(tmp_path / "overlap.safetensors", {"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 4, 12)}, b"\x00" * 12), \
        "overlap"
    yield "size mismatch", write_raw(tmp_path / "size.safetensors", {"w": entry("F32", [3], 0, 8)}, b"\x00" * 12), \
        "tensor 'w': data_offsets [0, 8] hold 8 bytes, but shape [3] of F32 needs 12"
    yield "reversed offsets", write_raw(tmp_path / "rev.safetensors", {"w": entry("F32", [0], 8, 0)}, b"\x00" * 8), \
        "data_offsets [8, 0]"
    yield "bad dtype", write_raw(tmp_path / "dtype.safetensors", {"w": entry("I64", [1], 0, 8)}, b"\x00" * 8), \
        "dtype 'I64' is not supported"
    yield "bad shape", write_raw(tmp_path / "shape.safetensors", {"w": entry("F32", [-2], 0, 8)}, b"\x00" * 8), \
        "shape [-2] is not a list of non-negative integers"
    yield "boolean shape", write_raw(tmp_path / "boolshape.safetensors", {"w": entry("F32", [True], 0, 4)}, b"\x00" * 4), \
        "shape [True] is not a list of non-negative integers"
    yield "boolean offsets", write_raw(tmp_path / "booloffsets.safetensors", {"w": entry("F32", [], False, 4)}, b"\x00" * 4), \
        "data_offsets [False, 4] is not a pair of non-negative integers"
    notjson = tmp_path / "notjson.safetensors"
    notjson.write_bytes(struct.pack("<Q", 4) + b"{{{{")
    yield "not json", notjson, "header is not valid JSON"


def test_each_bad_file_raises_a_clear_error(tmp_path):
    cases = list(bad_file_cases(tmp_path))
    assert len(cases) == 13
    for label, path, message in cases:
        with pytest.raises(MinimoeError) as error:
            SafetensorsFile(path)
        assert message in str(error.value), label
        assert str(path) in str(error.value), label


# --- checkpoint folders ------------------------------------------------------------------------

@pytest.fixture
def sharded(tmp_path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(FIXTURES / "moe_bf16_sharded", folder)
    return folder


def rewrite_index(folder: Path, edit) -> None:
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    edit(index["weight_map"])
    index_path.write_text(json.dumps(index))


def test_sharded_checkpoint_opens(sharded):
    checkpoint = Checkpoint(sharded)
    assert len(checkpoint.files) == 4
    assert "model.layers.2.mlp.experts.7.down_proj.weight" in checkpoint


@pytest.mark.parametrize("shard", [
    "../escape.safetensors", "/etc/passwd", "sub/dir.safetensors", "..", ".", "", "C:evil",
    "..\\escape.safetensors", "sub\\dir.safetensors", "C:\\evil.safetensors", "\\\\server\\share.safetensors",
    "sub/../escape.safetensors", "./model-00001-of-00004.safetensors",
])
def test_index_cannot_name_a_shard_outside_the_folder(sharded, shard):
    (sharded.parent / "escape.safetensors").write_bytes((sharded / "model-00001-of-00004.safetensors").read_bytes())
    rewrite_index(sharded, lambda weight_map: weight_map.__setitem__("model.norm.weight", shard))
    with pytest.raises(MinimoeError, match="points outside the model folder"):
        Checkpoint(sharded)


def test_index_placing_a_tensor_in_the_wrong_shard(sharded):
    rewrite_index(sharded, lambda weight_map: weight_map.__setitem__("model.norm.weight", "model-00001-of-00004.safetensors"))
    assert "model.norm.weight" not in SafetensorsFile(sharded / "model-00001-of-00004.safetensors").tensors
    with pytest.raises(MinimoeError, match="'model.norm.weight' is listed in model-00001-of-00004.safetensors but not there"):
        Checkpoint(sharded)


def test_a_tensor_in_two_shards_is_refused(sharded):
    shutil.copy(sharded / "model-00004-of-00004.safetensors", sharded / "model-extra.safetensors")
    rewrite_index(sharded, lambda weight_map: weight_map.__setitem__("model.extra.weight", "model-extra.safetensors"))
    with pytest.raises(MinimoeError, match="appears in two files"):
        Checkpoint(sharded)


def test_missing_shard_is_named(sharded):
    (sharded / "model-00003-of-00004.safetensors").unlink()
    with pytest.raises(MinimoeError, match="shard 'model-00003-of-00004.safetensors' named by .* is missing"):
        minimoe.load(sharded)


def test_index_naming_a_tensor_its_shard_lacks(sharded):
    rewrite_index(sharded, lambda weight_map: weight_map.__setitem__("model.ghost.weight", "model-00001-of-00004.safetensors"))
    with pytest.raises(MinimoeError, match="'model.ghost.weight' is listed in model-00001-of-00004.safetensors but not there"):
        Checkpoint(sharded)


def test_truncated_shard_is_named(sharded):
    shard = sharded / "model-00002-of-00004.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(MinimoeError, match=r"model-00002-of-00004.safetensors: tensor .* past the .* data section"):
        minimoe.load(sharded)


def test_missing_and_misshapen_tensors_are_named(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(FIXTURES / "moe_gqa", folder)
    tensors = dict(SafetensorsFile(folder / "model.safetensors").tensors)
    arrays = {name: np.array(SafetensorsFile(folder / "model.safetensors").array(name)) for name in tensors}

    del arrays["model.layers.1.mlp.experts.3.up_proj.weight"]
    save_file(arrays, str(folder / "model.safetensors"))
    with pytest.raises(MinimoeError, match="tensor 'model.layers.1.mlp.experts.3.up_proj.weight' is missing"):
        minimoe.load(folder)

    arrays["model.layers.1.mlp.experts.3.up_proj.weight"] = np.zeros((16, 31), np.float32)
    save_file(arrays, str(folder / "model.safetensors"))
    with pytest.raises(MinimoeError, match=r"'model.layers.1.mlp.experts.3.up_proj.weight' has shape \[16, 31\], expected \[16, 32\]"):
        minimoe.load(folder)


def test_folder_without_weights(tmp_path):
    shutil.copy(FIXTURES / "moe_gqa" / "config.json", tmp_path / "config.json")
    with pytest.raises(MinimoeError, match="neither model.safetensors nor model.safetensors.index.json"):
        minimoe.load(tmp_path)
    with pytest.raises(MinimoeError, match="not a folder"):
        minimoe.load(tmp_path / "nowhere")


def test_corrupt_index(sharded):
    (sharded / "model.safetensors.index.json").write_text('{"weight_map": 7}')
    with pytest.raises(MinimoeError, match="not a valid safetensors index"):
        Checkpoint(sharded)


# --- valid files whose layout a careless check would refuse --------------------------------------

def test_tensor_names_in_another_order_than_their_offsets(tmp_path):
    """Names sort a, b, c; the data holds c, a, b.  Touching tensors and empty ones are not overlaps."""
    values = {"a": np.arange(3, dtype=np.float32), "b": np.arange(2, dtype=np.float16), "c": np.float32(7.5)}
    header = {"a": entry("F32", [3], 4, 16), "b": entry("F16", [2], 16, 20), "c": entry("F32", [], 0, 4),
              "empty": entry("F32", [0, 3], 20, 20)}
    path = write_raw(tmp_path / "x.safetensors", header, values["c"].tobytes() + values["a"].tobytes() + values["b"].tobytes())
    reader = SafetensorsFile(path)
    for name, value in values.items():
        assert np.array_equal(reader.array(name), value) and reader.array(name).shape == np.shape(value)
    assert reader.array("empty").shape == (0, 3)


# --- property: valid files, generated at random, always load and read back exactly ----------------

DTYPE_OF = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16} if torch else {}


@st.composite
def valid_files(draw):
    """(file bytes, {name: (dtype, shape, data bytes)}): tensors laid out contiguously in a random
    order unrelated to their names, header padded with spaces as the safetensors writer does."""
    names = draw(st.lists(st.text("abz._019", min_size=1, max_size=8), min_size=1, max_size=6, unique=True))
    tensors = {}
    for name in names:
        dtype = draw(st.sampled_from(sorted(DTYPE_OF)))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        size = int(np.prod(shape, dtype=np.int64)) * (4 if dtype == "F32" else 2)
        tensors[name] = (dtype, shape, draw(st.binary(min_size=size, max_size=size)))
    header, data = {}, b""
    for name in draw(st.permutations(names)):
        dtype, shape, blob = tensors[name]
        header[name] = entry(dtype, shape, len(data), len(data) + len(blob))
        data += blob
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text("ab", max_size=3), st.text("xy", max_size=3), max_size=2))
    text = json.dumps(header) + " " * draw(st.integers(0, 7))
    return struct.pack("<Q", len(text)) + text.encode() + data, tensors


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(made=valid_files())
def test_valid_files_always_load_and_read_back_exactly(tmp_path_factory, made):
    """The reference reader (safetensors' own, through torch) accepts each file and gives the same bytes."""
    blob, tensors = made
    path = tmp_path_factory.mktemp("valid") / "model.safetensors"
    path.write_bytes(blob)
    reader = SafetensorsFile(path)
    assert set(reader.tensors) == set(tensors)
    with safe_open(str(path), framework="pt") as reference:
        for name, (dtype, shape, data) in tensors.items():
            ours = reader.array(name)
            assert ours.shape == tuple(shape) and ours.tobytes() == data
            theirs = reference.get_tensor(name)
            assert theirs.dtype == DTYPE_OF[dtype] and theirs.reshape(-1).view(torch.uint8).numpy().tobytes() == data


# --- property: any mutation of a valid file loads correctly or raises MinimoeError -------------

VALID = FIXTURES / "moe_gqa" / "model.safetensors"


@st.composite
def mutated_files(draw):
    data = bytearray(VALID.read_bytes())
    header_len = struct.unpack("<Q", bytes(data[:8]))[0]
    kind = draw(st.sampled_from(["flip", "truncate", "header_text", "length"]))
    if kind == "flip":  # overwrite a few bytes anywhere in the length prefix or header
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, 8 + header_len - 1))] = draw(st.integers(0, 255))
    elif kind == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif kind == "header_text":  # replace a run of header characters with digits/JSON punctuation
        start = draw(st.integers(8, 8 + header_len - 1))
        text = draw(st.text(alphabet='0123456789[]{},":-', min_size=1, max_size=8)).encode()
        data[start : start + len(text)] = text
    else:  # lie about the header length
        data[:8] = struct.pack("<Q", draw(st.integers(0, 2**64 - 1)))
    return bytes(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=mutated_files())
def test_mutated_files_load_correctly_or_raise_our_error(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("mutant") / "model.safetensors"
    path.write_bytes(blob)
    try:
        reader = SafetensorsFile(path)
        for name in reader.tensors:  # every tensor the header admits must be readable as declared
            array = reader.array(name)
            assert array.shape == reader.tensors[name].shape
            np.asarray(array, dtype=np.float32)
    except MinimoeError as error:
        assert str(path) in str(error)
