"""``minimoe bench``: prefill, decode, time to first token, load time and memory, against transformers.

Each engine runs in its own child process (``python -m minimoe.bench worker``), one
after the other, so neither's memory or threads affect the other.  The parent hands
the child its job as JSON on stdin, then samples the child's ``RssAnon`` every 10 ms
(anonymous memory: what the process allocated itself, not the page cache behind
memory-mapped files) and keeps the peak.  It also acts as a watchdog: a child about to
exhaust the machine's memory (``MemAvailable`` under 1 GB) is killed and reported as
"out of memory", before the kernel's OOM killer or swapping takes the machine down.

A job is: load the checkpoint, then ``1 + repeat`` runs of "prefill a prompt of random
token ids (the same ids, from a seed, for both engines), then greedy-decode through the
KV cache until ``new_tokens`` new tokens exist".  The first run is reported as "cold"
(first touch of the weights), the median of the others as "warm": the shared VM this
was written on drifts by 10-15% between runs, so one warm run is not enough.

Timings per run: ``prefill_s`` (the forward over the prompt), ``ttft_s`` (time to first
token: that forward plus choosing the first new token) and ``decode_s`` (the
``new_tokens - 1`` forwards that produce the other tokens).  minimoe runs in float32 over
its bf16 weights; transformers in bf16 (the checkpoint's dtype), eager attention.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..config import ModelConfig
from ..errors import MinimoeError

SAMPLE_INTERVAL_S = 0.01
RESERVE_BYTES = 1 << 30  # the watchdog stops a child when the machine has less than this left
GB = 1e9
INSTALL_HINT = "pip install -e '.[test]' installs torch and transformers"

# Statuses a child ends with.  "ok" and "out of memory" are results; the others mean the engine could not be run.
OK, OUT_OF_MEMORY, NOT_INSTALLED, FAILED = "ok", "out of memory", "not installed", "failed"


@dataclass
class Job:
    """What a worker runs; sent to the child as JSON."""

    engine: str
    model: str
    prompt: list[int]
    new_tokens: int
    repeat: int
    threads: int | None = None


def progress(engine: str, message: str) -> None:
    """A progress line on stderr (the children's stderr is the parent's)."""
    print(f"minimoe bench [{engine}]: {message}", file=sys.stderr, flush=True)


# --- the workers (run in a child process) -------------------------------------------------

class MinimoeEngine:
    """minimoe behind the calls a run needs: load, a fresh cache, a forward returning the last logits."""

    def __init__(self, job: Job):
        from .. import backend

        self.job, self.threads = job, backend.NUM_THREADS

    def load(self) -> None:
        from ..loading import load

        self.model = load(self.job.model)

    def reset(self) -> None:
        self.cache = self.model.new_cache()

    def forward(self, ids: list[int]) -> np.ndarray:
        return self.model.forward(ids, cache=self.cache)[-1]


REFERENCE = Path(__file__).resolve().parent.parent.parent / "scripts" / "transformers_reference.py"


def reference_module():
    """``scripts/transformers_reference.py``: the transformers side of a comparison, loaded from the checkout.

    It imports torch and transformers (the test extra), which the package itself never does.
    ImportError when they are missing; MinimoeError outside a checkout of the repository.
    """
    import importlib.util

    if not REFERENCE.exists():
        raise MinimoeError(f"comparing with transformers needs a checkout of minimoe's repository ({REFERENCE} "
                           "is missing) and its test extra")
    spec = importlib.util.spec_from_file_location("transformers_reference", REFERENCE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ENGINES = {"minimoe": MinimoeEngine, "transformers": lambda job: reference_module().TransformersEngine(job)}


def disk_read_bytes() -> int:
    """Bytes this process has had read from storage (``read_bytes`` of /proc/self/io; 0 where there is none).

    Reading a memory-mapped checkpoint counts here when its pages are not in the page
    cache: the figure that says a model is larger than the machine's memory.
    """
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def timed_run(engine, prompt: list[int], new_tokens: int) -> dict:
    """One prefill + greedy decode; the seconds each part took, the tokens chosen, the bytes read from disk."""
    engine.reset()
    read_before = disk_read_bytes()
    t0 = time.perf_counter()
    logits = engine.forward(prompt)
    t1 = time.perf_counter()
    tokens = [int(logits.argmax())]
    t2 = time.perf_counter()
    for _ in range(new_tokens - 1):
        tokens.append(int(engine.forward(tokens[-1:]).argmax()))
    t3 = time.perf_counter()
    return {"prefill_s": t1 - t0, "ttft_s": t2 - t0, "decode_s": t3 - t2, "tokens": tokens,
            "disk_read_bytes": disk_read_bytes() - read_before}


def is_out_of_memory(exc: BaseException) -> bool:
    """A MemoryError, or PyTorch's CPU allocator failing (a RuntimeError)."""
    return isinstance(exc, MemoryError) or "can't allocate memory" in str(exc)


