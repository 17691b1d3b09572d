#!/usr/bin/env python
"""Tokens/s of one training step -- forward, backward, clipping, AdamW -- minimoe against torch float32.

    python scripts/bench_train.py                        # the bundled MoE, batch 16 x 256, 5 steps each
    python scripts/bench_train.py --batch 4 --context 128 --steps 3 --json out.json

Both engines train the same checkpoint (``minimoe.default_model_path()``, or ``--model``) on the same
random batch: minimoe with :func:`minimoe.train.loss_and_grads`, :func:`~minimoe.train.optim.clip_grad_norm`
and :class:`~minimoe.train.optim.AdamW`; torch with transformers' ``Qwen2MoeForCausalLM`` loaded from the
same folder in float32 (``output_router_logits=True``, so both add the load-balancing loss),
``clip_grad_norm_`` and ``torch.optim.AdamW``.  Each engine lives in its own child process (so its peak
memory is its own, and minimoe's never imports torch); the parent makes them take turns, one step each,
so both see the same machine load.  Reported: each engine's median step time and tokens/s, the ratio,
and each child's peak resident memory (``ru_maxrss``: the interpreter and libraries included) and its
growth over the moment after loading.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import time
from pathlib import Path

import numpy as np


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def minimoe_engine(model_path: str, threads: int):
    """A step function for minimoe: fwd + bwd + clip + AdamW on ``ids``."""
    import minimoe
    import minimoe.backend
    from minimoe.train import loss_and_grads, parameters
    from minimoe.train.optim import AdamW, clip_grad_norm

    minimoe.backend.NUM_THREADS = threads
    model = minimoe.load(model_path)
    params = parameters(model)
    optimizer = AdamW(lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)

    def step(ids: np.ndarray) -> float:
        loss, grads = loss_and_grads(model, ids)
        clip_grad_norm(grads, 1.0)
        optimizer.step(params, grads)
        return loss

    return step


def torch_engine(model_path: str, threads: int):
    """The same step in torch float32 with transformers' model."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    router = {"output_router_logits": True} if hasattr(model.config, "num_experts") else {}

    def step(ids: np.ndarray) -> float:
        batch = torch.from_numpy(ids)
        loss = model(batch, labels=batch, **router).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


ENGINES = {"minimoe": minimoe_engine, "torch": torch_engine}


def child(engine: str, model_path: str, threads: int, connection) -> None:
    """Load the engine, report memory, then run one step per message until told to stop."""
    step = ENGINES[engine](model_path, threads)
    connection.send({"loaded_rss_mb": peak_rss_mb()})
    while (ids := connection.recv()) is not None:
        started = time.perf_counter()
        loss = step(ids)
        connection.send({"seconds": time.perf_counter() - started, "loss": float(loss)})
    connection.send({"peak_rss_mb": peak_rss_mb()})


def main(argv: list[str] | None = None) -> dict:
    import minimoe

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(minimoe.default_model_path()))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per engine, after one warm-up step")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    vocab = minimoe.ModelConfig.from_file(args.model).vocab_size
    ids = np.random.default_rng(0).integers(0, vocab, (args.batch, args.context))
    context = mp.get_context("spawn")
    pipes, processes, results = {}, {}, {}
    for engine in ENGINES:
        ours, theirs = context.Pipe()
        processes[engine] = context.Process(target=child, args=(engine, args.model, args.threads, theirs))
        processes[engine].start()
        pipes[engine] = ours
        results[engine] = {"seconds": [], "loss": [], **ours.recv()}  # loaded one at a time
    for round_ in range(args.steps + 1):  # round 0 warms up
        for engine in ENGINES if round_ % 2 == 0 else reversed(list(ENGINES)):  # alternate who goes first
            pipes[engine].send(ids)
            reply = pipes[engine].recv()
            if round_ > 0:
                results[engine]["seconds"].append(reply["seconds"])
            results[engine]["loss"].append(reply["loss"])
    tokens = args.batch * args.context
    for engine in ENGINES:
        pipes[engine].send(None)
        results[engine].update(pipes[engine].recv())
        processes[engine].join()
        seconds = statistics.median(results[engine]["seconds"])
        results[engine].update(median_seconds=round(seconds, 3), tokens_per_second=round(tokens / seconds, 1))
    summary = {"model": Path(args.model).name, "batch": args.batch, "context": args.context, "threads": args.threads,
               "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
               "engines": results,
               "ratio": round(results["minimoe"]["tokens_per_second"] / results["torch"]["tokens_per_second"], 3)}
    for engine, row in results.items():
        print(f"{engine:8s} {row['median_seconds']:7.2f} s/step  {row['tokens_per_second']:8,.0f} tokens/s  "
              f"peak {row['peak_rss_mb']:6,.0f} MB (+{row['peak_rss_mb'] - row['loaded_rss_mb']:,.0f} MB over "
              f"loaded)  first loss {row['loss'][0]:.4f}")
    print(f"minimoe / torch: {summary['ratio']:.2f}x tokens/s  ({args.batch} x {args.context} tokens, "
          f"{args.threads} threads, median of {args.steps} interleaved steps)")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    return summary


if __name__ == "__main__":
    main()
