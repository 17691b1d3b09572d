#!/usr/bin/env python
"""Draw the figures the README and the docs show, on the bundled model (deterministic: greedy routing, no sampling).

    python scripts/make_doc_figures.py [--out docs/images]

docs/images/token_experts.png: the top-1 expert of each token of a short Python snippet in
each sparse layer (minimoe.inspect.viz.plot_token_experts), the routing picture of the README and
docs/routing.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import minimoe
from minimoe.inspect import viz

ROOT = Path(__file__).resolve().parent.parent
SNIPPET = "def read_config(path):\n    with open(path) as f:\n        return json.load(f)\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    args = parser.parse_args()
    path = minimoe.default_model_path()
    model, tok = minimoe.load(path), minimoe.load_tokenizer(path)
    trace = model.trace(tok.encode(SNIPPET), tokenizer=tok)
    args.out.mkdir(parents=True, exist_ok=True)
    target = args.out / "token_experts.png"
    viz.plot_token_experts(trace).savefig(target, dpi=90)
    print(target)


if __name__ == "__main__":
    main()
