#!/usr/bin/env python
"""The upcycling experiment: does a MoE learn faster started from a dense model, and does randomness help?

At toy scale, on the bundled models' corpus, it puts to the test what the Qwen1.5-MoE blog says --
"training a MoE model from scratch may prove inefficient", and, of upcycling Qwen-1.8B, "introducing
randomness during initialization significantly expedites convergence" -- and what Drop-Upcycling
(Nakamura et al., ICLR 2025) reports: naive copies learn fast at first, then slow down.

Every arm is the same MoE (the bundled tiny-moe's shape: 60 routed experts of 88, top-4, a shared
expert 4 wide) trained on the same batches, in the same order, for the same tokens, with the same
optimizer and schedule.  Only the starting point differs:

    scratch    transformers' random initialisation
    copy       `minimoe.upcycle(method="copy")` of the bundled dense parent: replicas, nothing random
    qwen       shuffled replicas, 50% re-drawn (the Qwen2 report's recipe; per neuron, as Drop-Upcycling does)
    drop-R     replicas, a fraction R of each expert's neurons re-drawn (Drop-Upcycling)
    dense      the dense parent itself, trained on for the same tokens: the baseline

    python scripts/upcycling_experiment.py --seed 0 &    # every arm, on one core: about 40 minutes
    python scripts/upcycling_experiment.py --seed 1 --arms scratch,copy,qwen,drop-0.5,drop-1.0,dense &
    python scripts/upcycling_experiment.py --report      # table, docs/data/upcycling_experiment.json, figure

Training is minimoe's own (:mod:`minimoe.train`: its NumPy backward, AdamW and trainer) with the
settings the torch runs used: AdamW betas (0.9, 0.95), weight decay 0.1, gradients clipped to norm 1,
a warm-up and a cosine to a tenth of the peak, the config's load-balancing coefficient.  Each run
writes ``docs/data/upcycling_experiment_minimoe/ARM-seedN.json`` when it ends, so an interrupted
experiment keeps the arms it finished.  ``docs/data/upcycling_experiment/`` holds the same arms
trained with torch (transformers' Qwen2-MoE and ``torch.optim.AdamW``), the reference that
``--report`` draws minimoe's curves against (docs/images/upcycling_experiment_engines.png).
Held-out loss is measured on the same stdlib held-out windows at evenly spaced token counts.

    python scripts/upcycling_experiment.py --seed 0 --arms copy,qwen,drop-0.5,scratch,dense &
    python scripts/upcycling_experiment.py --seed 1 --arms copy,qwen,drop-0.5,scratch,dense &
    python scripts/upcycling_experiment.py --report
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

import minimoe
from minimoe.config import read_config_file
from minimoe.files import write_text
from minimoe.inspect.params import count_parameters
from minimoe.train.init import write_random_checkpoint
from minimoe.train.trainer import Settings, evenly_spaced, train
from train_bundled_model import UPCYCLE, load_tokenizer, stdlib_ids, windows

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "docs" / "data" / "upcycling_experiment_minimoe"  # trained by minimoe.train
TORCH_RUNS = ROOT / "docs" / "data" / "upcycling_experiment"  # the same arms trained by torch, the reference
RESULTS = ROOT / "docs" / "data" / "upcycling_experiment_minimoe.json"
FIGURE = ROOT / "docs" / "images" / "upcycling_experiment_minimoe.png"
ENGINES_FIGURE = ROOT / "docs" / "images" / "upcycling_experiment_engines.png"
ARMS = ["scratch", "copy", "qwen", "drop-0.5", "drop-0.1", "drop-1.0", "dense"]
START = {"copy": ("copy", 0.0), "qwen": ("qwen", 0.5), "drop-0.5": ("drop", 0.5), "drop-0.1": ("drop", 0.1),
         "drop-1.0": ("drop", 1.0)}  # arm -> (upcycle method, reinit fraction)


def dense_parent() -> Path:
    return Path(minimoe.default_model_path("dense"))


def upcycled(arm: str, seed: int, folder: Path) -> Path:
    """The arm's starting MoE, written by minimoe.upcycle into ``folder``."""
    method, reinit = START[arm]
    shape = {k: UPCYCLE[k] for k in ("shared_experts", "top_k", "expert_size")}
    minimoe.upcycle(dense_parent(), folder, num_experts=UPCYCLE["experts"], method=method, reinit=reinit,
                    seed=seed, **shape)
    return folder


def starting_model(arm: str, seed: int, tmp: Path):
    """The arm's model (``minimoe.load``), ready to train; its files live in ``tmp`` while it trains."""
    if arm == "dense":
        return minimoe.load(dense_parent())
    if arm == "scratch":  # the upcycled arms' exact config, every weight drawn as transformers draws them
        config, _ = read_config_file(upcycled("copy", seed, tmp / "shape"))
        return minimoe.load(write_random_checkpoint(config, tmp / "scratch", seed=seed))
    return minimoe.load(upcycled(arm, seed, tmp / arm))


