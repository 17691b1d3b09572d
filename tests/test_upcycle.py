"""Upcycling a dense Qwen2 into a Qwen2-MoE (minimoe.upcycle, ``minimoe upcycle``).

Checked against transformers (the upcycled folder is a Qwen2MoeForCausalLM it loads, and its
logits are minimoe's) and against arithmetic on the dense weights (which dense neurons each
expert must hold, what summing segments must give), never against earlier output of the code.
The dense parent is the fixture ``tests/fixtures/dense_qwen2`` (float32, hidden 32, FFN 48,
2 layers, grouped-query attention), or a bf16 one made here with transformers.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import minimoe
from minimoe import MinimoeError
from minimoe.checkpoint.reader import Checkpoint
from minimoe.config import ModelConfig
from minimoe.inspect.params import Architecture, count_parameters
from minimoe.tools.upcycle import FeedForward, cut_into_experts, replicate, shuffle
from minimoe.checkpoint.names import dense_mlp_prefix, expert_prefix, router_name, shared_expert_gate_name, shared_expert_prefix, swiglu_names

from conftest import FIXTURES, ROOT
from parity import LOGIT_TOLERANCE, relative_error

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

DENSE = FIXTURES / "dense_qwen2"
FFN = 48  # the fixture's intermediate_size
IDS = np.array([3, 17, 42, 8, 91, 23, 5, 60, 11, 77])
# 8 segments of 12 neurons = 96 = exactly 2 copies of the 48-wide FFN: 2 shared, 6 routed.
SMALL = dict(num_experts=8, shared_experts=2, top_k=2, expert_size=12)
SMALL_FLAGS = ("--experts", "8", "--shared-experts", "2", "--top-k", "2", "--expert-size", "12")
CONFIGS = ROOT / "minimoe" / "configs"


def run_cli(*args: str, preexec=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minimoe", "upcycle", *map(str, args)], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, preexec_fn=preexec)


def dense_ffn(folder: Path, layer: int) -> FeedForward:
    names = swiglu_names(dense_mlp_prefix(layer))
    checkpoint = Checkpoint(folder)
    return FeedForward(*(np.array(checkpoint.array(names[role])) for role in ("gate", "up", "down")))


def stored_mlp(checkpoint: Checkpoint, prefix: str) -> FeedForward:
    names = swiglu_names(prefix)
    return FeedForward(*(np.array(checkpoint.array(names[role])) for role in ("gate", "up", "down")))


def transformers_logits(folder: Path, moe: bool, ids: np.ndarray = IDS) -> np.ndarray:
    cls = transformers.Qwen2MoeForCausalLM if moe else transformers.Qwen2ForCausalLM
    model = cls.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor(ids[None])).logits[0].numpy()


@pytest.fixture
def dense_with_side_files(tmp_path) -> Path:
    """The dense fixture plus the tokenizer and generation files a real checkpoint carries."""
    folder = tmp_path / "dense"
    shutil.copytree(DENSE, folder)
    (folder / "generation_config.json").write_text('{"do_sample": false, "eos_token_id": 2}\n')
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 48}\n')
    return folder


@pytest.fixture(scope="module")
def dense_bf16(tmp_path_factory) -> Path:
    """A tiny dense Qwen2 saved in bf16 by transformers itself (untied head, biases, grouped-query attention)."""
    folder = tmp_path_factory.mktemp("dense_bf16")
    config = transformers.Qwen2Config(vocab_size=80, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    return folder


# --- against transformers ----------------------------------------------------------------

@pytest.mark.parametrize("method", ["qwen", "drop", "copy"])
def test_upcycled_folder_loads_in_transformers_with_minimoe_logits(dense_with_side_files, tmp_path, method):
    # router_std=1: decisive routing, so that no near-tie can flip a top-2 choice between the two.
    out = minimoe.upcycle(dense_with_side_files, tmp_path / "moe", **SMALL, method=method, router_std=1.0,
                          shard_bytes=20_000)
    assert (out / "model.safetensors.index.json").exists() and len(list(out.glob("model-*.safetensors"))) > 1
    for name in ("generation_config.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (dense_with_side_files / name).read_bytes()
    theirs = transformers_logits(out, moe=True)
    ours = minimoe.load(out).forward(IDS)
    assert relative_error(ours, theirs) < LOGIT_TOLERANCE


def test_bf16_parent_gives_a_bf16_child_that_transformers_loads(dense_bf16, tmp_path):
    out = minimoe.upcycle(dense_bf16, tmp_path / "moe", num_experts=6, shared_experts=1, top_k=2, expert_size=20,
                          router_std=1.0)
    checkpoint = Checkpoint(out)
    assert {str(checkpoint.info(name).dtype) for name in checkpoint.names} == {"bfloat16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    ids = IDS % 80
    assert relative_error(minimoe.load(out).forward(ids), transformers_logits(out, moe=True, ids=ids)) < LOGIT_TOLERANCE


def test_sparse_upcycling_condition_reproduces_the_dense_model_exactly(tmp_path):
    """The exact condition: method "copy" with expert_size = the FFN width (each expert a whole copy,
    Komatsuzaki et al.'s sparse upcycling), no shared expert, router_std=0 (every routing weight
    softmax(0) = 1/E) and top_k = E (all experts used).  Then each MoE layer computes
    sum_e (1/E) * dense(h) = dense(h), and the MoE's logits are the dense model's."""
    out = minimoe.upcycle(DENSE, tmp_path / "moe", num_experts=4, shared_experts=0, top_k=4, expert_size=FFN,
                          method="copy", router_std=0.0)
    dense_logits = transformers_logits(DENSE, moe=False)
    assert relative_error(transformers_logits(out, moe=True), dense_logits) < 1e-5
    assert relative_error(minimoe.load(out).forward(IDS), dense_logits) < 1e-5


# --- against arithmetic on the dense weights -------------------------------------------------

def test_a_shuffled_copy_summed_over_its_segments_is_the_dense_ffn():
    ffn = dense_ffn(DENSE, layer=0)
    x = np.random.default_rng(0).standard_normal((5, ffn.gate.shape[1]), dtype=np.float32)
    order = shuffle(replicate(FFN, 1), np.random.default_rng(1))
    assert sorted(order[0]) == list(range(FFN)) and list(order[0]) != list(range(FFN))
    segments = cut_into_experts(order, 4, FFN // 4)
    summed = sum(ffn.take(neurons)(x) for neurons in segments)
    np.testing.assert_allclose(summed, ffn(x), rtol=1e-5, atol=1e-6)


def test_qwen_experts_without_reinit_are_shuffled_copies_of_the_dense_ffn(tmp_path):
    """reinit=0: the 8 segments are 2 whole shuffled copies; the first 4 (the shared expert's 2 and
    routed experts 0, 1) make copy 1, so together they compute the dense FFN."""
    out = minimoe.upcycle(DENSE, tmp_path / "moe", **SMALL, method="qwen", reinit=0.0)
    checkpoint = Checkpoint(out)
    x = np.random.default_rng(0).standard_normal((5, 32), dtype=np.float32)
    for layer in range(2):
        ffn = dense_ffn(DENSE, layer)
        shared = stored_mlp(checkpoint, shared_expert_prefix(layer))
        first_copy = [shared] + [stored_mlp(checkpoint, expert_prefix(layer, e)) for e in (0, 1)]
        np.testing.assert_allclose(sum(mlp(x) for mlp in first_copy), ffn(x), rtol=1e-5, atol=1e-6)
        assert not np.array_equal(shared.gate, ffn.gate[:24])  # shuffled, not the first 24 neurons in order


def neuron_rows(ffn: FeedForward) -> dict[bytes, int]:
    """Each neuron (gate row, up row, down column) as bytes -> its index in ``ffn``."""
    return {ffn.gate[i].tobytes() + ffn.up[i].tobytes() + ffn.down[:, i].tobytes(): i for i in range(ffn.width)}


@pytest.mark.parametrize("method, reinit", [("qwen", 0.5), ("drop", 0.5), ("drop", 0.3), ("qwen", 1.0)])
def test_reinit_fraction_is_exact_to_the_neuron_and_the_rest_are_dense_neurons(tmp_path, method, reinit):
    out = minimoe.upcycle(DENSE, tmp_path / "moe", **SMALL, method=method, reinit=reinit)
    checkpoint = Checkpoint(out)
    ffns = [dense_ffn(DENSE, layer) for layer in range(2)]
    # every dense gate row, up row and down column: a fresh neuron shares none of them
    dense_parts = {vector.tobytes() for f in ffns for vector in (*f.gate, *f.up, *f.down.T)}
    for layer in range(2):
        dense = neuron_rows(ffns[layer])
        for e in range(SMALL["num_experts"] - SMALL["shared_experts"]):
            expert = stored_mlp(checkpoint, expert_prefix(layer, e))
            found = [dense.get(key) for key in neuron_rows(expert)]
            fresh = found.count(None)
            for j in (j for j, index in enumerate(found) if index is None):  # all three parts redrawn, not one
                parts = {expert.gate[j].tobytes(), expert.up[j].tobytes(), expert.down[:, j].tobytes()}
                assert not parts & dense_parts
            assert abs(fresh - reinit * 12) <= 0.5, (layer, e, fresh)
            if method == "drop":  # no shuffle: segment s holds dense neurons (s * 12 + j) mod 48, in order
                segment = SMALL["shared_experts"] + e
                expected = [(segment * 12 + j) % FFN for j in range(12)]
                kept = [j for j, index in enumerate(found) if index is not None]
                assert [found[j] for j in kept] == [expected[j] for j in kept]


def test_fresh_neurons_follow_the_dense_matrices_mean_and_std(tmp_path):
    out = minimoe.upcycle(DENSE, tmp_path / "moe", num_experts=24, shared_experts=0, top_k=2, expert_size=48,
                          method="drop", reinit=1.0)
    checkpoint = Checkpoint(out)
    for role in ("gate", "up", "down"):
        dense = dense_ffn(DENSE, 0)._asdict()[role]
        fresh = np.stack([stored_mlp(checkpoint, expert_prefix(0, e))._asdict()[role] for e in range(24)])
        assert abs(fresh.mean() - dense.mean()) < 0.05 * dense.std()
        assert abs(fresh.std() / dense.std() - 1) < 0.05


def test_router_and_shared_gate_start_as_documented(tmp_path):
    out = minimoe.upcycle(DENSE, tmp_path / "moe", **SMALL, router_std=0.02)
    checkpoint = Checkpoint(out)
    router = np.array(checkpoint.array(router_name(0)))
    assert router.shape == (6, 32) and 0.01 < router.std() < 0.03 and abs(router.mean()) < 0.01
    assert not np.any(checkpoint.array(shared_expert_gate_name(0)))


def test_same_seed_same_bytes_different_seed_different_bytes(tmp_path):
    def files(seed, name):
        out = minimoe.upcycle(DENSE, tmp_path / name, **SMALL, seed=seed)
        return {path.name: path.read_bytes() for path in sorted(out.iterdir())}

    first, again, other = files(0, "a"), files(0, "b"), files(1, "c")
    assert first == again
    assert first["model.safetensors"] != other["model.safetensors"]
    assert first["config.json"] == other["config.json"]


# --- the Qwen1.5-MoE-A2.7B architecture from Qwen1.5-1.8B's config --------------------------

A27B_FLAGS = ("--experts", "64", "--shared-experts", "4", "--top-k", "4", "--expert-size", "1408")


def test_dry_run_on_qwen15_18b_gives_qwen15_moe_a27b(tmp_path):
    out = tmp_path / "never-written"
    result = run_cli(CONFIGS / "qwen1.5-1.8b.json", out, *A27B_FLAGS, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert not out.exists()
    printed, _, counts = result.stdout.partition("\n}\n")
    config = json.loads(printed + "\n}")
    hub = json.loads((CONFIGS / "qwen1.5-moe-a2.7b.json").read_text())
    # Every field that shapes the network; max_position_embeddings (context) comes from the dense parent,
    # and intermediate_size is read only by dense layers, of which both have none.
    for key in ("architectures", "model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "hidden_act", "rms_norm_eps", "rope_theta", "tie_word_embeddings", "num_experts",
                "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size", "norm_topk_prob",
                "decoder_sparse_step", "router_aux_loss_coef", "use_sliding_window", "bos_token_id", "eos_token_id",
                "torch_dtype"):
        assert config[key] == hub[key], key
    ours, theirs = (Architecture.from_model_config(ModelConfig.from_dict(c)) for c in (config, hub))
    assert count_parameters(ours) == count_parameters(theirs)
    assert [line.split()[-2] for line in counts.splitlines()[1:]] == ["14.32B", "2.69B", "2.07B"]


# --- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("options, message", [
    (dict(SMALL, expert_size=49), "expert_size 49 cannot be cut from the dense FFN"),
    (dict(SMALL, expert_size=0), "expert_size 0 cannot be cut"),
    (dict(SMALL, shared_experts=8), r"shared_experts \(8\) must be fewer than num_experts \(8\)"),
    (dict(SMALL, shared_experts=9), r"shared_experts \(9\) must be fewer"),
    (dict(SMALL, top_k=7), r"top_k \(7\) must be between 1 and the 6 routed experts"),
    (dict(SMALL, top_k=0), r"top_k \(0\) must be between 1"),
    (dict(SMALL, reinit=1.5), r"reinit 1.5 is outside \[0, 1\]"),
    (dict(SMALL, reinit=-0.1), r"reinit -0.1 is outside \[0, 1\]"),
    (dict(SMALL, reinit=float("nan")), r"reinit nan is outside \[0, 1\]"),
    (dict(SMALL, method="mixtral"), "method 'mixtral' is not one of 'copy', 'qwen', 'drop'"),
    (dict(SMALL, router_std=-1.0), "router_std -1.0 must be a finite number >= 0"),
    (dict(SMALL, seed=-1), "seed must be a non-negative integer"),
    (dict(SMALL, num_experts=8.0), "num_experts must be a non-negative integer"),
])
def test_bad_options_are_refused_before_anything_is_written(tmp_path, options, message):
    with pytest.raises(MinimoeError, match=message):
        minimoe.upcycle(DENSE, tmp_path / "moe", **options)
    assert list(tmp_path.iterdir()) == []


def test_an_moe_or_another_model_type_is_not_a_dense_parent(tmp_path):
    with pytest.raises(MinimoeError, match="'qwen2_moe' is already a mixture of experts"):
        minimoe.upcycle(FIXTURES / "moe_gqa", tmp_path / "moe", **SMALL)
    llama = tmp_path / "llama"
    shutil.copytree(DENSE, llama)
    config = json.loads((llama / "config.json").read_text())
    (llama / "config.json").write_text(json.dumps(dict(config, model_type="llama")))
    with pytest.raises(MinimoeError, match="model_type 'llama' is not a dense Qwen2"):
        minimoe.upcycle(llama, tmp_path / "moe", **SMALL)


def test_weights_that_disagree_with_the_config_are_refused(tmp_path):
    wrong = tmp_path / "wrong"
    shutil.copytree(DENSE, wrong)
    config = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps(dict(config, intermediate_size=40)))
    with pytest.raises(MinimoeError, match=r"mlp.gate_proj.weight' has shape \[48, 32\], expected \[40, 32\]"):
        minimoe.upcycle(wrong, tmp_path / "moe", num_experts=4, shared_experts=1, top_k=2, expert_size=10)
    assert not (tmp_path / "moe").exists()


def test_a_non_empty_output_folder_is_replaced_only_with_force(tmp_path):
    out = tmp_path / "moe"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(MinimoeError, match="folder exists and is not empty"):
        minimoe.upcycle(DENSE, out, **SMALL)
    assert (out / "notes.txt").read_text() == "mine"
    minimoe.upcycle(DENSE, out, **SMALL, force=True)
    assert not (out / "notes.txt").exists() and (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moe"]  # no staging or old folder left behind
    empty = tmp_path / "empty"
    empty.mkdir()
    minimoe.upcycle(DENSE, empty, **SMALL)  # an empty folder is fine without force
    assert (empty / "config.json").exists()


def test_the_output_may_not_be_the_dense_folder_or_a_file(tmp_path, dense_with_side_files):
    with pytest.raises(MinimoeError, match="would replace the dense checkpoint"):
        minimoe.upcycle(dense_with_side_files, dense_with_side_files, **SMALL, force=True)
    with pytest.raises(MinimoeError, match="would replace the dense checkpoint"):
        minimoe.upcycle(dense_with_side_files, dense_with_side_files.parent, **SMALL, force=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(MinimoeError, match="exists and is not a folder"):
        minimoe.upcycle(dense_with_side_files, tmp_path / "file", **SMALL, force=True)


def limit_file_size():
    """In the child: files may not grow past 20 kB (a full disk, as far as the writer can tell)."""
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))


def test_a_failed_write_leaves_nothing_that_looks_complete(tmp_path):
    out = tmp_path / "moe"
    result = run_cli(DENSE, out, *SMALL_FLAGS, preexec=limit_file_size)
    assert result.returncode == 1, result.stderr
    assert "minimoe: error:" in result.stderr and "writing the upcycled checkpoint failed (File too large)" in result.stderr
    assert list(tmp_path.iterdir()) == []


# --- the command line ------------------------------------------------------------------------

def test_cli_upcycles_as_the_library_does_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / "moe"
    result = run_cli(DENSE, out, *SMALL_FLAGS, "--method", "drop", "--reinit", "0.25", "--seed", "3")
    assert result.returncode == 0, result.stderr
    library = minimoe.upcycle(DENSE, tmp_path / "library", **SMALL, method="drop", reinit=0.25, seed=3)
    assert (out / "model.safetensors").read_bytes() == (library / "model.safetensors").read_bytes()
    again = run_cli(DENSE, out, *SMALL_FLAGS)
    assert again.returncode == 1 and "folder exists and is not empty (use --force" in again.stderr
    assert run_cli(DENSE, out, *SMALL_FLAGS, "--force").returncode == 0


@pytest.mark.parametrize("args, code, message", [
    (("--method", "copy", "--reinit", "0.5"), 1, "--reinit has no effect with --method copy"),
    (("--top-k", "9"), 1, "top_k (9) must be between 1 and the 6 routed experts"),
    (("--method", "bogus"), 2, "invalid choice: 'bogus'"),
])
def test_cli_bad_input(tmp_path, args, code, message):
    flags = dict(zip(SMALL_FLAGS[::2], SMALL_FLAGS[1::2])) | dict(zip(args[::2], args[1::2]))
    result = run_cli(DENSE, tmp_path / "moe", *[item for pair in flags.items() for item in pair])
    assert result.returncode == code and message in result.stderr, result.stderr
    assert not (tmp_path / "moe").exists()
