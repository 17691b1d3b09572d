"""The ``minimoe`` command line.

Exit codes: 0 success, 1 a :class:`~minimoe.errors.MinimoeError` (bad input; the
message says what and where), 2 a usage error (argparse).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import ModelConfig
from .errors import MinimoeError
from .params import count_parameters, format_billions

CONFIGS = Path(__file__).resolve().parent / "configs"


def shipped_configs() -> dict[str, Path]:
    """The config.json files bundled with minimoe, by name (e.g. ``qwen1.5-moe-a2.7b``)."""
    return {path.stem: path for path in sorted(CONFIGS.glob("*.json"))}


def resolve_config(spec: str) -> Path:
    """A model folder, a config.json path, or the name of a shipped config."""
    path = Path(spec)
    if path.exists():
        return path
    shipped = shipped_configs()
    if spec in shipped:
        return shipped[spec]
    raise MinimoeError(f"{spec}: no such folder or file, and not a shipped config (one of: {', '.join(shipped)})")


def cmd_params(args: argparse.Namespace) -> None:
    config = ModelConfig.from_file(resolve_config(args.model))
    counts = count_parameters(config)
    print(f"{args.model}: {config.model_type}, {config.num_hidden_layers} layers, "
          f"{len(config.sparse_layers)} sparse, {config.num_experts} experts (top-{config.num_experts_per_tok})")
    for label, count in counts.rows():
        print(f"  {label:26s} {format_billions(count):>8s}  ({count:,})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minimoe", description="A readable NumPy Qwen1.5-MoE (Qwen2-MoE).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    params = commands.add_parser(
        "params",
        help="count total, activated and activated non-embedding parameters from config.json",
        description="Count parameters from a config alone. MODEL is a checkpoint folder, a config.json, "
        f"or a shipped config: {', '.join(shipped_configs())}.",
    )
    params.add_argument("model", help="checkpoint folder, config.json, or shipped config name")
    params.set_defaults(run=cmd_params)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except MinimoeError as exc:
        print(f"minimoe: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
