"""The training loop behind ``minimoe train``: batches, AdamW, held-out loss, checkpoints that resume bit for bit.

    settings = Settings(tokens=1_000_000, context=256, batch=16, lr=2e-3, warmup=30)
    log = train(model, stream, settings, held_out=windows, out="runs/moe")   # the Python form
    minimoe train MODEL_DIR --data corpus/ --out runs/moe --tokens 1000000 --context 256 --batch 16 --lr 2e-3

One step: the batch of step ``s`` (:func:`minimoe.train.data.training_batch`, drawn from
``(seed, s)``), the loss and gradients (:func:`minimoe.train.loss_and_grads`: cross-entropy plus
``aux_loss_coef`` times the router's load-balancing loss, as transformers computes them), a check
that both are finite, clipping to a global norm of 1, the learning rate of the schedule
(:func:`minimoe.train.optim.cosine_lr`) and one AdamW update of the float32 parameters.  The
optimizer's settings are those the bundled models were trained with: betas (0.9, 0.95), weight
decay 0.1 on every tensor, the cosine ending at a tenth of the peak.

The output folder ``OUT``::

    OUT/checkpoint-000120/   the latest checkpoint: config.json, model.safetensors (float32),
                             tokenizer files, optimizer.npz (AdamW's moments), trainer_state.json
    OUT/training.json        settings, the training curve and the held-out curve so far
    OUT/config.json, model.safetensors, tokenizer ...   the final model, once training has finished

A checkpoint is written into a hidden folder beside it and renamed when whole (one ``rename``), so a
run killed while writing leaves the previous checkpoint as it was and nothing named
``checkpoint-*`` that is not complete; the older checkpoint is deleted only after the new one is
in place.  The final model's ``config.json`` is written last, so a folder without it is not a
model.  ``resume=True`` continues from the latest checkpoint: the same weights, moments, step and
(because batches are drawn from ``(seed, step)``) the same batches, so the result equals an
uninterrupted run's bit for bit.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from ..backend import to_numpy
from ..checkpoint.names import expected_shapes
from ..checkpoint.writer import SIDE_FILES, write_checkpoint
from ..config import read_config_file
from ..errors import MinimoeError
from ..files import write_text
from . import loss_and_grads, parameters
from .data import check_stream, fingerprint, held_out_windows, read_token_stream, training_batch
from .optim import AdamW, clip_grad_norm, cosine_lr

CHECKPOINT_PREFIX = "checkpoint-"
OPTIMIZER_FILE, STATE_FILE, LOG_FILE = "optimizer.npz", "trainer_state.json", "training.json"  # npz: arrays, no pickles


@dataclass(frozen=True)
class Settings:
    """What a run is: every field but ``save_every`` and ``eval_every`` must match to resume."""

    tokens: int  # training budget: steps = tokens // (batch * context)
    context: int  # tokens per window
    batch: int  # windows per step
    lr: float  # peak learning rate
    warmup: int = 0  # warm-up steps
    aux_loss_coef: float | None = None  # None: the config's router_aux_loss_coef
    seed: int = 0  # the batches' order
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    eps: float = 1e-8
    clip: float = 1.0  # global gradient norm
    floor: float = 0.1  # the schedule ends at floor * lr
    eval_windows: int = 32  # held-out windows per evaluation
    save_every: int = 0  # steps between checkpoints (0: only at the end)
    eval_every: int = 0  # steps between held-out evaluations (0: only at the start and the end)

    @property
    def steps(self) -> int:
        return self.tokens // (self.batch * self.context)

    def check(self, model_context: int) -> None:
        """MinimoeError for settings no run can use, naming the flag."""
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise MinimoeError(f"--lr must be a positive number, got {self.lr}")
        if self.context < 2:
            raise MinimoeError(f"--context must be at least 2 (a token and the next one), got {self.context}")
        if self.context > model_context:
            raise MinimoeError(f"--context {self.context} is past the model's context of {model_context} positions "
                               f"(max_position_embeddings)")
        if self.batch < 1:
            raise MinimoeError(f"--batch must be at least 1, got {self.batch}")
        if self.steps < 1:
            raise MinimoeError(f"--tokens {self.tokens:,} is less than one step of --batch {self.batch} x "
                               f"--context {self.context} = {self.batch * self.context:,} tokens")
        for flag, value in (("--warmup", self.warmup), ("--save-every", self.save_every),
                            ("--eval-every", self.eval_every)):
            if value < 0:
                raise MinimoeError(f"{flag} must not be negative, got {value}")

    def identity(self) -> dict:
        """The fields that make two runs the same run (``save_every`` and ``eval_every`` are not among them)."""
        fields = asdict(self)
        fields.pop("save_every")
        fields.pop("eval_every")
        fields["betas"] = list(self.betas)
        return fields


def held_out_loss(model, windows: np.ndarray, chunk: int = 8) -> float:
    """Mean next-token cross-entropy (nats) over ``windows`` ``[n, T]``, as transformers' ``labels=ids`` loss."""
    total, count = 0.0, 0
    for first in range(0, len(windows), chunk):
        ids = windows[first : first + chunk]
        logits = to_numpy(model.forward(ids))[:, :-1]  # [b, T-1, V]: position t predicts ids[:, t + 1]
        peak = logits.max(axis=-1, keepdims=True)
        log_norm = np.log(np.exp(logits - peak).sum(axis=-1)) + peak[..., 0]  # [b, T-1]
        target = np.take_along_axis(logits, ids[:, 1:, None], axis=-1)[..., 0]
        total += float((log_norm - target).sum(dtype=np.float64))
        count += target.size
    return total / count


