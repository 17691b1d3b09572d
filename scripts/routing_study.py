#!/usr/bin/env python
"""What the bundled model's router does: the figures quoted in docs/routing.md and the notes.

``domains``: traces two texts every Python install has -- the source of ``json.decoder``
(code) and four ``pydoc_data`` help topics (prose), 6,000 characters each -- and prints
per layer the experts each domain over-uses (share against uniform, the OLMoE view), the
consecutive-token same-expert rate against chance (the Mixtral view), load balance,
router confidence and the shared expert's share.

``context``: how much the left context matters -- for tokens 600-999 of ``json/decoder.py``,
the share whose top-1 expert, traced after only 0, 100, 300 or 599 tokens of context, equals
that of a single pass over tokens 0-999, per sparse layer.

``memory``: the peak of NumPy allocations (``tracemalloc``) while tracing 4,096 tokens in
windows of 256, without and with the ``[T, vocab]`` logits kept.

    python scripts/routing_study.py [--model PATH] [--part domains|context|memory]  (default: all three)
"""

from __future__ import annotations

import argparse
import inspect
import json.decoder
import tracemalloc
from pathlib import Path

import numpy as np
from pydoc_data.topics import topics

import minimoe
from minimoe.inspect import analysis
from minimoe.inspect.tracing import trace_text

CHARACTERS = 6000
TRACED_TOKENS = (600, 1000)          # the tokens of json/decoder.py whose routing is compared
CONTEXTS = (0, 100, 300, 599)        # tokens of context before them; 599: all but the text's first token
MEMORY_TOKENS, MEMORY_WINDOW = 4096, 256


def traces_of(model, tokenizer, text: str, window: int = 512) -> list:
    ids = tokenizer.encode(text)
    return [model.trace(ids[i : i + window], tokenizer=tokenizer) for i in range(0, len(ids), window)]


def domains_study(model, tokenizer) -> None:
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


def context_agreement(model, ids, start: int, stop: int, context: int) -> np.ndarray:
    """Per sparse layer ``[S]``: the share of tokens ``start..stop-1`` of ``ids`` whose top-1 expert,
    traced after only ``context`` tokens before ``start``, equals that of one pass over ``ids[:stop]``."""
    single_pass = model.trace(ids[:stop]).expert_ids[:, start:stop, 0]
    short = model.trace(ids[start - context : stop]).expert_ids[:, context:, 0]
    return (short == single_pass).mean(axis=1)


def context_study(model, tokenizer) -> None:
    ids = tokenizer.encode(inspect.getsource(json.decoder))
    start, stop = TRACED_TOKENS
    layers = " / ".join(str(layer) for layer in model.config.sparse_layers)
    print(f"\ntokens {start}-{stop - 1} of json/decoder.py: top-1 agreement with one pass over tokens 0-{stop - 1}, "
          f"per sparse layer {layers}")
    for context in CONTEXTS:
        shares = context_agreement(model, ids, start, stop, context)
        print(f"  {context:>4} tokens of context: " + " / ".join(f"{100 * share:.1f}%" for share in shares))


def peak_traced_mib(model, ids, keep_logits: bool) -> float:
    tracemalloc.start()
    try:
        trace_text(model, ids, window=MEMORY_WINDOW, keep_logits=keep_logits, progress=False)
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def memory_study(model, tokenizer) -> None:
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, MEMORY_TOKENS)  # as tests/test_windows.py
    logits_mib = MEMORY_TOKENS * model.config.vocab_size * 4 / 2**20
    trace_text(model, ids, window=MEMORY_WINDOW, progress=False)  # warm: buffers a first run allocates once
    print(f"\ntracing {MEMORY_TOKENS} tokens in windows of {MEMORY_WINDOW}, peak NumPy allocations (tracemalloc):")
    print(f"  without the logits {peak_traced_mib(model, ids, False):.0f} MiB; "
          f"keeping them {peak_traced_mib(model, ids, True):.0f} MiB (the logits alone: {logits_mib:.0f} MiB)")


PARTS = {"domains": domains_study, "context": context_study, "memory": memory_study}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=minimoe.default_model_path())
    parser.add_argument("--part", choices=sorted(PARTS), action="append",
                        help="the measurement to run (repeatable); default: all of them")
    args = parser.parse_args()
    model, tokenizer = minimoe.load(args.model), minimoe.load_tokenizer(args.model)
    for part in args.part or PARTS:
        PARTS[part](model, tokenizer)


if __name__ == "__main__":
    main()
