#!/usr/bin/env python
"""How far an upcycled MoE starts from its dense parent: KL of next-token distributions, per method.

Trains a small dense ``Qwen2ForCausalLM`` for a few minutes (transformers, as
``scripts/train_bundled_model.py`` does, on the same stdlib corpus with the bundled
tokenizer), upcycles it with :func:`minimoe.upcycle` in each method, and measures with
minimoe, on held-out windows, the mean KL(parent || child) of the next-token
distributions at initialisation.  Its dense FFN relates to the experts as
Qwen1.5-1.8B's 5504 does to Qwen1.5-MoE's 1408: 64 segments of 88 cut from an FFN of
344 (16.4 copies), 4 fused into the shared expert, 60 routed, top-4.

    python scripts/upcycle_kl.py --minutes 4

Needs the ``test`` extra (torch, transformers) for the training only.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import minimoe
from minimoe.inspect.tracing import log_softmax

from train_bundled_model import corpus, encode_all, held_out_loss

DENSE = dict(vocab_size=4096, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
             intermediate_size=344, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False,
             rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, bos_token_id=0, eos_token_id=2)
MOE = dict(num_experts=64, shared_experts=4, top_k=4, expert_size=88)
ARMS = [("copy", 0.0), ("qwen", 0.5), ("drop", 0.5), ("qwen", 0.1), ("qwen", 1.0), ("drop", 0.1), ("drop", 1.0)]


def train_dense(folder: Path, minutes: float, seed: int = 0) -> dict:
    """A dense Qwen2 trained for ``minutes`` on the stdlib corpus, saved in bf16 with the bundled tokenizer."""
    from tokenizers import Tokenizer
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    tokenizer_file = Path(minimoe.default_model_path()) / "tokenizer.json"
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    train_texts, held_texts, _ = corpus()
    train_ids, held_ids = encode_all(tokenizer, train_texts), encode_all(tokenizer, held_texts)
    model = Qwen2ForCausalLM(Qwen2Config(**DENSE))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    start, step = time.time(), 0
    while time.time() - start < minutes * 60:
        starts = rng.integers(0, len(train_ids) - 257, 16)
        batch = torch.from_numpy(np.stack([train_ids[s : s + 256] for s in starts]))
        model(batch, labels=batch.clone()).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
    model.to(torch.bfloat16).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((tokenizer_file.parent / name).read_bytes())
    loss = held_out_loss(minimoe.load(folder), held_ids, 255, max_windows=64)  # the saved (bf16) model's, by minimoe
    return {"steps": step, "minutes": minutes, "held_out_loss": loss, "held_ids": held_ids}


def mean_kl(parent, child, windows: list[np.ndarray]) -> float:
    """Mean over positions of KL(parent || child) of the next-token distributions, nats."""
    kls = []
    for ids in windows:
        p, q = log_softmax(parent.forward(ids)), log_softmax(child.forward(ids))
        kls.append((np.exp(p) * (p - q)).sum(-1))
    return float(np.concatenate(kls).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=4.0, help="training time of the dense parent")
    parser.add_argument("--windows", type=int, default=8, help="held-out windows of 255 tokens to measure on")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        dense_dir = Path(tmp) / "dense"
        trained = train_dense(dense_dir, args.minutes)
        held = trained.pop("held_ids")
        windows = [held[i * 255 : (i + 1) * 255] for i in range(args.windows)]
        parent = minimoe.load(dense_dir)
        print(f"dense parent: {trained['steps']} steps in {args.minutes} min, held-out loss "
              f"{trained['held_out_loss']:.3f} nats/token")
        results = []
        for method, reinit in ARMS:
            child_dir = Path(tmp) / f"{method}-{reinit}"
            minimoe.upcycle(dense_dir, child_dir, method=method, reinit=reinit, seed=0, **MOE)
            kl = mean_kl(parent, minimoe.load(child_dir), windows)
            results.append({"method": method, "reinit": reinit, "mean_kl": kl})
            print(f"{method:5s} reinit {reinit:.1f}: KL(parent || child) = {kl:.3f} nats/token", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"parent": trained, "moe": MOE, "arms": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
