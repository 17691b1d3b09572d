#!/usr/bin/env python
"""What the bundled model's router does on code against prose: the figures quoted in the docs and notes.

Traces two texts every Python install has -- the source of ``json.decoder`` (code) and
four ``pydoc_data`` help topics (prose), 6,000 characters each -- and prints per layer
the experts each domain over-uses (share against uniform, the OLMoE view), the
consecutive-token same-expert rate against chance (the Mixtral view), load balance,
router confidence and the shared expert's share.

    python scripts/routing_study.py [--model PATH]
"""

from __future__ import annotations

import argparse
import inspect
import json.decoder
from pathlib import Path

import numpy as np
from pydoc_data.topics import topics

import minimoe
from minimoe import analysis

CHARACTERS = 6000


def traces_of(model, tokenizer, text: str, window: int = 512) -> list:
    ids = tokenizer.encode(text)
    return [model.trace(ids[i : i + window], tokenizer=tokenizer) for i in range(0, len(ids), window)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=minimoe.default_model_path())
    args = parser.parse_args()
    model, tokenizer = minimoe.load(args.model), minimoe.load_tokenizer(args.model)
    domains = {
        "code": traces_of(model, tokenizer, inspect.getsource(json.decoder)[:CHARACTERS]),
        "prose": traces_of(model, tokenizer, "\n".join(topics[k] for k in ("if", "while", "for", "try"))[:CHARACTERS]),
    }
    for name, traces in domains.items():
        print(f"{name}: {sum(t.num_tokens for t in traces)} tokens")
    everything = domains["code"] + domains["prose"]
    spec = analysis.domain_specialization(domains)
    layers = everything[0].layers
    print("\nexperts each domain over-uses (share / uniform), per layer:")
    for s, layer in enumerate(layers):
        for d, name in enumerate(spec.domains):
            top = np.argsort(-spec.ratio[d, s])[:3]
            print(f"  layer {layer} {name:5s} " + ", ".join(f"expert {e} x{spec.ratio[d, s, e]:.2f}" for e in top))
    rate = analysis.consecutive_same_expert(everything)
    load = analysis.expert_load(everything)
    entropy = analysis.routing_entropy(everything)
    shared = analysis.shared_vs_routed(everything)
    print(f"\n{'layer':>5} {'same top-1':>10} {'chance 1/E':>10} {'given load':>10} {'load CV':>8} "
          f"{'entropy':>8} {'top-1 mass':>10} {'top-k mass':>10} {'gate':>6} {'shared %':>8}")
    for s, layer in enumerate(layers):
        print(f"{layer:>5} {rate.top1_rate[s]:>10.3f} {rate.chance_uniform:>10.3f} {rate.chance_given_load[s]:>10.3f} "
              f"{load.cv[s]:>8.2f} {entropy.mean_entropy[s]:>8.2f} {entropy.top1_mass[s]:>10.3f} "
              f"{entropy.topk_mass[s]:>10.3f} {shared.mean_shared_gate[s]:>6.2f} {100 * shared.shared_fraction[s]:>7.0f}%")
    print(f"(max entropy log E = {entropy.max_entropy:.2f})")


if __name__ == "__main__":
    main()
