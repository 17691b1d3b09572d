"""Running an atlas: shards of documents traced by workers, each shard's partial atlas written atomically,
then merged.

``DIR`` holds ``atlas.json`` (the model and the plan the shards belong to), ``shards/shard-NNNNNN.npz``
(one per finished shard, written whole or not at all) and, at the end, ``atlas.npz`` (their merge).
A run that stops anywhere leaves only finished shards; ``resume=True`` keeps them and computes
the rest.  A worker that dies mid-shard leaves nothing for that shard, which is computed again.

Two engines run the same :func:`run_shard`:

* ``local``: ``workers`` processes on this machine (spawned, each loading the model once; the
  weights are memory-mapped, so they share the page cache);
* ``ray``: one Ray actor per worker, each holding a model; the driver hands out shards and writes
  what comes back.  ``address`` joins a running cluster (else a local one is started);
  ``backend="cupy"`` asks Ray for a GPU per actor.

The atlas is the same, bit for bit, whatever the engine, the number of workers, the shard size or
the interruptions: every shard's counts are exact integers, its documents are traced alone, and
each worker computes with the same number of threads (``threads``, default 1): minimoe splits a
matrix's rows over its threads, and another split changes the last bits of a product, enough to
flip a near-tie in the router's top-k.
"""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import MinimoeError
from ..files import write_text
from .aggregates import Accumulator, Atlas, describe_model, model_identity, read_atlas
from .corpus import Plan, Shard

ENGINES = ("local", "ray")
RESTARTS = 3  # times a local pool whose worker died is started again before the run gives up
# Test-only fault injection: a worker that finds this file (named by the variable) deletes it and kills itself
# after its shard's first document, as a worker lost to the OOM killer or a preempted machine would die.
KILL_ONCE = "MINIMOE_ATLAS_KILL_ONCE"


@dataclass(frozen=True)
class Settings:
    """What every worker needs to compute a shard."""

    model: str
    backend: str = "numpy"
    threads: int = 1
    window: int | None = None
    overlap: int | None = None
    skip_unreadable: bool = False


# --- a worker ---------------------------------------------------------------------------------------

class Worker:
    """A model, its tokenizer and the plan, loaded once; :meth:`run` computes a shard's partial atlas."""

    def __init__(self, settings: Settings, plan: Plan):
        from .. import backend
        from ..loading import load
        from ..tokenizer import load_tokenizer

        backend.NUM_THREADS = settings.threads  # before the first forward starts minimoe's thread pool
        self.settings, self.plan = settings, plan
        self.model = load(settings.model, backend=settings.backend)
        self.tokenizer = load_tokenizer(settings.model)
        self.identity = model_identity(self.model, settings.model)

    def run(self, shard: Shard) -> tuple[Atlas, float]:
        """(the shard's partial atlas, seconds spent)."""
        return run_shard(self.model, self.tokenizer, self.identity, self.plan, shard, self.settings)


def run_shard(model, tokenizer, identity: dict, plan: Plan, shard: Shard, settings: Settings) -> tuple[Atlas, float]:
    """Trace every document of ``shard`` window by window and fold each window in -> (partial atlas, seconds)."""
    from ..inspect.tracing import Windowing, trace_windows

    began = time.perf_counter()
    accumulator = Accumulator(identity)
    skipped: list[str] = []
    context = model.config.max_position_embeddings
    for number, document in enumerate(plan.documents(shard, settings.skip_unreadable, skipped)):
        ids = np.asarray(tokenizer.encode(document.text), dtype=np.int64)
        if len(ids) == 0:
            continue  # an empty document has no tokens to count
        plan_windows = Windowing.plan(len(ids), context, settings.window, settings.overlap)
        accumulator.begin(document.key, document.domain, ids)
        for piece in trace_windows(model, ids, plan_windows):
            accumulator.add_window(piece)
        if number == 0:
            _maybe_die()
    atlas = accumulator.flush()
    atlas.skipped = sorted(skipped)
    return atlas, time.perf_counter() - began


def _maybe_die() -> None:
    marker = os.environ.get(KILL_ONCE)
    if marker and Path(marker).exists():
        Path(marker).unlink()
        os.kill(os.getpid(), signal.SIGKILL)


_worker: Worker | None = None  # a local worker process's own


def _start_local_worker(settings: Settings, plan: Plan) -> None:
    global _worker
    _worker = Worker(settings, plan)