def train(model, stream: np.ndarray, settings: Settings, *, held_out: np.ndarray | None = None,
          out: str | Path | None = None, resume: bool = False, eval_steps: Iterable[int] | None = None,
          on_eval: Callable[[int, float], None] | None = None, progress: bool = True) -> dict:
    """Train ``model`` (what :func:`minimoe.load` returns) on ``stream`` ``[N]`` token ids; returns the log.

    ``held_out`` ``[n, T]`` windows are scored before the first step, every ``settings.eval_every``
    steps and after the last (or at ``eval_steps``, if given); ``on_eval(tokens_seen, loss)`` sees each
    result.  With ``out``, checkpoints and the final model are written there (see the module
    docstring); ``resume`` continues from its latest checkpoint.  The log is what ``training.json`` holds.
    """
    settings.check(model.config.max_position_embeddings)
    check_stream(stream, settings.context, "the training data")
    steps = settings.steps
    out = None if out is None else Path(out)
    if out is not None:
        prepare_output(out, resume)
    params = parameters(model)
    optimizer = AdamW(settings.lr, settings.betas, settings.eps, settings.weight_decay)
    data_id = fingerprint(stream)
    log = {"settings": {**settings.identity(), "steps": steps, "save_every": settings.save_every,
                        "eval_every": settings.eval_every},
           "data": data_id, "curve": {"step": [], "loss": [], "lr": [], "grad_norm": []},
           "held_out": {"step": [], "tokens": [], "loss": []}}
    checkpoint = latest_checkpoint(out) if out is not None and resume else None
    if checkpoint is not None:
        log = restore(checkpoint, params, optimizer, settings, data_id, log)
    first = optimizer.steps
    wanted = set(eval_steps) if eval_steps is not None else evaluation_steps(steps, settings.eval_every)

    def evaluate(step: int) -> None:
        loss = held_out_loss(model, held_out)
        seen = step * settings.batch * settings.context
        for key, value in (("step", step), ("tokens", seen), ("loss", round(loss, 6))):
            log["held_out"][key].append(value)
        if on_eval is not None:
            on_eval(seen, loss)

    if held_out is not None and first == 0:
        evaluate(0)
    bar = _progress_bar(steps, first, progress)
    started, last_good = time.perf_counter(), checkpoint
    for step in range(first, steps):
        optimizer.lr = cosine_lr(settings.lr, step, steps, settings.warmup, settings.floor)
        ids = training_batch(stream, settings.context, settings.batch, settings.seed, step)
        loss, grads = loss_and_grads(model, ids, aux_loss_coef=settings.aux_loss_coef)
        norm = clip_grad_norm(grads, settings.clip)
        if not (math.isfinite(loss) and math.isfinite(norm)):
            bar.close()
            raise MinimoeError(_not_finite(step + 1, float(loss), norm, last_good))
        optimizer.step(params, grads)
        for key, value in (("step", step + 1), ("loss", round(float(loss), 6)), ("lr", optimizer.lr),
                           ("grad_norm", round(norm, 6))):
            log["curve"][key].append(value)
        if held_out is not None and step + 1 in wanted:
            evaluate(step + 1)
        if out is not None and (step + 1 == steps or settings.save_every and (step + 1) % settings.save_every == 0):
            last_good = save_checkpoint(out, step + 1, model, params, optimizer, log)
        rate = (step + 1 - first) * settings.batch * settings.context / (time.perf_counter() - started)
        bar.set_postfix(loss=f"{float(loss):.3f}", tok_s=f"{rate:,.0f}", refresh=False)
        bar.update(1)
    bar.close()
    log["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    if out is not None:
        export_final(out, latest_checkpoint(out))
        write_text(out / LOG_FILE, json.dumps(log, indent=1) + "\n")
    return log


def train_folder(model_dir: str | Path, data: Iterable[str | Path], out: str | Path, settings: Settings, *,
                 eval_paths: Iterable[str | Path] = (), resume: bool = False, progress: bool = True) -> dict:
    """``minimoe train``: the checkpoint at ``model_dir`` trained on the text under ``data``, written to ``out``.

    Every check that can fail (the settings, the output folder, the data's length) runs before
    anything is written.
    """
    from ..config import ModelConfig
    from ..loading import load
    from ..tokenizer import load_tokenizer

    settings.check(ModelConfig.from_file(model_dir).max_position_embeddings)
    out = Path(out)
    check_output(out, resume)
    model, tokenizer = load(model_dir), load_tokenizer(model_dir)
    eos = end_of_text_id(tokenizer, model)
    stream = read_token_stream(data, tokenizer, eos)
    check_stream(stream, settings.context, f"--data {' '.join(map(str, data))}")
    held = None
    if eval_paths:
        eval_stream = read_token_stream(eval_paths, tokenizer, eos)
        check_stream(eval_stream, settings.context, f"--eval {' '.join(map(str, eval_paths))}")
        held = held_out_windows(eval_stream, settings.context, settings.eval_windows)
    return train(model, stream, settings, held_out=held, out=out, resume=resume, progress=progress)


def end_of_text_id(tokenizer, model) -> int:
    """The id that ends each document: ``<|endoftext|>`` where the vocabulary has it, else the model's first eos id."""
    eos = tokenizer.token_to_id("<|endoftext|>")
    if eos is None:
        if not model.eos_token_ids:
            raise MinimoeError("the tokenizer has no <|endoftext|> and the model no eos_token_id: "
                               "no id to put between documents")
        eos = model.eos_token_ids[0]
    return eos


def evaluation_steps(steps: int, every: int) -> set[int]:
    """0, every ``every`` steps, and the last step."""
    return {0, steps, *(range(every, steps, every) if every else ())}


def evenly_spaced(steps: int, count: int) -> set[int]:
    """0 and ``count`` evaluations evenly spaced over ``steps`` (the last at ``steps``), as the upcycling experiment spaces them."""
    count = min(count, steps)
    return {0, *(round(steps * (i + 1) / count) for i in range(count))}


def _progress_bar(steps: int, first: int, show: bool):
    from tqdm import tqdm

    return tqdm(total=steps, initial=first, unit="step", desc="training", disable=None if show else True,
                dynamic_ncols=True)


def _not_finite(step: int, loss: float, norm: float, last_good: Path | None) -> str:
    what = f"the loss is {loss}" if not math.isfinite(loss) else f"the gradient's norm is {norm}"
    kept = (f"the last good checkpoint, {last_good}, is intact" if last_good is not None
            else "no checkpoint had been written yet")
    return (f"step {step}: {what}; training stopped before updating the weights ({kept}). "
            f"A smaller --lr or a longer --warmup usually avoids this")


# --- the output folder -------------------------------------------------------------------------------

def check_output(out: Path, resume: bool) -> None:
    """MinimoeError for a file, or for a non-empty folder without ``resume``: nothing is ever written over."""
    if out.exists() and not out.is_dir():
        raise MinimoeError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not resume:
        raise MinimoeError(f"{out}: folder exists and is not empty; pass --resume to continue the run in it, "
                           f"or choose another --out")


def prepare_output(out: Path, resume: bool) -> None:
    """:func:`check_output`, then make the folder and clear the partial checkpoints a killed run left."""
    check_output(out, resume)
    out.mkdir(parents=True, exist_ok=True)
    for partial in out.glob(f".{CHECKPOINT_PREFIX}*.partial-*"):
        shutil.rmtree(partial, ignore_errors=True)


def checkpoint_step(folder: Path) -> int:
    return int(folder.name.removeprefix(CHECKPOINT_PREFIX))


def latest_checkpoint(out: Path) -> Path | None:
    """The complete checkpoint of the highest step in ``out`` (only whole ones carry the name), or None."""
    found = [p for p in out.glob(f"{CHECKPOINT_PREFIX}*")
             if p.is_dir() and p.name.removeprefix(CHECKPOINT_PREFIX).isdigit()]
    return max(found, key=checkpoint_step, default=None)


def save_checkpoint(out: Path, step: int, model, params: dict, optimizer: AdamW, log: dict) -> Path:
    """Write checkpoint ``step`` whole under a hidden name, rename it into place, then drop the older ones."""
    source = model.checkpoint.folder
    target = out / f"{CHECKPOINT_PREFIX}{step:06d}"
    staging = out / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        shapes = expected_shapes(model.config)
        write_checkpoint(staging, shapes, np.float32, ((name, params[name]) for name in shapes))
        np.savez(staging / OPTIMIZER_FILE, **optimizer.state())
        for name in SIDE_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, staging / name)
        write_text(staging / STATE_FILE, json.dumps({"step": step, **log}, indent=1) + "\n")
        write_text(staging / "config.json", json.dumps(float32_config(source), indent=2) + "\n")
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for older in out.glob(f"{CHECKPOINT_PREFIX}*"):
        if older != target and older.is_dir() and older.name.removeprefix(CHECKPOINT_PREFIX).isdigit():
            shutil.rmtree(older)
    write_text(out / LOG_FILE, json.dumps(log, indent=1) + "\n")
    return target


