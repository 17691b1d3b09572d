#!/usr/bin/env python
"""Train the small Qwen2-MoE that ships inside minimoe as its default model.

Same architecture family as Qwen1.5-MoE-A2.7B -- fine-grained routed experts with
top-k routing (softmax over all experts, no renormalisation) plus a sigmoid-gated
shared expert four experts wide -- scaled down to run anywhere.  It is trained
with transformers' ``Qwen2MoeForCausalLM`` (the reference implementation; needs the
``test`` extra) on text every Python install already has: the standard library's
own sources and the ``pydoc_data`` help topics.  Files are split by name into
training and held-out sets, so the held-out loss measures generalisation.

    python scripts/train_bundled_model.py --minutes 25

writes ``minimoe/assets/tiny-moe/``: config.json, model.safetensors (bf16),
tokenizer.json, tokenizer_config.json (ChatML chat template), generation_config.json,
and README.md, the model card with the measured numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sysconfig
import time
import zlib
from pathlib import Path

import numpy as np
import torch

from minimoe.tokenizer import CHATML_TEMPLATE  # Qwen's ChatML, the bundled model's chat template

OUT = Path(__file__).resolve().parent.parent / "minimoe" / "assets" / "tiny-moe"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

MODEL = dict(
    vocab_size=4096,
    hidden_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    intermediate_size=512,  # unused: every layer is sparse
    moe_intermediate_size=64,
    shared_expert_intermediate_size=256,  # = 4 experts' width, as in Qwen1.5-MoE (4 x 1408 = 5632)
    num_experts=16,
    num_experts_per_tok=4,
    norm_topk_prob=False,
    decoder_sparse_step=1,
    max_position_embeddings=1024,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    router_aux_loss_coef=0.01,
    bos_token_id=0,
    eos_token_id=[0, 2],
)


def corpus() -> tuple[list[str], list[str], list[str]]:
    """(train texts, held-out texts, held-out names): stdlib .py files and pydoc topics, split by name."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idlelib", "__pycache__"}
    documents = {}
    for path in sorted(stdlib.rglob("*.py")):
        if not skip & set(path.relative_to(stdlib).parts):
            documents[str(path.relative_to(stdlib))] = path.read_text(encoding="utf-8", errors="replace")
    from pydoc_data.topics import topics

    for name, text in sorted(topics.items()):
        documents[f"pydoc_data/topics/{name}"] = text
    train, held_out, held_out_names = [], [], []
    for name, text in documents.items():
        if zlib.crc32(name.encode()) % 20 == 0:  # a stable 5% of documents, chosen by name
            held_out.append(text)
            held_out_names.append(name)
        else:
            train.append(text)
    return train, held_out, held_out_names


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def encode_all(tokenizer, texts: list[str]) -> np.ndarray:
    """All documents as one stream of ids, each followed by <|endoftext|>."""
    eos = tokenizer.token_to_id("<|endoftext|>")
    ids = []
    for encoding in tokenizer.encode_batch(texts):
        ids.extend(encoding.ids)
        ids.append(eos)
    return np.array(ids, dtype=np.int64)


def unigram_loss(train_ids: np.ndarray, held_ids: np.ndarray, vocab: int) -> float:
    """Held-out cross-entropy (nats/token) of the training set's add-one-smoothed unigram distribution."""
    counts = np.bincount(train_ids, minlength=vocab) + 1.0
    log_probs = np.log(counts / counts.sum())
    return float(-log_probs[held_ids].mean())


@torch.no_grad()
def held_out_loss(model, ids: np.ndarray, context: int, max_windows: int = 200) -> float:
    model.eval()
    windows = [ids[start : start + context + 1] for start in range(0, len(ids) - context - 1, context)][:max_windows]
    losses = []
    for chunk in range(0, len(windows), 16):
        batch = torch.from_numpy(np.stack(windows[chunk : chunk + 16]))
        losses.append(model(batch[:, :-1], labels=batch[:, :-1].clone()).loss.item() * len(batch))
    model.train()
    return sum(losses) / len(windows)