def active_parameters(model) -> int:
    """Parameters one token uses, as minimoe.inspect.params counts them, less the embedding lookup (a row read, no FLOPs)."""
    config = model.config
    return count_parameters(config).activated - config.vocab_size * config.hidden_size


def run_arm(arm: str, seed: int, args, train_ids: np.ndarray, held: np.ndarray) -> dict:
    """Train one arm; held-out loss at ``args.evaluations`` evenly spaced token counts (and at 0).

    After each evaluation the curve so far is written to ``args.runs/ARM-seedN.json`` marked
    ``"partial": true``; the finished run replaces it.
    """
    settings = Settings(tokens=args.tokens, context=args.context, batch=args.batch, lr=args.lr, warmup=args.warmup,
                        seed=seed)
    curve = {"tokens": [], "loss": []}
    started, model = time.time(), None

    def result(partial: bool) -> dict:
        steps = settings.steps
        return {"arm": arm, "seed": seed, **curve, "steps": steps, "tokens_seen": steps * args.batch * args.context,
                "context": args.context, "batch": args.batch, "peak_lr": args.lr,
                "train_minutes": round((time.time() - started) / 60, 1), "active_parameters": active_parameters(model),
                "parameters": count_parameters(model.config).total, "threads": args.threads, "trainer": "minimoe",
                **({"partial": True} if partial else {})}

    def report(tokens_seen: int, loss: float) -> None:
        curve["tokens"].append(tokens_seen)
        curve["loss"].append(round(loss, 4))
        print(f"{arm} seed {seed}: {tokens_seen:>9,} tokens  held-out {loss:.3f}", flush=True)
        write_text(args.runs / f"{arm}-seed{seed}.json", json.dumps(result(partial=True)) + "\n")

    with tempfile.TemporaryDirectory() as tmp:
        model = starting_model(arm, seed, Path(tmp))
        train(model, train_ids, settings, held_out=windows(held, args.context),
              eval_steps=evenly_spaced(settings.steps, args.evaluations), on_eval=report, progress=False)
    return result(partial=False)


def limit_threads(threads: int) -> None:
    """At most ``threads`` threads: minimoe's pool (made at the first forward) and BLAS's, inside it and out."""
    from threadpoolctl import threadpool_limits

    import minimoe.backend

    minimoe.backend.NUM_THREADS = threads
    threadpool_limits(threads)


def load_data(max_documents: int | None, eval_windows: int, context: int) -> tuple[np.ndarray, np.ndarray]:
    """(training ids, held-out ids cut to ``eval_windows`` windows) with the bundled tokenizer."""
    train_ids, held_ids = stdlib_ids(load_tokenizer(dense_parent()), max_documents)
    return train_ids, windows(held_ids, context)[:eval_windows].reshape(-1)


# ----------------------------------------------------------------------------------------------- report

def tokens_to_reach(tokens: list[int], loss: list[float], target: float) -> float | None:
    """Tokens until the held-out loss comes down through ``target``, interpolated between evaluations.

    The first crossing from above: an arm that starts at or under ``target`` and rises above it while
    its learning rate warms up (the dense parent itself does) counts from when it comes back.  0 if the
    loss never goes above ``target``; None if it never comes down to it.
    """
    for i in range(1, len(loss)):
        if loss[i] <= target < loss[i - 1]:
            t0, t1, l0, l1 = tokens[i - 1], tokens[i], loss[i - 1], loss[i]
            return t0 + (t1 - t0) * (l0 - target) / (l0 - l1)
    return 0 if max(loss) <= target else None


def loss_at(run: dict, fraction: float) -> float:
    """Held-out loss at the evaluation nearest ``fraction`` of the token budget."""
    target = fraction * run["tokens"][-1]
    return run["loss"][int(np.argmin([abs(t - target) for t in run["tokens"]]))]


