"""The expert atlas of the bundled model over CPython's standard library, and its costs.

    python scripts/atlas_stdlib.py run [--workers 2] [--out DIR]    # the whole stdlib: tokens, wall time, peak memory
    python scripts/atlas_stdlib.py throughput [--rounds 2]          # tokens/s: tracing alone, local and Ray workers
    python scripts/atlas_stdlib.py memory                           # peak memory, a corpus and one 10x larger
    python scripts/atlas_stdlib.py fold [--rounds 3]                # in one process: tracing alone, tracing + folding
    python scripts/atlas_stdlib.py overhead                         # each engine's fixed cost: a one-line corpus
    python scripts/atlas_stdlib.py partial [--out DIR]              # the finished shards of an unfinished run

Each package of ``Lib/`` (site-packages left out) is a domain, the top-level modules one more
(``toplevel``); every ``*.py`` file is a document (the few that are not UTF-8, kept as test data
of the tokenizer module, are left out and listed).  Results go to docs/data/atlas/ (JSON, and the
atlas itself), plots to docs/images/atlas_*.png.  Peak memory is the largest sum of the resident
set sizes (and of the proportional set sizes, which count a page shared by n processes as 1/n)
over the run's process tree, sampled every 0.2 s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "docs" / "data" / "atlas"
IMAGES = REPO / "docs" / "images"
LIB = Path(sysconfig.get_paths()["stdlib"])
LEFT_OUT = {"site-packages", "__pycache__"}


def stdlib_inputs() -> tuple[list[str], list[str]]:
    """(inputs, their domains): each package folder of Lib/ and each top-level module."""
    inputs, domains = [], []
    for entry in sorted(LIB.iterdir()):
        if entry.name in LEFT_OUT or entry.name.startswith("."):
            continue
        if entry.is_dir() and any(entry.rglob("*.py")):
            inputs.append(str(entry)), domains.append(entry.name)
        elif entry.suffix == ".py":
            inputs.append(str(entry)), domains.append("toplevel")
    return inputs, domains


def tree_memory(pid: int) -> tuple[int, int]:
    """(sum of RSS, sum of PSS) in bytes over ``pid`` and all its descendants."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    rss = pss = 0
    todo = [pid]
    while todo:
        current = todo.pop()
        todo += children.get(current, [])
        try:
            for line in Path(f"/proc/{current}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
        except OSError:
            continue
    return rss, pss


def measured(command: list[str]) -> dict:
    """Run ``command``; its wall time and the peak RSS / PSS of its process tree."""
    began = time.perf_counter()
    process = subprocess.Popen(command, env={**os.environ, "PYTHONPATH": str(REPO)})
    peak = [0, 0]

    def sample():
        while process.poll() is None:
            rss, pss = tree_memory(process.pid)
            peak[0], peak[1] = max(peak[0], rss), max(peak[1], pss)
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    code = process.wait()
    sampler.join()
    if code:
        raise SystemExit(f"{' '.join(command[:6])} ... exited with {code}")
    return {"wall_s": round(time.perf_counter() - began, 1), "peak_rss_mb": round(peak[0] / 2**20),
            "peak_pss_mb": round(peak[1] / 2**20)}


def atlas_command(inputs: list[str], domains: list[str], out: Path, *extra: str) -> list[str]:
    command = [sys.executable, "-m", "minimoe", "atlas", *inputs, "--out", str(out), "--glob", "*.py",
               "--skip-unreadable", *extra]
    for domain in domains:
        command += ["--domain", domain]
    return command


def machine() -> dict:
    names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
             if line.startswith("model name")] if Path("/proc/cpuinfo").exists() else []
    return {"cpu": names[0] if names else platform.machine(), "cores": os.cpu_count(),
            "python": platform.python_version(), "note": "a 2-core machine shared with other jobs"}