def float32_config(source: Path) -> dict:
    """The source's config.json, saying the weights are float32 (so transformers loads them as such)."""
    raw, _ = read_config_file(source)
    raw = dict(raw)
    for key in ("dtype", "torch_dtype"):
        if key in raw:
            raw[key] = "float32"
    return raw


def restore(checkpoint: Path, params: dict, optimizer: AdamW, settings: Settings, data_id: str, log: dict) -> dict:
    """Load a checkpoint's weights into ``params`` and its moments into ``optimizer``; returns its log."""
    from ..checkpoint.reader import Checkpoint

    state = json.loads((checkpoint / STATE_FILE).read_text())
    saved = state["settings"]
    for key, value in settings.identity().items():
        if saved.get(key) != value:
            raise MinimoeError(f"{checkpoint}: was trained with {key}={saved.get(key)!r}, this run asks for "
                               f"{value!r}; resume with the same settings, or start a new --out")
    if state["data"] != data_id:
        raise MinimoeError(f"{checkpoint}: was trained on other data (tokens:checksum {state['data']}, "
                           f"now {data_id}); resume with the same --data")
    weights = Checkpoint(checkpoint)
    for name, param in params.items():
        param[...] = weights.array(name)
    with np.load(checkpoint / OPTIMIZER_FILE, allow_pickle=False) as saved_state:
        optimizer.load_state(dict(saved_state))
    if optimizer.steps != state["step"]:
        raise MinimoeError(f"{checkpoint}: the optimizer has taken {optimizer.steps} steps, the state says {state['step']}")
    state.pop("step")
    state["settings"].update(save_every=settings.save_every, eval_every=settings.eval_every)
    return state


def export_final(out: Path, checkpoint: Path) -> None:
    """The final checkpoint's model files into ``out`` itself, config.json last (without it the folder is no model)."""
    files = [p for p in checkpoint.iterdir() if p.name not in (OPTIMIZER_FILE, STATE_FILE, "config.json")]
    for path in files:
        shutil.copyfile(path, out / f".{path.name}.partial")
        os.replace(out / f".{path.name}.partial", out / path.name)
    shutil.copyfile(checkpoint / "config.json", out / ".config.json.partial")
    os.replace(out / ".config.json.partial", out / "config.json")


__all__ = ["Settings", "train", "train_folder", "held_out_loss", "evaluation_steps", "evenly_spaced", "latest_checkpoint"]