def summarise(runs: list[dict]) -> dict:
    """Per arm: mean and spread (max - min over seeds) of held-out loss at 25/50/100%, tokens to the parent
    (mean over seeds, and per seed)."""
    parent = np.mean([r["loss"][0] for r in runs if r["arm"] == "dense"])
    summary = {"parent_loss": round(float(parent), 4), "arms": {}}
    for arm in [a for a in ARMS if any(r["arm"] == a for r in runs)]:
        mine = [r for r in runs if r["arm"] == arm]
        row = {"seeds": [r["seed"] for r in mine], "start": round(float(np.mean([r["loss"][0] for r in mine])), 4)}
        for fraction in (0.25, 0.5, 1.0):
            values = [loss_at(r, fraction) for r in mine]
            row[f"loss_{int(fraction * 100)}"] = [round(float(np.mean(values)), 4),
                                                  round(float(np.ptp(values)), 4)]
        reached = [tokens_to_reach(r["tokens"], r["loss"], parent) for r in mine]
        row["tokens_to_parent"] = None if None in reached else int(np.mean(reached))
        # per seed too: an arm run on fewer seeds is compared with the others on its own seeds
        row["tokens_to_parent_by_seed"] = {str(r["seed"]): None if t is None else int(t) for r, t in zip(mine, reached)}
        row["active_parameters"] = mine[0]["active_parameters"]
        summary["arms"][arm] = row
    return summary


def print_table(summary: dict, budget: int) -> None:
    print(f"dense parent's held-out loss: {summary['parent_loss']:.3f} nats/token; budget {budget:,} tokens")
    print(f"{'arm':10s} {'seeds':>5s} {'start':>7s} {'25%':>14s} {'50%':>14s} {'100%':>14s} {'tokens to parent':>17s}")
    for arm, row in summary["arms"].items():
        cells = [f"{row[k][0]:.3f} ± {row[k][1] / 2:.3f}" for k in ("loss_25", "loss_50", "loss_100")]
        reach = "not reached" if row["tokens_to_parent"] is None else f"{row['tokens_to_parent']:,}"
        print(f"{arm:10s} {len(row['seeds']):5d} {row['start']:7.3f} {cells[0]:>14s} {cells[1]:>14s} "
              f"{cells[2]:>14s} {reach:>17s}")