def run_job(job: Job) -> dict:
    """Load the engine and time ``1 + repeat`` runs; never raises for the failures the report names."""
    try:
        engine = ENGINES[job.engine](job)
        progress(job.engine, f"loading {job.model}")
        start = time.perf_counter()
        engine.load()
        load_s = time.perf_counter() - start
        runs = []
        for i in range(1 + job.repeat):
            progress(job.engine, f"run {i + 1} of {1 + job.repeat} ({'cold' if i == 0 else 'warm'})")
            runs.append(timed_run(engine, job.prompt, job.new_tokens))
    except ImportError as exc:
        return {"status": NOT_INSTALLED, "message": str(exc)}
    except MinimoeError as exc:
        return {"status": FAILED, "message": str(exc)}
    except (MemoryError, RuntimeError) as exc:
        if not is_out_of_memory(exc):
            raise
        return {"status": OUT_OF_MEMORY, "message": str(exc)}
    return {"status": OK, "load_s": load_s, "threads": engine.threads, "runs": runs}


def worker_main() -> None:
    """``python -m minimoe.bench worker``: a Job as JSON on stdin, the result as the last line of stdout."""
    job = Job(**json.load(sys.stdin))
    print(json.dumps(run_job(job)), flush=True)


# --- the parent: spawn, watch memory, summarise ---------------------------------------------

def proc_field_bytes(path: str, field: str) -> int | None:
    """A ``kB`` field of a /proc file (``RssAnon`` of /proc/PID/status, ``MemAvailable`` of /proc/meminfo)."""
    try:
        with open(path) as lines:
            for line in lines:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


class MemoryWatch:
    """Samples a child's RssAnon; says when it must be stopped to leave the machine ``RESERVE_BYTES``.

    ``limit_bytes`` caps the child further (the hidden ``--memory-limit-gb``, for tests).
    """

    def __init__(self, pid: int, limit_bytes: int | None = None):
        self.pid, self.limit_bytes = pid, limit_bytes
        self.peak = 0
        self.available: int | None = None  # what the child could have had, when it was stopped

    def over_limit(self) -> bool:
        rss = proc_field_bytes(f"/proc/{self.pid}/status", "RssAnon")
        if rss is None:
            return False
        self.peak = max(self.peak, rss)
        available = rss + (proc_field_bytes("/proc/meminfo", "MemAvailable") or 0) - RESERVE_BYTES
        if self.limit_bytes is not None:
            available = min(available, self.limit_bytes)
        if rss > available:
            self.available = available
            return True
        return False


def run_child(job: Job, limit_bytes: int | None = None) -> dict:
    """Run ``job`` in a child process under a MemoryWatch; its result plus ``peak_rss_anon_bytes``."""
    env = dict(os.environ)
    if job.threads and job.engine == "minimoe":
        env["MINIMOE_NUM_THREADS"] = str(job.threads)
    with tempfile.TemporaryFile("w+") as stdout:
        child = subprocess.Popen([sys.executable, "-m", "minimoe.tools.bench", "worker"], stdin=subprocess.PIPE,
                                 stdout=stdout, env=env, text=True)
        try:
            child.stdin.write(json.dumps(asdict(job)))
            child.stdin.close()
            watch = MemoryWatch(child.pid, limit_bytes)
            while child.poll() is None:
                if watch.over_limit():
                    child.kill()
                    child.wait()
                    break
                time.sleep(SAMPLE_INTERVAL_S)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        stdout.seek(0)
        lines = stdout.read().strip().splitlines()
    result = child_outcome(child.returncode, lines[-1] if lines else "", watch)
    return {"engine": job.engine, "peak_rss_anon_bytes": watch.peak} | result


def child_outcome(returncode: int, last_line: str, watch: MemoryWatch) -> dict:
    """What a finished child's exit code and last stdout line say about its run."""
    if watch.available is not None:
        return {"status": OUT_OF_MEMORY, "available_bytes": watch.available,
                "message": "stopped by the watchdog before it exhausted the machine's memory"}
    if returncode == -9:
        return {"status": OUT_OF_MEMORY, "message": "killed by signal 9 (the kernel's OOM killer, most likely)"}
    if returncode != 0 or not last_line.startswith("{"):
        cause = f"killed by signal {-returncode}" if returncode < 0 else f"exit status {returncode}"
        return {"status": FAILED, "message": f"{cause}; see the messages above"}
    return json.loads(last_line)