def cmd_run(args) -> None:
    import minimoe.atlas

    inputs, domains = stdlib_inputs()
    out = Path(args.out)
    result = measured(atlas_command(inputs, domains, out, "--workers", str(args.workers),
                                    *(["--resume"] if args.resume else [])))
    atlas = minimoe.atlas.load(out)
    result |= {"tokens": atlas.tokens, "documents": atlas.documents, "domains": len(atlas.domains),
               "skipped": atlas.skipped, "workers": args.workers, "tokens_per_s": round(atlas.tokens / result["wall_s"]),
               "stdlib": str(LIB), "machine": machine()}
    DATA.mkdir(parents=True, exist_ok=True)
    (DATA / "stdlib_run.json").write_text(json.dumps(result, indent=1) + "\n")
    publish(atlas, out)
    print(json.dumps(result, indent=1))


def publish(atlas, out: Path) -> None:
    """The atlas and its plots into docs/ (the notebook and docs/atlas.md read them)."""
    from minimoe.atlas.page import write_page

    DATA.mkdir(parents=True, exist_ok=True)
    atlas.save(DATA / "stdlib_atlas.npz")
    for path in write_page(atlas, out, REPO / "minimoe" / "assets" / "tiny-moe"):
        if path.suffix == ".png":
            shutil.copy(path, IMAGES / f"atlas_{path.name}")


def cmd_partial(args) -> None:
    """Merge the finished shards of a run still going (or stopped): what is known so far, said to be partial."""
    from minimoe.atlas.aggregates import Atlas, read_atlas

    out = Path(args.out)
    shards = sorted((out / "shards").glob("shard-*.npz"))
    manifest = json.loads((out / "atlas.json").read_text())
    atlas = Atlas.empty(manifest["model"])
    for path in shards:
        atlas = atlas.merge(read_atlas(path)[0])
    total = -(-sum(source["items"] for source in manifest["sources"]) // manifest["shard_size"])
    publish(atlas, out / "partial")
    result = {"partial": len(shards) < total, "shards_done": len(shards), "shards": total, "tokens": atlas.tokens,
              "documents": atlas.documents, "machine": machine()}
    (DATA / "stdlib_partial.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


def subset(fraction_of: int, part: int = 0) -> tuple[list[str], list[str]]:
    """Every ``fraction_of``-th input of the stdlib (a 1/n slice of its packages and modules)."""
    inputs, domains = stdlib_inputs()
    return inputs[part::fraction_of], domains[part::fraction_of]


def trace_alone(inputs: list[str]) -> dict:
    """Tokens/s of tokenizing and tracing the same documents window by window in one process, nothing folded."""
    code = f"""
import json, sys, time, numpy as np, minimoe
from minimoe import backend
backend.NUM_THREADS = 1
from minimoe.atlas.corpus import Plan
from minimoe.inspect.tracing import Windowing, trace_windows
began = time.perf_counter()
path = minimoe.default_model_path()
model, tok = minimoe.load(path), minimoe.load_tokenizer(path)
plan = Plan.build({inputs!r}, glob="*.py")
tokens = 0
for shard in plan.shards():
    for doc in plan.documents(shard, True, []):
        ids = np.asarray(tok.encode(doc.text), dtype=np.int64)
        if len(ids):
            tokens += len(ids)
            for piece in trace_windows(model, ids, Windowing.plan(len(ids), model.config.max_position_embeddings)):
                pass
print(json.dumps({{"tokens": tokens, "wall_s": time.perf_counter() - began}}))
"""
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)}).stdout
    return json.loads(output.strip().splitlines()[-1])


