"""``minimoe atlas``: its flags and what it runs (the CLI adds this subcommand)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .engine import ENGINES, build


def add_parser(commands, add_model_flag) -> None:
    """Add the ``atlas`` subcommand to the CLI's ``commands`` (``add_model_flag`` adds its --model)."""
    atlas = commands.add_parser(
        "atlas", help="routing statistics of a whole corpus: per expert load, domains, tokens, co-activation",
        description="Trace every token of a corpus once and count how each layer's experts are used: load, per "
                    "domain, per token id, co-activation, layer-to-layer transitions, consecutive-token repeats, "
                    "distinct experts per batch, router entropy. Writes DIR/atlas.npz (minimoe.atlas.load), "
                    "DIR/index.html (browsable) and PNG plots; finished shards stay in DIR/shards for --resume.")
    add_model_flag(atlas)
    atlas.add_argument("inputs", nargs="+", metavar="INPUT",
                       help="text files, folders (domain: the first folder under it), .jsonl or .parquet files")
    atlas.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder for the atlas and its shards")
    atlas.add_argument("--domain", action="append", metavar="NAME",
                       help="the domain of an input's documents: once for all inputs, or once per input in order")
    atlas.add_argument("--glob", default="*", help="in folders, read the files matching these comma-separated "
                                                   "patterns (default '*'; e.g. '*.py')")
    atlas.add_argument("--text-field", default="text", help="JSONL field / Parquet column of the text (default text)")
    atlas.add_argument("--domain-field", default="domain",
                       help="JSONL field / Parquet column of the domain (default domain; absent: the input's domain)")
    atlas.add_argument("--engine", choices=ENGINES, default="local", help="local processes (default) or Ray actors")
    atlas.add_argument("--workers", type=int, default=1, help="worker processes or actors, each one model (default 1)")
    atlas.add_argument("--threads", type=int, default=1,
                       help="threads per worker (default 1); the atlas is the same bit for bit for one thread count")
    atlas.add_argument("--shard-size", type=int, default=16, help="documents per shard (default 16)")
    atlas.add_argument("--backend", default="numpy", choices=["numpy", "cupy"],
                       help="cupy: each Ray actor asks for a GPU (needs --engine ray)")
    atlas.add_argument("--address", help="--engine ray: join this Ray cluster (default: start a local one)")
    atlas.add_argument("--window", type=int, help="tokens per forward pass for long documents (default: the "
                                                   "model's context), as minimoe inspect windows them")
    atlas.add_argument("--overlap", type=int, help="tokens each window re-reads as context (default half the window)")
    atlas.add_argument("--resume", action="store_true", help="keep DIR's finished shards and compute the rest")
    atlas.add_argument("--skip-unreadable", action="store_true",
                       help="leave out documents that cannot be read (not UTF-8, no text field), listed in the atlas")
    atlas.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    atlas = build(args.inputs, args.out, args.model, engine=args.engine, workers=args.workers, domains=args.domain,
                  glob=args.glob, shard_size=args.shard_size, text_field=args.text_field,
                  domain_field=args.domain_field, backend=args.backend, threads=args.threads, window=args.window,
                  overlap=args.overlap, resume=args.resume, skip_unreadable=args.skip_unreadable,
                  address=args.address)
    print(f"{atlas.tokens:,} tokens in {atlas.documents:,} documents, {len(atlas.domains)} domains"
          + (f"; {len(atlas.skipped)} documents left out (unreadable)" if atlas.skipped else ""), file=sys.stderr)
    print(args.out / "index.html")
