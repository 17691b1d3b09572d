"""``minimoe train`` on a small corpus: the loss falls, the output loads in transformers with the same logits,
``--resume`` equals an uninterrupted run bit for bit, and bad input stops the run with nothing overwritten.

The model is a small MoE upcycled from the bundled dense parent (8 segments of 88, one shared, top-2),
trained on the held-out slices shipped in tests/data/held_out (stdlib code to train on, third-party
code to evaluate on) for a dozen steps of 2 windows of 32 tokens.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import minimoe
from minimoe.tools.cli import main
from minimoe.train import trainer

from parity import LOGIT_TOLERANCE, relative_error

DATA = Path(__file__).parent / "data" / "held_out"
TRAIN_TEXT, EVAL_TEXT = DATA / "stdlib.txt", DATA / "third_party.txt"
RUN = ["--tokens", str(12 * 2 * 32), "--context", "32", "--batch", "2", "--lr", "3e-3", "--warmup", "2",
       "--eval-every", "4", "--eval-windows", "4"]


@pytest.fixture(scope="module")
def start(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("start") / "moe"
    minimoe.upcycle(minimoe.default_model_path("dense"), folder, num_experts=8, shared_experts=1, top_k=2,
                    expert_size=88, seed=0)
    return folder


def train(start: Path, out: Path, *extra: str) -> int:
    return main(["train", str(start), "--data", str(TRAIN_TEXT), "--eval", str(EVAL_TEXT), "--out", str(out),
                 *RUN, *extra])


@pytest.fixture(scope="module")
def uninterrupted(start, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "straight"
    assert train(start, out, "--save-every", "3") == 0
    return out


def test_the_loss_falls(uninterrupted):
    log = json.loads((uninterrupted / "training.json").read_text())
    loss, held = log["curve"]["loss"], log["held_out"]["loss"]
    assert log["curve"]["step"] == list(range(1, 13))
    assert log["held_out"]["step"] == [0, 4, 8, 12]
    assert np.mean(loss[-3:]) < loss[0] - 0.3
    assert held[-1] < held[0] - 0.3


def test_the_output_loads_in_transformers_with_equal_logits(uninterrupted):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    theirs = transformers.AutoModelForCausalLM.from_pretrained(uninterrupted, dtype=torch.float32)
    tokenizer = minimoe.load_tokenizer(uninterrupted)
    ids = np.array([tokenizer.encode(EVAL_TEXT.read_text()[:2000])[:32 * 4]]).reshape(4, 32)
    with torch.no_grad():
        out = theirs(torch.tensor(ids), labels=torch.tensor(ids))
    ours = minimoe.load(uninterrupted).forward(ids)
    assert relative_error(ours, out.logits.numpy()) < LOGIT_TOLERANCE
    # the weights written are those the run ended with: transformers' loss on the held-out windows is the
    # loss minimoe recorded after the last step (float32, mean over the same 4 x 31 predictions)
    held = json.loads((uninterrupted / "training.json").read_text())["held_out"]["loss"][-1]
    assert out.loss.item() == pytest.approx(held, rel=1e-5)


def interrupt_at(monkeypatch, call: int, exception: BaseException | None = None, result=None):
    """Make the ``call``-th ``loss_and_grads`` of the run raise ``exception`` (or return ``result``)."""
    real, calls = trainer.loss_and_grads, []

    def patched(model, ids, **keywords):
        calls.append(1)
        if len(calls) == call:
            if exception is not None:
                raise exception
            return result(real(model, ids, **keywords))
        return real(model, ids, **keywords)

    monkeypatch.setattr(trainer, "loss_and_grads", patched)


def test_resume_continues_exactly_as_an_uninterrupted_run(start, uninterrupted, tmp_path, monkeypatch):
    out = tmp_path / "resumed"
    with monkeypatch.context() as patch:
        interrupt_at(patch, 8, KeyboardInterrupt())  # killed during step 8: checkpoints at 3 and 6 were written
        assert train(start, out, "--save-every", "3") == 130
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-000006"]
    assert not (out / "config.json").exists()  # no final model
    assert train(start, out, "--save-every", "3") == 1  # a non-empty --out needs --resume
    assert train(start, out, "--save-every", "3", "--resume") == 0
    for name in ("model.safetensors", "checkpoint-000012/model.safetensors", "checkpoint-000012/optimizer.npz"):
        ours, theirs = (dict(np.load(folder / name)) if name.endswith(".npz") else load_file(str(folder / name))
                        for folder in (out, uninterrupted))
        assert ours.keys() == theirs.keys()
        for key in ours:
            np.testing.assert_array_equal(ours[key], theirs[key], err_msg=f"{name}: {key}")
    resumed, straight = (json.loads((folder / "training.json").read_text()) for folder in (out, uninterrupted))
    assert resumed["curve"] == straight["curve"] and resumed["held_out"] == straight["held_out"]


def test_resume_refuses_other_settings(start, uninterrupted, tmp_path, capsys):
    out = tmp_path / "other"
    with pytest.MonkeyPatch.context() as patch:
        interrupt_at(patch, 5, KeyboardInterrupt())
        train(start, out, "--save-every", "2")
    other = [flag if flag != "3e-3" else "2e-3" for flag in RUN]
    assert main(["train", str(start), "--data", str(TRAIN_TEXT), "--eval", str(EVAL_TEXT), "--out", str(out),
                 *other, "--resume"]) == 1
    assert "lr=0.003" in capsys.readouterr().err


def test_a_kill_mid_write_leaves_the_last_checkpoint_and_nothing_that_looks_complete(start, tmp_path, monkeypatch):
    out = tmp_path / "killed"
    real, saves = trainer.write_checkpoint, []

    def dies_in_the_second_save(folder, shapes, dtype, tensors, *args):
        saves.append(folder)
        if len(saves) == 2:
            stream = iter(tensors)
            next(stream)  # a tensor or so in, the process is killed
            raise KeyboardInterrupt
        return real(folder, shapes, dtype, tensors, *args)

    monkeypatch.setattr(trainer, "write_checkpoint", dies_in_the_second_save)
    assert train(start, out, "--save-every", "3") == 130
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-000003", "training.json"]
    assert minimoe.load(out / "checkpoint-000003").config.num_experts == 7  # whole, and loads
    # a kill -9 cleans nothing up: a half-written folder under its hidden name is never taken for a checkpoint
    (out / ".checkpoint-000006.partial-99").mkdir()
    (out / ".checkpoint-000006.partial-99" / "config.json").write_text("{}")
    assert trainer.latest_checkpoint(out).name == "checkpoint-000003"


@pytest.mark.parametrize("bad", ["loss", "gradient"])
def test_a_non_finite_loss_or_gradient_stops_the_run_naming_the_step(start, tmp_path, monkeypatch, capsys, bad):
    out = tmp_path / "nan"

    def poisoned(result):
        loss, grads = result
        if bad == "loss":
            return math.nan, grads
        next(iter(grads.values()))[0] = np.inf
        return loss, grads

    interrupt_at(monkeypatch, 5, result=poisoned)
    kept = None

    real_save = trainer.save_checkpoint

    def remember(*args):
        nonlocal kept
        kept = real_save(*args)
        return kept

    monkeypatch.setattr(trainer, "save_checkpoint", remember)
    assert train(start, out, "--save-every", "2") == 1
    error = capsys.readouterr().err
    assert "step 5:" in error and ("loss is nan" if bad == "loss" else "norm is inf") in error
    assert "checkpoint-000004" in error and kept.name == "checkpoint-000004"
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-000004"]
    assert json.loads((kept / "trainer_state.json").read_text())["step"] == 4
    assert minimoe.load(kept).config.num_experts == 7


@pytest.mark.parametrize("flags, message", [
    (["--context", "2048"], "past the model's context of 1024"),
    (["--lr", "0"], "--lr must be a positive number"),
    (["--lr=-1e-3"], "--lr must be a positive number"),
    (["--tokens", "10"], "less than one step"),
])
def test_bad_settings_are_refused_before_anything_is_written(start, tmp_path, capsys, flags, message):
    out = tmp_path / "never"
    assert train(start, out, *flags) == 1
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_data_shorter_than_one_window_is_refused(start, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("x = 1\n")
    out = tmp_path / "never"
    assert main(["train", str(start), "--data", str(short), "--out", str(out), *RUN]) == 1
    assert "shorter than one window of --context 32" in capsys.readouterr().err
    assert not out.exists()


def test_a_non_empty_out_without_resume_is_left_as_it_was(start, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert train(start, out) == 1
    assert "not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"


def test_the_trainer_follows_the_torch_loop_it_replaces(start):
    """minimoe's trainer and the torch loop the project trained with before (transformers' model, AdamW betas
    (0.9, 0.95), weight decay 0.1, clipping to 1, the same schedule) on the same batches: the same losses and
    weights, to float32 rounding compounded over the steps."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from minimoe.train import parameters
    from minimoe.train.data import read_token_stream, training_batch
    from minimoe.train.optim import cosine_lr

    settings = trainer.Settings(tokens=6 * 2 * 32, context=32, batch=2, lr=3e-3, warmup=2)
    model = minimoe.load(start)
    stream = read_token_stream([TRAIN_TEXT], minimoe.load_tokenizer(start), 0)
    log = trainer.train(model, stream, settings, progress=False)

    theirs = transformers.AutoModelForCausalLM.from_pretrained(start, dtype=torch.float32)
    optimizer = torch.optim.AdamW(theirs.parameters(), lr=settings.lr, betas=settings.betas,
                                  weight_decay=settings.weight_decay)
    losses = []
    for step in range(settings.steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(settings.lr, step, settings.steps, settings.warmup)
        ids = torch.from_numpy(training_batch(stream, settings.context, settings.batch, settings.seed, step))
        loss = theirs(ids, labels=ids, output_router_logits=True).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), settings.clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    np.testing.assert_allclose(log["curve"]["loss"], losses, rtol=1e-4)
    # AdamW moves each weight by up to about lr a step, and divides tiny gradients by their own tiny scale, so
    # float32 differences in a gradient show most in the weights: measured 2e-5 at most (under 1% of one
    # step's move); a twentieth of a step's move is the bound.
    ours = parameters(model)
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.gate.weight",
                 "model.layers.1.mlp.experts.3.down_proj.weight", "model.norm.weight", "lm_head.weight"):
        expected = theirs.state_dict().get(name)
        if expected is None:  # transformers 5 holds a layer's experts fused: [E, H, I] for down_proj
            expected = theirs.state_dict()["model.layers.1.mlp.experts.down_proj"][3]
        np.testing.assert_allclose(ours[name], expected.numpy(), rtol=0, atol=settings.lr / 20, err_msg=name)