# --- metrics and the report -----------------------------------------------------------------

@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    fmt: str


METRICS = (
    Metric("load_s", "load (s)", "{:.3f}"),
    Metric("ttft_cold_s", "time to first token, cold (s)", "{:.3f}"),
    Metric("ttft_warm_s", "time to first token, warm (s)", "{:.3f}"),
    Metric("prefill_cold_tok_s", "prefill, cold (tokens/s)", "{:.1f}"),
    Metric("prefill_warm_tok_s", "prefill, warm (tokens/s)", "{:.1f}"),
    Metric("decode_cold_tok_s", "decode, cold (tokens/s)", "{:.2f}"),
    Metric("decode_warm_tok_s", "decode, warm (tokens/s)", "{:.2f}"),
    Metric("peak_rss_anon_gb", "peak RssAnon (GB)", "{:.3f}"),
    Metric("disk_read_cold_gb", "read from disk, cold run (GB)", "{:.2f}"),
    Metric("disk_read_warm_gb", "read from disk, warm run (GB)", "{:.2f}"),
)


def metrics(result: dict, prompt_tokens: int, new_tokens: int) -> dict[str, float]:
    """The table's figures from one engine's raw result: cold = first run, warm = median of the rest."""
    cold, warm_runs = result["runs"][0], result["runs"][1:]
    warm = {key: float(np.median([run[key] for run in warm_runs]))
            for key in ("prefill_s", "ttft_s", "decode_s", "disk_read_bytes")}
    figures = {"load_s": result["load_s"], "peak_rss_anon_gb": result["peak_rss_anon_bytes"] / GB}
    for name, run in (("cold", cold), ("warm", warm)):
        figures[f"ttft_{name}_s"] = run["ttft_s"]
        figures[f"prefill_{name}_tok_s"] = prompt_tokens / run["prefill_s"]
        figures[f"decode_{name}_tok_s"] = (new_tokens - 1) / run["decode_s"]
        figures[f"disk_read_{name}_gb"] = run["disk_read_bytes"] / GB
    return figures


def ratios(ours: dict[str, float], theirs: dict[str, float]) -> dict[str, float]:
    """minimoe / transformers, metric by metric."""
    return {key: ours[key] / theirs[key] for key in ours if theirs.get(key)}


def status_text(result: dict) -> str:
    """One phrase for an engine that did not finish: what happened, and its peak memory."""
    peak = result["peak_rss_anon_bytes"] / GB
    if result["status"] == OUT_OF_MEMORY:
        of = f" of {result['available_bytes'] / GB:.2f} GB available" if "available_bytes" in result else ""
        return f"{result['engine']} ran out of memory (peak {peak:.2f} GB{of}; {result['message']})"
    if result["status"] == NOT_INSTALLED:
        return f"{result['engine']} is not installed ({result['message']}); {INSTALL_HINT}"
    return f"{result['engine']} failed: {result['message']}"


def summarise(results: list[dict], prompt_tokens: int, new_tokens: int) -> dict:
    """Every engine's metrics (where it finished) and, for two finished engines, their ratios."""
    for result in results:
        if result["status"] == OK:
            result["metrics"] = metrics(result, prompt_tokens, new_tokens)
        else:
            result["report"] = status_text(result)
    summary = {"engines": {result["engine"]: result for result in results}}
    if len(results) == 2 and all(result["status"] == OK for result in results):
        summary["ratios"] = ratios(results[0]["metrics"], results[1]["metrics"])
        summary["same_tokens"] = all(a["tokens"] == b["tokens"] for a, b in zip(results[0]["runs"], results[1]["runs"]))
    return summary


def table_rows(summary: dict) -> list[list[str]]:
    """The table's cells: a header, each engine's status, one row per metric."""
    engines = list(summary["engines"].values())
    compared = "ratios" in summary

    def row(label: str, cells: list[str], ratio: str = "") -> list[str]:
        return [label] + cells + ([ratio] if compared else [])

    rows = [row("", [r["engine"] for r in engines], "/".join(summary["engines"])),
            row("status", [r["status"] for r in engines])]
    for metric in METRICS:
        cells = [metric.fmt.format(r["metrics"][metric.key]) if "metrics" in r else "-" for r in engines]
        ratio = summary["ratios"].get(metric.key) if compared else None  # none where transformers' figure is 0
        rows.append(row(metric.label, cells, "-" if ratio is None else f"{ratio:.2f}x"))
    return rows