def draw(runs: list[dict], summary: dict, out: Path) -> None:
    """Held-out loss against tokens and against training FLOPs (6 x active parameters per token)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = dict(zip(ARMS, plt.get_cmap("tab10").colors))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for arm in summary["arms"]:
        for i, run in enumerate(r for r in runs if r["arm"] == arm):
            tokens = np.array(run["tokens"])
            for ax, x in zip(axes, (tokens, 6.0 * run["active_parameters"] * tokens)):
                ax.plot(x, run["loss"], color=colours[arm], lw=1.6, alpha=0.9, label=arm if i == 0 else None,
                        ls="--" if arm == "dense" else "-")
    for ax, label in zip(axes, ("training tokens", "training FLOPs (6 x active parameters x tokens)")):
        ax.axhline(summary["parent_loss"], color="grey", lw=0.8, ls=":")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out loss (nats/token, stdlib)")
    axes[0].legend(title="start", fontsize=8)
    axes[0].text(0, summary["parent_loss"], " dense parent at the start", va="bottom", fontsize=8, color="grey")
    low, last = min(min(r["loss"]) for r in runs), max(r["loss"][-1] for r in runs)
    axes[0].set_ylim(low - 0.05, max(summary["parent_loss"] + 0.6, last + 0.15))  # random starts are cut off
    fig.suptitle("Upcycling at toy scale: the same MoE from different starts, same data, optimizer and schedule "
                 f"(seeds {sorted({r['seed'] for r in runs})}, one line each)", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def report(args) -> None:
    """The table, JSON and figure of the finished runs; with torch's runs beside, the engines compared.

    The summary needs a finished dense run (its first evaluation is the parent's loss, the yardstick);
    without one, only the engines are compared, as far as the runs got.
    """
    every = [json.loads(p.read_text()) for p in sorted(args.runs.glob("*.json"))]
    if not every:
        raise SystemExit(f"no runs in {args.runs}")
    runs = [run for run in every if not run.get("partial")]  # the summary: finished runs only
    settings = {k: every[0][k] for k in ("tokens_seen", "context", "batch", "peak_lr")}
    results = {"settings": settings, "runs": runs, "partial_runs": [run for run in every if run.get("partial")]}
    if any(run["arm"] == "dense" for run in runs):
        results["summary"] = summarise(runs)
        print_table(results["summary"], settings["tokens_seen"])
        draw(runs, results["summary"], args.figure)
    else:
        print(f"no finished dense run in {args.runs}: no summary (its first evaluation is the parent's loss)")
    torch_runs = [json.loads(p.read_text()) for p in sorted(args.torch_runs.glob("*.json"))]
    if torch_runs:
        results["engines"] = compare_engines(every, torch_runs)
        draw_engines(every, torch_runs, args.engines_figure)
    args.results.write_text(json.dumps(results, indent=1) + "\n")


def compare_engines(runs: list[dict], torch_runs: list[dict]) -> dict:
    """Per arm, at every evaluation both engines reached with every seed: the gap between their seed means,
    against the spread between seeds (max - min, the larger of the two engines').

    The engines agree at a point when the gap is within that spread.  Unfinished runs count up to where they got.
    """
    print(f"\n{'arm':10s} {'tokens':>9s} {'minimoe':>8s} {'torch':>8s} {'gap':>7s} {'spread':>7s}  agree")
    comparison = {}
    for arm in [a for a in ARMS if any(r["arm"] == a for r in runs)]:
        ours = [r for r in runs if r["arm"] == arm]
        theirs = [r for r in torch_runs if r["arm"] == arm]
        if not theirs:
            continue
        rows = []
        for i, tokens in enumerate(theirs[0]["tokens"]):
            if any(len(r["loss"]) <= i for r in ours + theirs) or i == 0:  # not reached; at 0 both are the start
                continue
            mine, reference = [r["loss"][i] for r in ours], [r["loss"][i] for r in theirs]
            spread = max(np.ptp(mine), np.ptp(reference))
            gap = float(np.mean(mine) - np.mean(reference))
            rows.append({"tokens": tokens, "minimoe": round(float(np.mean(mine)), 4),
                         "torch": round(float(np.mean(reference)), 4), "gap": round(gap, 4),
                         "spread": round(float(spread), 4), "agree": bool(abs(gap) <= spread), "seeds": len(mine)})
            print(f"{arm:10s} {tokens:9,d} {rows[-1]['minimoe']:8.3f} {rows[-1]['torch']:8.3f} {gap:+7.3f} "
                  f"{spread:7.3f}  {'yes' if rows[-1]['agree'] else 'NO'} ({len(mine)} seeds)")
        comparison[arm] = rows
    return comparison


def draw_engines(runs: list[dict], torch_runs: list[dict], out: Path) -> None:
    """One panel per arm: held-out loss against tokens, every seed, minimoe's trainer beside torch's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [a for a in ARMS if any(r["arm"] == a for r in runs) and any(r["arm"] == a for r in torch_runs)]
    fig, axes = plt.subplots(1, len(arms), figsize=(3.2 * len(arms), 3.6), sharey=True, squeeze=False)
    for ax, arm in zip(axes[0], arms):
        for engine, mine, style in (("torch", torch_runs, dict(color="grey", ls="--")),
                                    ("minimoe", runs, dict(color="tab:blue", ls="-"))):
            for i, run in enumerate(r for r in mine if r["arm"] == arm):
                ax.plot(run["tokens"], run["loss"], lw=1.4, alpha=0.9, label=engine if i == 0 else None, **style)
        ax.set_title(arm, fontsize=10)
        ax.set_xlabel("training tokens")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out loss (nats/token)")
    axes[0][0].legend(fontsize=8)
    low = min(min(r["loss"]) for r in runs + torch_runs)
    axes[0][0].set_ylim(low - 0.05, low + 2.0)  # the scratch arm starts far above; its start is cut off
    fig.suptitle("The upcycling experiment trained by minimoe and by torch\n"
                 "same arms, settings and seeds; one line per seed; unfinished runs end where they got", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, from {ARMS}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokens", type=int, default=1_000_000, help="training tokens per arm")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate, every arm")
    parser.add_argument("--warmup", type=int, default=30, help="warm-up steps, every arm")
    parser.add_argument("--evaluations", type=int, default=12, help="held-out evaluations after the start")
    parser.add_argument("--eval-windows", type=int, default=48, help="held-out windows of --context tokens")
    parser.add_argument("--threads", type=int, default=1, help="threads, minimoe's and BLAS's (run one process per seed)")
    parser.add_argument("--max-documents", type=int, help="train on the first N documents only (smoke tests)")
    parser.add_argument("--runs", type=Path, default=RUNS, help="folder of per-arm results")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--figure", type=Path, default=FIGURE)
    parser.add_argument("--torch-runs", type=Path, default=TORCH_RUNS, help="the torch reference runs, for --report")
    parser.add_argument("--engines-figure", type=Path, default=ENGINES_FIGURE)
    parser.add_argument("--report", action="store_true", help="summarise the runs: table, JSON, figure")
    args = parser.parse_args(argv)
    if args.report:
        return report(args)
    arms = args.arms.split(",")
    unknown = set(arms) - set(ARMS)
    if unknown:
        parser.error(f"unknown arms {sorted(unknown)}; choose from {ARMS}")
    limit_threads(args.threads)
    train_ids, held = load_data(args.max_documents, args.eval_windows, args.context)
    args.runs.mkdir(parents=True, exist_ok=True)
    for arm in arms:
        started = time.time()
        result = run_arm(arm, args.seed, args, train_ids, held)
        write_text(args.runs / f"{arm}-seed{args.seed}.json", json.dumps(result) + "\n")
        print(f"{arm} seed {args.seed}: done in {(time.time() - started) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