def _run_local(shard: Shard) -> tuple[Atlas, float]:
    return _worker.run(shard)


# --- the driver --------------------------------------------------------------------------------------

def shard_path(out: Path, shard: Shard) -> Path:
    return out / "shards" / f"shard-{shard.index:06d}.npz"


def prepare(out: Path, identity: dict, plan: Plan, settings: Settings, resume: bool) -> list[Shard]:
    """Check ``out`` against this run and write its ``atlas.json`` -> the shards still to compute."""
    manifest_path = out / "atlas.json"
    run = {"model": identity, **plan.describe(), "window": settings.window, "overlap": settings.overlap,
           "threads": settings.threads, "backend": settings.backend}
    shards = plan.shards()
    done = sorted((out / "shards").glob("shard-*.npz")) if (out / "shards").is_dir() else []
    if manifest_path.exists():
        try:
            previous = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise MinimoeError(f"{manifest_path}: not a readable atlas manifest ({exc}); use another --out") from None
        if previous.get("model", {}).get("fingerprint") != identity["fingerprint"]:
            raise MinimoeError(f"{out} holds the atlas of another model ({describe_model(previous['model'])}), not "
                               f"of {describe_model(identity)}: use another --out")
        if done and not resume:
            raise MinimoeError(f"{out} already holds {len(done)} finished shards: pass --resume to keep them and "
                               "compute the rest, or use another --out")
        if resume and previous != run:
            changed = sorted(key for key in run if run[key] != previous.get(key))
            raise MinimoeError(f"{out}: --resume needs the same run, but {', '.join(changed)} changed since its "
                               "shards were made: use another --out")
    elif done:
        raise MinimoeError(f"{out} holds shards but no atlas.json: use another --out")
    (out / "shards").mkdir(parents=True, exist_ok=True)
    write_text(manifest_path, json.dumps(run, indent=1) + "\n")
    return [shard for shard in shards if not finished(out, shard, identity)]


def finished(out: Path, shard: Shard, identity: dict) -> bool:
    """Whether ``shard``'s file is there, readable, and of this model and documents."""
    path = shard_path(out, shard)
    if not path.exists():
        return False
    try:
        atlas, header = read_atlas(path)
    except MinimoeError:
        return False  # not whole (never by our own writes): compute it again
    return atlas.model == identity and header.get("shard") == [shard.start, shard.stop]


def build(inputs: list, out: str | Path, model: str | Path, *, engine: str = "local", workers: int = 1,
          domains: list[str] | None = None, glob: str = "*", shard_size: int = 16, text_field: str = "text",
          domain_field: str = "domain", backend: str = "numpy", threads: int = 1, window: int | None = None,
          overlap: int | None = None, resume: bool = False, skip_unreadable: bool = False,
          address: str | None = None, progress: bool = True, page: bool = True) -> Atlas:
    """Build the atlas of ``inputs`` in ``out`` (see the module docstring; ``minimoe atlas`` is this) -> the atlas."""
    from ..loading import load
    from ..inspect.tracing import Windowing

    if engine not in ENGINES:
        raise MinimoeError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    for name, value in (("workers", workers), ("threads", threads)):
        if not (isinstance(value, int) and value >= 1):
            raise MinimoeError(f"{name} must be a positive integer, got {value!r}")
    out = Path(out)
    plan = Plan.build(inputs, domains, glob, shard_size, text_field, domain_field, skip_unreadable)
    settings = Settings(str(model), backend, threads, window, overlap, skip_unreadable)
    probe = load(model)  # the identity, and bad --window/--overlap caught before any worker starts
    if not probe.config.sparse_layers:
        raise MinimoeError(f"{model}: a dense model has no router: there is no routing to map")
    Windowing.plan(1, probe.config.max_position_embeddings, window, overlap)
    identity = model_identity(probe, model)
    del probe
    out.mkdir(parents=True, exist_ok=True)
    todo = prepare(out, identity, plan, settings, resume)
    bar = Progress(plan, todo, progress)

    def done(shard: Shard, atlas: Atlas, seconds: float) -> None:
        atlas.save(shard_path(out, shard), shard=[shard.start, shard.stop])
        bar.update(shard, atlas.tokens)

    if todo:
        run = run_local if engine == "local" else run_ray
        run(todo, settings, plan, workers, done, address=address)
    bar.close()
    atlas = merge_shards(out, plan, identity)
    if atlas.tokens == 0:
        raise MinimoeError(f"the corpus has no tokens: every document of {', '.join(map(str, inputs))} is empty")
    atlas.save(out / "atlas.npz")
    if page:
        from .page import write_page

        write_page(atlas, out, model)
    return atlas