def cmd_throughput(args) -> None:
    import minimoe.atlas

    inputs, domains = ([str(LIB / name) for name in args.packages], list(args.packages)) if args.packages \
        else subset(args.fraction)
    runs = {"trace alone": None, "local x1": ("local", 1), "local x2": ("local", 2), "ray x1": ("ray", 1),
            "ray x2": ("ray", 2)}
    walls: dict[str, list[float]] = {name: [] for name in runs}
    tokens = None
    for round_ in range(args.rounds):  # interleaved: each round runs every configuration once
        for name, config in runs.items():
            if config is None:
                result = trace_alone(inputs)
                tokens = result["tokens"]
                walls[name].append(result["wall_s"])
                continue
            with tempfile.TemporaryDirectory() as tmp:
                began = time.perf_counter()
                subprocess.run(atlas_command(inputs, domains, Path(tmp) / "out", "--engine", config[0], "--workers",
                                             str(config[1])), check=True, env={**os.environ, "PYTHONPATH": str(REPO)},
                               stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
                walls[name].append(time.perf_counter() - began)
                assert minimoe.atlas.load(Path(tmp) / "out").tokens == tokens
            print(round_, name, round(walls[name][-1], 1), flush=True)
    best = {name: min(values) for name, values in walls.items()}
    result = {"tokens": tokens, "inputs": len(inputs), "rounds": args.rounds,
              "wall_s": {name: [round(w, 1) for w in values] for name, values in walls.items()},
              "tokens_per_s": {name: round(tokens / wall) for name, wall in best.items()},
              "local x1 / trace alone": round(best["trace alone"] / best["local x1"], 3),
              "note": "end-to-end wall time of each command (start, model load, tracing, merge, page), best of the "
                      "rounds; the configurations interleaved round by round", "machine": machine()}
    DATA.mkdir(parents=True, exist_ok=True)
    (DATA / "throughput.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


def cmd_fold(args) -> None:
    """Steady-state cost of the atlas's folding: one process, one thread, the same documents traced window by
    window with and without each window folded into an Accumulator, interleaved round by round."""
    import numpy as np

    import minimoe
    from minimoe import backend
    from minimoe.atlas.aggregates import Accumulator, model_identity
    from minimoe.atlas.corpus import Plan
    from minimoe.inspect.tracing import Windowing, trace_windows

    backend.NUM_THREADS = 1
    path = minimoe.default_model_path()
    model, tokenizer = minimoe.load(path), minimoe.load_tokenizer(path)
    inputs, _ = subset(args.fraction)
    plan = Plan.build(inputs, glob="*.py", skip_unreadable=True)
    documents = [(d.key, np.asarray(tokenizer.encode(d.text), dtype=np.int64))
                 for shard in plan.shards() for d in plan.documents(shard, True, [])]
    documents = [(key, ids) for key, ids in documents if len(ids)]
    identity = model_identity(model, path)

    def trace_only():
        for _, ids in documents:
            for _ in trace_windows(model, ids, Windowing.plan(len(ids), model.config.max_position_embeddings)):
                pass

    folding = []  # seconds spent folding, per run of trace_and_fold

    def trace_and_fold():
        accumulator, spent = Accumulator(identity), 0.0
        for key, ids in documents:
            accumulator.begin(key, "all", ids)
            for piece in trace_windows(model, ids, Windowing.plan(len(ids), model.config.max_position_embeddings)):
                began = time.perf_counter()
                accumulator.add_window(piece)
                spent += time.perf_counter() - began
        accumulator.flush()
        folding.append(spent)

    times: dict[str, list[float]] = {"trace alone": [], "trace + fold": []}
    for _ in range(args.rounds):
        for name, run in (("trace alone", trace_only), ("trace + fold", trace_and_fold)):
            began = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - began)
    tokens = sum(len(ids) for _, ids in documents)
    best = {name: min(values) for name, values in times.items()}
    result = {"tokens": tokens, "rounds": args.rounds, "seconds": {k: [round(x, 2) for x in v] for k, v in times.items()},
              "tokens_per_s": {name: round(tokens / t) for name, t in best.items()},
              "trace + fold / trace alone": round(best["trace alone"] / best["trace + fold"], 3),
              "folding_s": [round(x, 2) for x in folding],
              "share of trace + fold spent folding": [round(f / t, 3) for f, t in zip(folding, times["trace + fold"])],
              "note": "tokens/s of the same documents, best of the rounds, in one process on one thread; the share "
                      "spent folding is timed inside each run, so the machine's other load weighs on both parts",
              "machine": machine()}
    DATA.mkdir(parents=True, exist_ok=True)
    (DATA / "fold.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


def cmd_overhead(args) -> None:
    """Each configuration's fixed cost (start, model loads, workers or actors, merge, page) on a one-line corpus."""
    walls: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "one.txt"
        corpus.write_text("def f(x):\n    return x\n")
        for round_ in range(args.rounds):
            for engine, workers in (("local", 1), ("local", 2), ("ray", 1), ("ray", 2)):
                began = time.perf_counter()
                subprocess.run([sys.executable, "-m", "minimoe", "atlas", str(corpus), "--out",
                                str(Path(tmp) / f"{engine}{workers}-{round_}"), "--engine", engine, "--workers",
                                str(workers)], check=True, env={**os.environ, "PYTHONPATH": str(REPO)},
                               stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
                walls.setdefault(f"{engine} x{workers}", []).append(round(time.perf_counter() - began, 1))
    result = {"wall_s": walls, "best_s": {name: min(values) for name, values in walls.items()},
              "note": "minimoe atlas on a one-line corpus: what every run pays besides tracing", "machine": machine()}
    DATA.mkdir(parents=True, exist_ok=True)
    (DATA / "overhead.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


def cmd_memory(args) -> None:
    """Peak memory of an atlas of a corpus and of one 10x larger (the same text repeated in JSONL documents)."""
    import minimoe.atlas

    inputs, _ = subset(args.fraction)
    with tempfile.TemporaryDirectory() as tmp:
        small, large = Path(tmp) / "small.jsonl", Path(tmp) / "large.jsonl"
        texts = []
        for path in inputs:
            for file in sorted(Path(path).rglob("*.py")) if Path(path).is_dir() else [Path(path)]:
                try:
                    texts.append(file.read_text(encoding="utf-8"))
                except UnicodeDecodeError:
                    continue
        lines = [json.dumps({"text": text, "domain": f"copy{0}"}) for text in texts]
        small.write_text("\n".join(lines) + "\n")
        with open(large, "w") as handle:
            for copy in range(10):  # ten copies, each its own domain: documents the atlas has not seen
                for text in texts:
                    handle.write(json.dumps({"text": text, "domain": f"copy{copy}"}) + "\n")
        result = {}
        for name, corpus in (("small", small), ("large", large)):
            out = Path(tmp) / name
            result[name] = measured([sys.executable, "-m", "minimoe", "atlas", str(corpus), "--out", str(out),
                                     "--workers", str(args.workers)])
            result[name]["tokens"] = minimoe.atlas.load(out).tokens
            print(name, result[name], flush=True)
    result["large / small peak RSS"] = round(result["large"]["peak_rss_mb"] / result["small"]["peak_rss_mb"], 3)
    result["machine"] = machine()
    DATA.mkdir(parents=True, exist_ok=True)
    (DATA / "memory.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run")
    run.add_argument("--workers", type=int, default=2)
    run.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "atlas-stdlib"))
    run.add_argument("--resume", action="store_true")
    run.set_defaults(go=cmd_run)
    throughput = commands.add_parser("throughput")
    throughput.add_argument("--rounds", type=int, default=2)
    throughput.add_argument("--fraction", type=int, default=40, help="use 1/n of the stdlib's inputs")
    throughput.add_argument("--packages", nargs="*", help="instead: these packages of Lib/ (e.g. asyncio json)")
    throughput.set_defaults(go=cmd_throughput)
    memory = commands.add_parser("memory")
    memory.add_argument("--fraction", type=int, default=100, help="the small corpus: 1/n of the stdlib's inputs")
    memory.add_argument("--workers", type=int, default=1)
    memory.set_defaults(go=cmd_memory)
    fold = commands.add_parser("fold")
    fold.add_argument("--rounds", type=int, default=3)
    fold.add_argument("--fraction", type=int, default=40, help="use 1/n of the stdlib's inputs")
    fold.set_defaults(go=cmd_fold)
    overhead = commands.add_parser("overhead")
    overhead.add_argument("--rounds", type=int, default=2)
    overhead.set_defaults(go=cmd_overhead)
    partial = commands.add_parser("partial")
    partial.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "atlas-stdlib"))
    partial.set_defaults(go=cmd_partial)
    args = parser.parse_args()
    args.go(args)


if __name__ == "__main__":
    main()
