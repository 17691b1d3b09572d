#!/usr/bin/env python
"""Training-step speed: minimoe's training step against torch's, on the same model and batch.

    PYTHONPATH=. python scripts/bench_train.py [--model DIR] [--batch 16] [--context 256] [--repeats 5]
                                               [--forward-backward-only]

A step is the forward, the backward, clipping to a global norm of 1 and an AdamW update (betas 0.9, 0.95,
weight decay 0.1: what minimoe's trainer does); ``--forward-backward-only`` leaves out the last two.

Both sides compute in float32 from the same checkpoint (minimoe: ``minimoe.train.loss_and_grads`` on the
numpy backend; torch: transformers' model, upcast to float32, ``loss.backward()`` with
``output_router_logits=True``), on the same random batch, with the same number of threads (the CPUs this
process may use, or ``MINIMOE_NUM_THREADS``).  Steps alternate -- minimoe, torch, minimoe, ... -- so that a machine whose speed drifts
(other jobs, turbo, heat) slows both alike; each side's median step gives its tokens/s, and their ratio is
the figure.  Peak memory is each side's own process (one started per side): the largest resident set of a
process that loads the model and runs two steps, and what a step adds to it (model loaded and warmed up).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import minimoe
from minimoe import train
from minimoe.backend import NUM_THREADS
from minimoe.files import write_text

THREADS = NUM_THREADS  # minimoe's threads (MINIMOE_NUM_THREADS, default all CPUs); torch gets as many


def batch_of(config, batch: int, context: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, config.vocab_size, (batch, context))


OPTIMIZER = dict(lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)  # a small lr: the weights stay near the checkpoint's


def minimoe_side(folder: Path, optimize: bool = True):
    """(step(ids) -> loss, config): minimoe's forward and backward on the numpy backend, then clip and AdamW."""
    from minimoe.train.optim import AdamW, clip_grad_norm

    model = minimoe.load(folder)
    params = train.parameters(model)  # the float32 weights, made once (not timed)
    optimizer = AdamW(**OPTIMIZER)

    def step(ids):
        loss, grads = train.loss_and_grads(model, ids)
        if optimize:
            clip_grad_norm(grads, 1.0)
            optimizer.step(params, grads)
        return loss

    return step, model.config


def torch_side(folder: Path, optimize: bool = True):
    """(step(ids) -> loss, model): transformers' float32 model, loss.backward(), clip_grad_norm_ and
    torch.optim.AdamW, gradients cleared after."""
    import torch
    import transformers

    torch.set_num_threads(THREADS)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    moe = getattr(model.config, "num_experts", 0) or getattr(model.config, "num_local_experts", 0)
    optimizer = torch.optim.AdamW(model.parameters(), **OPTIMIZER)

    def step(ids):
        ids = torch.from_numpy(ids)
        loss = model(ids, labels=ids, **({"output_router_logits": True} if moe else {})).loss
        loss.backward()
        if optimize:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
        model.zero_grad(set_to_none=True)
        return loss.item()

    return step, model


def timed(step, ids) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds of all this process's threads, loss) of one step."""
    start, cpu = time.perf_counter(), time.process_time()
    loss = step(ids)
    return time.perf_counter() - start, time.process_time() - cpu, loss


def peak_memory(side: str, folder: Path, batch: int, context: int, seed: int, optimize: bool) -> dict:
    """Peak resident memory of a fresh process running ``side``: after loading and one step, and after a second."""
    command = [sys.executable, __file__, "--model", str(folder), "--batch", str(batch), "--context", str(context),
               "--seed", str(seed), "--memory-of", side, *([] if optimize else ["--forward-backward-only"])]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.splitlines()[-1])


def measure_memory(side: str, folder: Path, batch: int, context: int, seed: int, optimize: bool) -> None:
    """In a child process: print the peak resident set (MB) after loading, and after two steps."""
    def peak_mb() -> float:  # the process's high-water mark (ru_maxrss would carry the parent's over exec)
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(line for line in status if line.startswith("VmHWM:")).split()[1]) / 1024  # kB

    step, _ = minimoe_side(folder, optimize) if side == "minimoe" else torch_side(folder, optimize)
    loaded = peak_mb()
    ids = batch_of(minimoe.load(folder).config, batch, context, seed)
    step(ids)
    step(ids)
    print(json.dumps({"loaded_mb": loaded, "peak_mb": peak_mb()}))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path(minimoe.default_model_path()))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5, help="timed steps of each side (after one warm-up)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    parser.add_argument("--forward-backward-only", action="store_true", help="no clipping, no AdamW update")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--memory-of", choices=("minimoe", "torch"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    optimize = not args.forward_backward_only
    if args.memory_of:
        measure_memory(args.memory_of, args.model, args.batch, args.context, args.seed, optimize)
        return 0

    ours, config = minimoe_side(args.model, optimize)
    theirs, _ = torch_side(args.model, optimize)
    ids = batch_of(config, args.batch, args.context, args.seed)
    tokens = ids.size
    times, cpu_times = {"minimoe": [], "torch": []}, {"minimoe": [], "torch": []}
    losses = {}
    for repeat in range(args.repeats + 1):  # the first round warms both up and is not counted
        for side, step in (("minimoe", ours), ("torch", theirs)):
            seconds, cpu_seconds, losses[side] = timed(step, ids)
            if repeat:
                times[side].append(seconds)
                cpu_times[side].append(cpu_seconds)
        print(f"round {repeat}: " + ", ".join(f"{side} {times[side][-1]:.3f} s" for side in times) if repeat
              else "warm-up done", flush=True)
    result = {
        "model": str(args.model), "batch": args.batch, "context": args.context, "tokens_per_step": tokens,
        "threads": THREADS, "repeats": args.repeats, "losses": losses,
        "step": "forward + backward + clip + AdamW" if optimize else "forward + backward",
        "step_seconds": times, "step_cpu_seconds": cpu_times,
        "tokens_per_s": {side: tokens / statistics.median(seconds) for side, seconds in times.items()},
    }
    result["ratio"] = result["tokens_per_s"]["minimoe"] / result["tokens_per_s"]["torch"]
    if not args.no_memory:
        result["memory_mb"] = {side: peak_memory(side, args.model, args.batch, args.context, args.seed, optimize)
                               for side in ("minimoe", "torch")}
    result["load_average"] = os.getloadavg()
    print(f"{result['step']}, batch {args.batch} x {args.context} ({tokens} tokens), "
          f"{THREADS} thread{'s' if THREADS > 1 else ''} each, "
          f"median of {args.repeats}; load average {result['load_average'][0]:.1f} (other jobs slow both sides):")
    for side in ("minimoe", "torch"):
        memory = result.get("memory_mb", {}).get(side)
        extra = f", peak memory {memory['peak_mb']:,.0f} MB ({memory['loaded_mb']:,.0f} MB loaded)" if memory else ""
        print(f"  {side:8s} {result['tokens_per_s'][side]:9,.0f} tokens/s, "
              f"{statistics.median(cpu_times[side]):.2f} CPU s a step  (loss {losses[side]:.5f}){extra}")
    print(f"  minimoe / torch: {result['ratio']:.2f}x")
    if args.json:
        write_text(args.json, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