def align(rows: list[list[str]]) -> list[str]:
    """Rows of cells as lines: the first column left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join([row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]) for row in rows]


def format_table(summary: dict) -> list[str]:
    """What the run measured, the aligned table, then a line per engine that did not finish."""
    lines = [f"{summary['model']}: prompt of {summary['prompt_tokens']} random tokens, {summary['new_tokens']} new "
             f"tokens (greedy, batch 1); cold = first run, warm = median of {summary['repeat']}", ""]
    lines += align(table_rows(summary))
    lines += [r["report"] for r in summary["engines"].values() if "report" in r]
    if "same_tokens" in summary:
        lines.append("greedy tokens: " + ("the same in every run" if summary["same_tokens"] else "differ"))
    return lines


def prompt_ids(config: ModelConfig, prompt_tokens: int, new_tokens: int, seed: int) -> list[int]:
    """The random prompt both engines get; checks it and the new tokens fit the context."""
    if prompt_tokens < 1 or new_tokens < 2:
        raise MinimoeError("--prompt-tokens must be at least 1 and --new-tokens at least 2 (one decode step)")
    return random_prompt(config, prompt_tokens, seed, new_tokens)


def random_prompt(config: ModelConfig, tokens: int, seed: int, new_tokens: int = 0) -> list[int]:
    """``tokens`` random token ids from a seed; MinimoeError if they and ``new_tokens`` exceed the context."""
    if tokens < 1:
        raise MinimoeError(f"a prompt needs at least 1 token, not {tokens}")
    if tokens + new_tokens > config.max_position_embeddings:
        raise MinimoeError(f"{tokens} prompt tokens" + (f" + {new_tokens} new tokens" if new_tokens else "")
                           + f" exceed the model's context of {config.max_position_embeddings}")
    return np.random.default_rng(seed).integers(0, config.vocab_size, tokens).tolist()


def benchmark(model: Path, engines: list[str], prompt_tokens: int, new_tokens: int, repeat: int, seed: int = 0,
              threads: int | None = None, memory_limit_gb: float | None = None) -> dict:
    """Run each engine in turn in its own child process; the JSON-ready summary (see :func:`summarise`)."""
    if repeat < 1:
        raise MinimoeError("--repeat must be at least 1 (the warm figures are the median of the repeats)")
    prompt = prompt_ids(ModelConfig.from_file(model), prompt_tokens, new_tokens, seed)
    limit = int(memory_limit_gb * GB) if memory_limit_gb is not None else None
    results = []
    for engine in engines:
        progress(engine, "starting a child process")
        job = Job(engine, str(model), prompt, new_tokens, repeat, threads)
        results.append(run_child(job, limit))
        progress(engine, f"{results[-1]['status']}, peak RssAnon {results[-1]['peak_rss_anon_bytes'] / GB:.2f} GB")
    settings = {"model": str(model), "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "repeat": repeat,
                "seed": seed, "threads": threads, "prompt": prompt}
    return settings | summarise(results, prompt_tokens, new_tokens)


# --- the roofline: measured prefill beside NumPy's limit on this machine ---------------------

ROOFLINE_ATTEMPTS = 3  # a row measured faster than its own limit is measured again, this many times in all


def prefill_roofline(model_path: Path, token_counts: list[int], repeat: int, seed: int = 0) -> list[dict]:
    """For each prompt length: minimoe's warm prefill beside :mod:`minimoe.tools.roofline`'s limit, in one process.

    The roofline uses the rates measured right after the prefill and the expert loads
    of the same prompt's routing.  A row that cannot be right -- a prefill faster than the
    fastest NumPy could go, which means a rate was measured while something else held the
    cores -- is measured again, up to :data:`ROOFLINE_ATTEMPTS` times in all, and never
    reported: MinimoeError if every attempt is impossible.
    """
    from ..loading import load
    from . import roofline

    if repeat < 1:
        raise MinimoeError("--repeat must be at least 1 (the warm figure is the median of the repeats)")
    model = load(model_path)
    rows = []
    for tokens in token_counts:
        prompt = random_prompt(model.config, tokens, seed)
        loads = roofline.expert_loads(model.trace(prompt).expert_ids, model.config.num_experts) \
            if model.config.num_experts else []
        for attempt in range(1, ROOFLINE_ATTEMPTS + 1):
            row = roofline_row(model, prompt, loads, repeat)
            if not (problem := impossible_row(row)):
                break
            progress("minimoe", f"{problem}: not reported" + ("; measuring again" if attempt < ROOFLINE_ATTEMPTS
                                                                else ""))
        else:
            raise MinimoeError(f"the roofline of {tokens} tokens could not be measured: in {ROOFLINE_ATTEMPTS} "
                               f"attempts the prefill always ran faster than the limit measured beside it ({problem})"
                               ", so the rates were measured while something else held the cores: run it again on "
                               "an idle machine")
        rows.append(row)
    return rows


def roofline_row(model, prompt: list[int], loads: list[np.ndarray], repeat: int) -> dict:
    """One prompt's warm prefill (median of ``repeat``), the machine's rates measured right after it, and the two
    rooflines they give."""
    from . import roofline

    config, tokens = model.config, len(prompt)
    stored_bytes = 4 if config.dtype == "float32" else 2
    progress("minimoe", f"prefill of {tokens} tokens: 1 cold + {repeat} warm runs")
    model.forward(prompt)  # cold: the pages of the weights, the allocator
    seconds = []
    for _ in range(repeat):
        start = time.perf_counter()
        model.forward(prompt)
        seconds.append(time.perf_counter() - start)
    progress("minimoe", "measuring NumPy's GEMM rate, the copy bandwidth and the bf16 cast rate")
    rates = roofline.measure_rates(tokens, config.hidden_size)
    limit = roofline.roofline(config, tokens, loads, rates, stored_bytes)
    cast_limit = roofline.roofline(config, tokens, loads, rates, stored_bytes, cast_bound=True)
    measured = tokens / float(np.median(seconds))
    return {"tokens": tokens, "measured_tok_s": measured, "roofline_tok_s": limit.tokens_per_s,
            "fraction": measured / limit.tokens_per_s, "gemm_gflops": rates.gemm_flops / 1e9,
            "copy_gb_s": rates.copy_bytes / 1e9, "roofline_matmul_s": limit.matmul_s,
            "roofline_bandwidth_s": limit.bandwidth_s, "roofline_attention_s": limit.attention_s,
            "cast_gb_s": rates.cast_bytes / 1e9, "cast_roofline_tok_s": cast_limit.tokens_per_s,
            "cast_fraction": measured / cast_limit.tokens_per_s,
            "cast_roofline_bandwidth_s": cast_limit.bandwidth_s}


def impossible_row(row: dict) -> str | None:
    """Why a roofline row cannot be right, or None: no prefill runs faster than a limit of the same machine."""
    over = [(name, row[key]) for name, key in (("roofline", "fraction"), ("cast-bound roofline", "cast_fraction"))
            if row[key] > 1]
    if not over:
        return None
    return (f"{row['tokens']} tokens: prefill at {', '.join(f'{value:.2f}x the {name}' for name, value in over)} "
            f"(GEMM measured at {row['gemm_gflops']:.1f} GFLOP/s, copy at {row['copy_gb_s']:.1f} GB/s)")


def format_roofline(rows: list[dict]) -> list[str]:
    """The roofline table (two header lines; at most 120 columns): the prefill beside the copy-bound roofline and
    the one bound by NumPy's bf16 cast, the rates they come from, and the roofline's seconds by kind."""
    header = [["prompt", "prefill", "roofline", "", "cast-bound", "", "GEMM", "copy", "cast", "roofline:", "", ""],
              ["tokens", "tok/s", "tok/s", "fraction", "tok/s", "fraction", "GFLOP/s", "GB/s", "GB/s", "matmul s",
               "bandwidth s", "attention s"]]
    cells = [[str(r["tokens"]), f"{r['measured_tok_s']:.1f}", f"{r['roofline_tok_s']:.1f}", f"{r['fraction']:.2f}",
              f"{r['cast_roofline_tok_s']:.1f}", f"{r['cast_fraction']:.2f}", f"{r['gemm_gflops']:.0f}",
              f"{r['copy_gb_s']:.1f}", f"{r['cast_gb_s']:.1f}", f"{r['roofline_matmul_s']:.3f}",
              f"{r['roofline_bandwidth_s']:.3f}", f"{r['roofline_attention_s']:.3f}"]
             for r in rows]
    return [line.rstrip() for line in align(header + cells)]


def unfinished(summary: dict) -> list[str]:
    """The engines that could not be run at all (out of memory is a result, not a failure)."""
    return [r["report"] for r in summary["engines"].values() if r["status"] not in (OK, OUT_OF_MEMORY)]


if __name__ == "__main__":
    if sys.argv[1:] != ["worker"]:
        sys.exit("usage: python -m minimoe.bench worker  (a job as JSON on stdin; run by `minimoe bench`)")
    worker_main()