def merge_shards(out: Path, plan: Plan, identity: dict) -> Atlas:
    atlas = Atlas.empty(identity)
    for shard in plan.shards():
        atlas = atlas.merge(read_atlas(shard_path(out, shard))[0])
    return atlas


class Progress:
    """A bar over the corpus's documents with tokens, tokens/s and the ETA (tqdm, on a terminal)."""

    def __init__(self, plan: Plan, todo: list[Shard], show: bool):
        from tqdm import tqdm

        left = sum(shard.stop - shard.start for shard in todo)
        self.bar = tqdm(total=plan.num_documents, initial=plan.num_documents - left, unit="doc", desc="atlas",
                        disable=None if show else True, smoothing=0.1)
        self.tokens, self.began = 0, time.perf_counter()

    def update(self, shard: Shard, tokens: int) -> None:
        self.tokens += tokens
        rate = self.tokens / max(time.perf_counter() - self.began, 1e-9)
        self.bar.update(shard.stop - shard.start)
        self.bar.set_postfix_str(f"{self.tokens:,} tokens, {rate:,.0f} tokens/s")

    def close(self) -> None:
        self.bar.close()


def run_local(todo: list[Shard], settings: Settings, plan: Plan, workers: int, done: Callable, address=None) -> None:
    """Compute ``todo`` on ``workers`` spawned processes; a pool that lost a worker is started again for the
    shards not yet done."""
    import multiprocessing

    if address is not None:
        raise MinimoeError("--address is for --engine ray")
    if settings.backend != "numpy":
        raise MinimoeError(f"--backend {settings.backend} runs on --engine ray (one GPU per actor)")
    remaining = {shard.index: shard for shard in todo}
    for attempt in range(RESTARTS + 1):
        pool = ProcessPoolExecutor(min(workers, len(remaining)), mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_start_local_worker, initargs=(settings, plan))
        try:
            running = {pool.submit(_run_local, shard): shard for shard in remaining.values()}
            while running:
                finished_now, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished_now:
                    shard = running.pop(future)
                    atlas, seconds = future.result()
                    done(shard, atlas, seconds)
                    del remaining[shard.index]
            return
        except BrokenProcessPool:
            if attempt == RESTARTS:
                raise MinimoeError(f"a worker process died {RESTARTS + 1} times (out of memory?); "
                                   f"{len(remaining)} shards are left: run again with --resume") from None
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def run_ray(todo: list[Shard], settings: Settings, plan: Plan, workers: int, done: Callable,
            address: str | None = None) -> None:
    """Compute ``todo`` on ``workers`` Ray actors (restarted, and their shard retried, if one dies)."""
    try:
        import ray
    except ImportError:
        raise MinimoeError("--engine ray needs Ray: pip install 'minimoe[ray]'") from None
    started = not ray.is_initialized()
    if started:
        options = {"address": address} if address else {"num_cpus": workers * settings.threads}
        ray.init(**options, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        actor = ray.remote(Worker).options(num_cpus=settings.threads,
                                           num_gpus=1 if settings.backend.startswith("cupy") else 0,
                                           max_restarts=RESTARTS, max_task_retries=RESTARTS)
        actors = [actor.remote(settings, plan) for _ in range(min(workers, len(todo)))]
        queue = list(todo)
        running = {}
        for worker in actors:
            if queue:
                shard = queue.pop(0)
                running[worker.run.remote(shard)] = (worker, shard)
        while running:
            ready, _ = ray.wait(list(running), num_returns=1)
            worker, shard = running.pop(ready[0])
            try:
                atlas, seconds = ray.get(ready[0])
            except ray.exceptions.RayError as exc:
                cause = getattr(exc, "cause", None)
                if isinstance(cause, MinimoeError):
                    raise cause from None
                raise MinimoeError(f"shard {shard.index} failed on Ray ({exc}); run again with --resume") from None
            done(shard, atlas, seconds)
            if queue:
                shard = queue.pop(0)
                running[worker.run.remote(shard)] = (worker, shard)
    finally:
        if started:
            ray.shutdown()
