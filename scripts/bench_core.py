#!/usr/bin/env python
"""Benchmark minimoe against transformers on one checkpoint: prefill, decode, memory.

Each engine runs in its own process (so neither's memory or threads affect the
other); this process samples each child's ``RssAnon`` (anonymous memory: what the
process allocated itself, not the page cache behind memory-mapped files) every
10 ms and keeps the peak.  Each worker loads the checkpoint, then runs the same
job ``1 + --repeat`` times -- a prefill of ``--prefill`` random tokens and ``--decode``
greedy steps through its KV cache -- and reports the first run ("cold": first touch
of the weights) and the median of the others ("warm"; this machine is a shared VM
whose speed drifts by 10-15% between runs, so one warm run is not enough).  transformers runs in bf16 (the checkpoint's dtype), minimoe
in float32 over its bf16 weights.

    python scripts/make_real_shape_checkpoint.py /tmp/moe-2layer --layers 2
    python scripts/bench_core.py /tmp/moe-2layer --json bench.json

This is a benchmark, not a test: it reports ratios measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np


# --- workers (run in a child process) -----------------------------------------------------

def summarise(jobs: list[dict]) -> dict:
    """First run as "cold", the median of the rest as "warm"."""
    warm = {key: float(np.median([job[key] for job in jobs[1:]])) for key in jobs[0]}
    return {"cold": jobs[0], "warm": warm}


def run_minimoe(path: Path, prompt: np.ndarray, decode: int, repeat: int) -> dict:
    import minimoe

    start = time.perf_counter()
    model = minimoe.load(path)
    result = {"load_s": time.perf_counter() - start}

    def job() -> dict:
        cache = model.new_cache()
        t0 = time.perf_counter()
        logits = model.forward(prompt, cache=cache)
        t1 = time.perf_counter()
        for _ in range(decode):
            logits = model.forward([int(logits[-1].argmax())], cache=cache)
        t2 = time.perf_counter()
        return {"prefill_s": t1 - t0, "decode_s": t2 - t1}

    return result | summarise([job() for _ in range(1 + repeat)])


def run_transformers(path: Path, prompt: np.ndarray, decode: int, repeat: int) -> dict:
    import inspect

    import torch
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    result = {"load_s": time.perf_counter() - start, "threads": torch.get_num_threads()}
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    ids = torch.from_numpy(prompt)[None]

    def job() -> dict:
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = model(ids, use_cache=True)
            t1 = time.perf_counter()
            for _ in range(decode):
                token = out.logits[:, -1].argmax(-1, keepdim=True)
                out = model(token, use_cache=True, **{cache_arg: getattr(out, cache_arg)})
            t2 = time.perf_counter()
        return {"prefill_s": t1 - t0, "decode_s": t2 - t1}

    return result | summarise([job() for _ in range(1 + repeat)])


WORKERS = {"minimoe": run_minimoe, "transformers": run_transformers}


# --- the parent: spawn, sample memory, report ---------------------------------------------

def rss_anon_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def measure(engine: str, args: argparse.Namespace) -> dict:
    """Run one engine in a child process; return its timings plus peak RssAnon."""
    command = [sys.executable, __file__, str(args.checkpoint), "--worker", engine,
               "--prefill", str(args.prefill), "--decode", str(args.decode), "--seed", str(args.seed),
               "--repeat", str(args.repeat)]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            value = rss_anon_bytes(child.pid)
            if value:
                peak = max(peak, value)
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = child.communicate()
    done.set()
    sampler.join()
    if child.returncode != 0:
        reason = "out of memory (killed)" if child.returncode in (-9, 137) else stderr.strip().splitlines()[-1:]
        return {"engine": engine, "error": f"exit {child.returncode}: {reason}"}
    result = json.loads(stdout.strip().splitlines()[-1])
    return {"engine": engine, "peak_rss_anon_gb": peak / 1e9} | result


def rates(result: dict, args: argparse.Namespace, run: str) -> tuple[float, float]:
    timing = result[run]
    return args.prefill / timing["prefill_s"], args.decode / timing["decode_s"]


def report(results: list[dict], args: argparse.Namespace) -> None:
    print(f"\n{args.checkpoint}: prefill {args.prefill} tokens, then {args.decode} decode steps (batch 1); "
          f"warm = median of {args.repeat} runs")
    print(f"{'engine':14s} {'run':5s} {'load s':>7s} {'prefill tok/s':>14s} {'decode tok/s':>13s} {'peak RssAnon':>13s}")
    for result in results:
        if "error" in result:
            print(f"{result['engine']:14s} failed: {result['error']}")
            continue
        for run in ("cold", "warm"):
            prefill, decode = rates(result, args, run)
            print(f"{result['engine']:14s} {run:5s} {result['load_s']:7.2f} {prefill:14.1f} {decode:13.2f} "
                  f"{result['peak_rss_anon_gb']:11.2f} GB")
    ours, theirs = (next((r for r in results if r["engine"] == e and "error" not in r), None) for e in WORKERS)
    if ours and theirs:
        (op, od), (tp, td) = rates(ours, args, "warm"), rates(theirs, args, "warm")
        print(f"\nminimoe / transformers (warm): prefill {op / tp:.2f}x, decode {od / td:.2f}x, "
              f"peak RssAnon {ours['peak_rss_anon_gb'] / theirs['peak_rss_anon_gb']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--prefill", type=int, default=64)
    parser.add_argument("--decode", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3, help="warm runs after the cold one (median reported)")
    parser.add_argument("--engines", nargs="+", default=list(WORKERS), choices=list(WORKERS))
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        vocab = json.loads((args.checkpoint / "config.json").read_text())["vocab_size"]
        prompt = np.random.default_rng(args.seed).integers(0, vocab, args.prefill)
        print(json.dumps(WORKERS[args.worker](args.checkpoint, prompt, args.decode, args.repeat)))
        return

    results = [measure(engine, args) for engine in args.engines]
    report(results, args)
    if args.json:
        args.json.write_text(json.dumps({"prefill": args.prefill, "decode": args.decode, "results": results}, indent=2))


if __name__ == "__main__":
    main()