def write_model_card(out: Path) -> None:
    """README.md beside the weights: what the model is, how it was trained, and what it learned."""
    metrics = json.loads((out / "metrics.json").read_text())
    config = json.loads((out / "config.json").read_text())
    gain = metrics["unigram_held_out_loss"] - metrics["held_out_loss"]
    card = f"""# tiny-moe: the model bundled with minimoe

A small **Qwen2-MoE** (`Qwen2MoeForCausalLM`, the architecture of Qwen1.5-MoE-A2.7B) trained so that
minimoe's demo, notebooks and tests run offline with a model whose text and routing mean something.
It is a toy: it writes Python-flavoured text, not correct programs.

| | tiny-moe | Qwen1.5-MoE-A2.7B |
|---|---|---|
| layers | {config["num_hidden_layers"]} | 24 |
| hidden size | {config["hidden_size"]} | 2048 |
| attention heads (kv heads) | {config["num_attention_heads"]} ({config["num_key_value_heads"]}) | 16 (16) |
| routed experts, chosen per token | {config["num_experts"]}, top-{config["num_experts_per_tok"]} | 60, top-4 |
| expert width | {config["moe_intermediate_size"]} | 1408 |
| shared expert width (sigmoid-gated) | {config["shared_expert_intermediate_size"]} (= 4 experts) | 5632 (= 4 experts) |
| `norm_topk_prob` | {str(config["norm_topk_prob"]).lower()} | false |
| vocabulary | {config["vocab_size"]} (byte-level BPE) | 151936 |
| parameters | {metrics["parameters"]:,} | 14.3B |
| weights | bf16 safetensors | bf16 safetensors |

**Data.** The CPython {metrics.get("python", platform.python_version())} standard library's own `.py` sources (no tests, no idlelib) and
the `pydoc_data` help topics: text every Python install has. Documents are split by a hash of their name:
{metrics["train_tokens"]:,} training tokens, {metrics["held_out_tokens"]:,} held-out tokens from documents never
trained on (e.g. {", ".join(metrics["held_out_documents"][:4])}).

**Training.** transformers' `Qwen2MoeForCausalLM` (the reference implementation), AdamW, cosine schedule,
context 256, batch 16, router load-balancing loss at coefficient {config["router_aux_loss_coef"]}:
{metrics["steps"]:,} steps, {metrics["tokens_seen"]:,} tokens, {metrics["train_minutes"]} minutes of training
({metrics["total_minutes"]} in all, tokenizer included) on {metrics["machine"]}.

**What it learned.** Held-out cross-entropy **{metrics["held_out_loss"]:.3f} nats/token**, against
**{metrics["unigram_held_out_loss"]:.3f}** for a unigram model of the training tokens (add-one smoothed):
{gain:.2f} nats/token better, a perplexity of {math.exp(metrics["held_out_loss"]):.1f} against
{math.exp(metrics["unigram_held_out_loss"]):.1f}.

Rebuild it with `python scripts/train_bundled_model.py` (needs the `test` extra: torch and transformers).
"""
    (out / "README.md").write_text(card)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=25.0, help="training time budget")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--card-only", action="store_true", help="only rewrite README.md from metrics.json")
    args = parser.parse_args()
    if args.card_only:
        write_model_card(args.out)
        return

    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    started = time.time()
    train_texts, held_texts, held_names = corpus()
    tokenizer = train_tokenizer(train_texts, MODEL["vocab_size"])
    train_ids, held_ids = encode_all(tokenizer, train_texts), encode_all(tokenizer, held_texts)
    print(f"corpus: {len(train_texts)} train docs ({len(train_ids):,} tokens), "
          f"{len(held_texts)} held-out docs ({len(held_ids):,} tokens)", flush=True)

    model = Qwen2MoeForCausalLM(Qwen2MoeConfig(**MODEL))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    budget = args.minutes * 60
    warmup, step, tokens_seen, train_start = 100, 0, 0, time.time()
    while (elapsed := time.time() - train_start) < budget:
        progress = elapsed / budget
        lr = args.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        starts = rng.integers(0, len(train_ids) - args.context - 1, args.batch)
        batch = torch.from_numpy(np.stack([train_ids[s : s + args.context] for s in starts]))
        out = model(batch, labels=batch.clone(), output_router_logits=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += batch.numel()
        if step % 100 == 0:
            print(f"step {step:5d}  {elapsed / 60:5.1f} min  loss {out.loss.item():.3f}  "
                  f"aux {out.aux_loss.item():.3f}  lr {lr:.2e}  {tokens_seen / elapsed:,.0f} tok/s", flush=True)
    train_minutes = (time.time() - train_start) / 60

    held_model = held_out_loss(model, held_ids, args.context)
    held_unigram = unigram_loss(train_ids, held_ids, MODEL["vocab_size"])
    print(f"held-out loss {held_model:.3f} nats/token vs unigram {held_unigram:.3f}", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(args.out)
    (args.out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 0, "eos_token_id": [0, 2], "do_sample": True, "temperature": 0.8, "top_k": 40,
         "top_p": 0.95, "max_new_tokens": 64}, indent=2) + "\n")
    tokenizer.save(str(args.out / "tokenizer.json"))
    (args.out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "model_max_length": MODEL["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
        "chat_template": CHATML_TEMPLATE,
    }, indent=2) + "\n")
    metrics = {
        "train_tokens": int(len(train_ids)), "held_out_tokens": int(len(held_ids)),
        "steps": step, "tokens_seen": tokens_seen, "train_minutes": round(train_minutes, 1),
        "total_minutes": round((time.time() - started) / 60, 1),
        "held_out_loss": round(held_model, 4), "unigram_held_out_loss": round(held_unigram, 4),
        "parameters": sum(p.numel() for p in model.parameters()),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "python": platform.python_version(),
        "held_out_documents": held_names[:10] + (["..."] if len(held_names) > 10 else []),
    }
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    write_model_card(args.out)
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
