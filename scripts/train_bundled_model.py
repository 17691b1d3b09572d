#!/usr/bin/env python
"""Train the two small models that ship inside minimoe: a dense parent, and the MoE upcycled from it.

The bundled MoE is a miniature of Qwen1.5-MoE-A2.7B made the way the blog says the real one
was made: "we start by repurposing our existing Qwen-1.8B, transforming it into
Qwen1.5-MoE-A2.7B".  Three steps, each a subcommand:

    python scripts/train_bundled_model.py dense      # train minimoe/assets/tiny-dense (a Qwen2, ~20 min)
    python scripts/train_bundled_model.py moe        # `minimoe upcycle` it, train on: minimoe/assets/tiny-moe (~40 min)
    python scripts/train_bundled_model.py more --tokens 5000000 --lr 1e-3 --seed 1   # a second stage (~30 min)
    python scripts/train_bundled_model.py evaluate   # [--baseline DIR: another model to measure beside them]
                                                      # held-out table, model cards, tests/data/held_out slices

Their shapes relate as the real ones do: the dense FFN (344) is to the expert width (88) as
Qwen1.5-1.8B's 5504 is to Qwen1.5-MoE's 1408, and the MoE has 64 segments per layer, 4 fused
into the sigmoid-gated shared expert and 60 routed, top-4, ``norm_topk_prob`` false.

Training is minimoe's own (:mod:`minimoe.train`: its NumPy forward and backward, AdamW with betas
(0.9, 0.95) and weight decay 0.1, gradients clipped to norm 1, a warm-up and a cosine to a tenth of
the peak; torch is only the reference the tests hold it to) on text every Python install has: the standard library's
own sources and the ``pydoc_data`` help topics, split into training and held-out documents by a
hash of their name.  Python outside the standard library (requests and jinja2, installed with the
``test`` extra) is held out entirely, to measure how far the models generalise.  Budgets are in
tokens, so a rerun on another machine does the same work.  Each model's training.json says which
trainer made it (``trainer``; the shipped ones were trained by transformers + ``torch.optim.AdamW``
with the same settings).  ``--assets DIR`` writes the models elsewhere.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import platform
import shutil
import sysconfig
import tempfile
import time
import zlib
from pathlib import Path

import ml_dtypes
import numpy as np

import minimoe
from minimoe.checkpoint.names import expected_shapes
from minimoe.checkpoint.writer import write_checkpoint
from minimoe.tokenizer import CHATML_TEMPLATE  # Qwen's ChatML, the bundled models' chat template
from minimoe.train import parameters
from minimoe.train.init import write_random_checkpoint
from minimoe.train.trainer import Settings, train
from minimoe.train.trainer import held_out_loss as windows_loss

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "minimoe" / "assets"
DENSE_DIR, MOE_DIR = ASSETS / "tiny-dense", ASSETS / "tiny-moe"
SLICES = ROOT / "tests" / "data" / "held_out"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CONTEXT = 1024  # trained at this many positions, so max_position_embeddings can say it
THIRD_PARTY = ("requests", "jinja2")  # held-out Python outside the stdlib (Apache-2.0, BSD-3-Clause)
GENERATED = {"jinja2/_identifier.py"}  # a generated Unicode regex, not code anyone wrote

COMMON = dict(
    vocab_size=4096, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
    max_position_embeddings=CONTEXT, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=0, eos_token_id=[0, 2],
)
DENSE = dict(COMMON, intermediate_size=344)  # 344 / 88 = 3.91, as 5504 / 1408
DENSE_CONFIG = dict(  # config.json of the dense parent, as transformers' Qwen2Config(**DENSE) writes it
    DENSE, architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_act="silu", initializer_range=0.02,
    attention_dropout=0.0, dtype="bfloat16", use_cache=True, use_sliding_window=False, sliding_window=None,
    max_window_layers=28, layer_types=["full_attention"] * COMMON["num_hidden_layers"], pad_token_id=None)
OPTIMIZER = dict(betas=(0.9, 0.95), weight_decay=0.1, clip=1.0, floor=0.1)  # minimoe.train.Settings' defaults
UPCYCLE = dict(experts=64, shared_experts=4, top_k=4, expert_size=88, method="qwen", reinit=0.5, seed=0)
AUX_LOSS = 0.01  # router load-balancing loss coefficient in training: ten times Qwen1.5-MoE's config.json (0.001)


# ----------------------------------------------------------------------------------------------- data

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


def third_party_corpus() -> tuple[list[str], list[str]]:
    """(texts, names): the installed sources of THIRD_PARTY packages, never trained on."""
    texts, names = [], []
    for package in THIRD_PARTY:
        root = Path(importlib.import_module(package).__file__).parent
        for path in sorted(root.rglob("*.py")):
            name = f"{package}/{path.relative_to(root)}"
            if name not in GENERATED:
                texts.append(path.read_text(encoding="utf-8", errors="replace"))
                names.append(name)
    return texts, names


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


def stdlib_ids(tokenizer, max_documents: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(training ids, held-out ids) of the stdlib corpus; training on its first ``max_documents`` only."""
    train_texts, held_texts, _ = corpus()
    return encode_all(tokenizer, train_texts[:max_documents]), encode_all(tokenizer, held_texts)


def windows(ids: np.ndarray, context: int) -> np.ndarray:
    """[n, context] consecutive non-overlapping windows of ``ids`` (the remainder dropped)."""
    n = len(ids) // context
    return ids[: n * context].reshape(n, context)


def unigram_loss(train_ids: np.ndarray, held_ids: np.ndarray, vocab: int) -> float:
    """Held-out cross-entropy (nats/token) of the training set's add-one-smoothed unigram distribution."""
    counts = np.bincount(train_ids, minlength=vocab) + 1.0
    log_probs = np.log(counts / counts.sum())
    return float(-log_probs[held_ids].mean())


# ----------------------------------------------------------------------------------------------- training

def held_out_loss(model, ids: np.ndarray, context: int, max_windows: int | None = 200) -> float:
    """Mean next-token cross-entropy (nats) over up to ``max_windows`` windows of ``context`` tokens (None: all)."""
    return windows_loss(model, windows(ids, context)[:max_windows])


def train_model(model, train_ids: np.ndarray, *, tokens: int, context: int, batch: int, lr: float, seed: int,
                warmup: int = 100, aux_loss_coef: float | None = None) -> dict:
    """Train ``model`` (minimoe.load's) on ``tokens`` tokens of random windows of ``train_ids``; the log's summary."""
    settings = Settings(tokens=tokens, context=context, batch=batch, lr=lr, warmup=warmup, seed=seed,
                        aux_loss_coef=aux_loss_coef)
    started = time.time()
    train(model, train_ids, settings)
    return {"steps": settings.steps, "tokens_seen": settings.steps * batch * context, "context": context,
            "batch": batch, "peak_lr": lr, "train_minutes": round((time.time() - started) / 60, 1),
            "trainer": "minimoe.train"}


def machine() -> str:
    cores = len(os.sched_getaffinity(0))
    return f"{platform.processor() or platform.machine()}, {cores} core{'s' * (cores > 1)}, numpy {np.__version__}"


def save(model, out: Path, tokenizer_dir: Path | None, tokenizer=None, config_updates: dict | None = None) -> None:
    """bf16 weights in the Hub's layout, the config, the tokenizer (trained or copied) and a generation config."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.safetensors*"):
        stale.unlink()
    params, shapes = parameters(model), expected_shapes(model.config)
    write_checkpoint(out, shapes, ml_dtypes.bfloat16,
                     ((name, params[name].astype(ml_dtypes.bfloat16)) for name in shapes))
    config = json.loads((model.checkpoint.folder / "config.json").read_text())
    config.update(dtype="bfloat16", **(config_updates or {}))
    config.pop("torch_dtype", None)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 0, "eos_token_id": [0, 2], "do_sample": True, "temperature": 0.8, "top_k": 40,
         "top_p": 0.95, "max_new_tokens": 64}, indent=2) + "\n")
    if tokenizer is not None:
        save_tokenizer(tokenizer, out)
    elif tokenizer_dir is not None and tokenizer_dir != out:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(tokenizer_dir / name, out / name)


def save_tokenizer(tokenizer, out: Path) -> None:
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "model_max_length": CONTEXT,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHATML_TEMPLATE,
    }, indent=2) + "\n")


def load_tokenizer(folder: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(folder / "tokenizer.json"))


def write_training_log(folder: Path, log: dict) -> None:
    """training.json beside the weights, which the model card is written from; printed too."""
    (folder / "training.json").write_text(json.dumps(log, indent=2) + "\n")
    print(json.dumps(log, indent=2))


def train_dense(args) -> None:
    """The dense parent, from scratch; it also trains the tokenizer both models share."""
    train_texts, held_texts, _ = corpus()
    tokenizer = train_tokenizer(train_texts, DENSE["vocab_size"])
    train_ids, held_ids = encode_all(tokenizer, train_texts), encode_all(tokenizer, held_texts)
    with tempfile.TemporaryDirectory() as tmp:
        start = write_random_checkpoint(DENSE_CONFIG, Path(tmp) / "scratch", seed=args.seed)
        save_tokenizer(tokenizer, start)
        model = minimoe.load(start)
        log = {"command": "python scripts/train_bundled_model.py dense",
               "parameters": minimoe.count_parameters(model.config).total}
        log.update(train_model(model, train_ids, tokens=args.tokens or 4_000_000, context=CONTEXT,
                               batch=args.batch, lr=args.lr or 3e-3, seed=args.seed))
        log.update(held_out_loss_1024=round(held_out_loss(model, held_ids, CONTEXT), 4), machine=machine())
        save(model, args.dense_dir, None, tokenizer)
    write_training_log(args.dense_dir, log)


def upcycle_command(dense: Path, out: Path) -> list[str]:
    """The `minimoe upcycle` command line that makes the bundled MoE's starting point."""
    u = UPCYCLE
    return ["minimoe", "upcycle", str(dense), str(out), "--experts", str(u["experts"]),
            "--shared-experts", str(u["shared_experts"]), "--top-k", str(u["top_k"]),
            "--expert-size", str(u["expert_size"]), "--method", u["method"], "--reinit", str(u["reinit"]),
            "--seed", str(u["seed"])]


def train_moe(args) -> None:
    """`minimoe upcycle` the dense parent, then train the MoE on the same corpus."""
    train_ids, held_ids = stdlib_ids(load_tokenizer(args.dense_dir))
    u = UPCYCLE
    with tempfile.TemporaryDirectory() as tmp:
        start = minimoe.upcycle(args.dense_dir, Path(tmp) / "upcycled", num_experts=u["experts"],
                                shared_experts=u["shared_experts"], top_k=u["top_k"], expert_size=u["expert_size"],
                                method=u["method"], reinit=u["reinit"], seed=u["seed"])
        model = minimoe.load(start)
        relative = upcycle_command(display_path(args.dense_dir), Path("/tmp/tiny-moe-upcycled"))
        log = {"commands": [" ".join(relative), "python scripts/train_bundled_model.py moe"],
               "parameters": minimoe.count_parameters(model.config).total, "router_aux_loss_coef": AUX_LOSS,
               "held_out_loss_1024_at_upcycling": round(held_out_loss(model, held_ids, CONTEXT), 4)}
        log.update(train_model(model, train_ids, tokens=args.tokens or 6_000_000, context=CONTEXT, batch=args.batch,
                               lr=args.lr or 2e-3, seed=args.seed, aux_loss_coef=AUX_LOSS))
        log.update(held_out_loss_1024=round(held_out_loss(model, held_ids, CONTEXT), 4), machine=machine())
        save(model, args.moe_dir, args.dense_dir, config_updates={"router_aux_loss_coef": AUX_LOSS})
    write_training_log(args.moe_dir, log)


def train_moe_more(args) -> None:
    """A second stage: the bundled MoE trained on from its saved weights, with a schedule of its own."""
    train_ids, held_ids = stdlib_ids(load_tokenizer(args.moe_dir))
    log = json.loads((args.moe_dir / "training.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:  # a copy to train from, as the folder itself is rewritten at the end
        start = Path(shutil.copytree(args.moe_dir, Path(tmp) / "start"))
        model = minimoe.load(start)
        stage = {"command": f"python scripts/train_bundled_model.py more --tokens {args.tokens} --lr {args.lr} "
                            f"--seed {args.seed}"}
        stage.update(train_model(model, train_ids, tokens=args.tokens, context=CONTEXT, batch=args.batch, lr=args.lr,
                                 seed=args.seed, aux_loss_coef=AUX_LOSS))
        stage.update(held_out_loss_1024=round(held_out_loss(model, held_ids, CONTEXT), 4), machine=machine())
        log.setdefault("more", []).append(stage)
        save(model, args.moe_dir, None)
    write_training_log(args.moe_dir, log)


def display_path(path: Path) -> Path:
    """``path`` relative to the repository when inside it (as training.json records commands)."""
    where = Path(path).resolve()
    return where.relative_to(ROOT) if where.is_relative_to(ROOT) else where


# ----------------------------------------------------------------------------------------------- evaluation

def spread_tokens(ids: np.ndarray, chunks: int, size: int) -> np.ndarray:
    """``chunks`` windows of ``size`` tokens evenly spaced over ``ids``, joined: ``[chunks * size]``."""
    every = windows(ids, size)
    return every[np.linspace(0, len(every) - 1, chunks).round().astype(int)].reshape(-1)


def slice_text(texts: list[str], chars: int = 20_000) -> str:
    """The first ``chars`` characters of the documents joined, cut at a line end: a held-out slice to ship."""
    joined = "\n".join(texts)[:chars]
    return joined[: joined.rfind("\n") + 1]


def slice_loss(model, tokenizer, text: str, context: int = 256) -> float:
    """Held-out loss on a shipped slice, as tests/test_bundled.py recomputes it."""
    return held_out_loss(model, np.array(tokenizer.encode(text).ids, dtype=np.int64), context)


def evaluate(args) -> None:
    """Every model on the same held-out tokens; writes evaluation.json, both cards and the shipped slices."""
    train_texts, held_texts, held_names = corpus()
    third_texts, third_names = third_party_corpus()
    tokenizer = load_tokenizer(args.moe_dir)
    train_ids = encode_all(tokenizer, train_texts)
    sets = {"stdlib": (held_texts, encode_all(tokenizer, held_texts)),
            "third_party": (third_texts, encode_all(tokenizer, third_texts))}
    SLICES.mkdir(parents=True, exist_ok=True)
    slices = {name: slice_text(texts) for name, (texts, _) in sets.items()}
    for name, text in slices.items():
        (SLICES / f"{name}.txt").write_text(text)
    spread = 50  # chunks of 1024 tokens evenly spaced over each set: 51,200 tokens, read whole or as 4 x 256
    models = {"tiny-moe": args.moe_dir, "tiny-dense": args.dense_dir}
    if args.baseline:
        models["baseline"] = args.baseline
    measured = {name: spread_tokens(ids, spread, CONTEXT) for name, (_, ids) in sets.items()}
    results = {"tokens_per_set": spread * CONTEXT, "sets": {}, "models": {}}
    for name, (texts, ids) in sets.items():
        results["sets"][name] = {"documents": len(texts), "tokens": int(len(ids)),
                                 "unigram": round(unigram_loss(train_ids, measured[name], 4096), 4),
                                 "slice_tokens": len(tokenizer.encode(slices[name]).ids)}
    for label, folder in models.items():
        model = minimoe.load(folder)
        assert load_tokenizer(Path(folder)).to_str() == tokenizer.to_str(), f"{folder}: another tokenizer"
        where = Path(folder).resolve()
        row = {"path": str(where.relative_to(ROOT)) if where.is_relative_to(ROOT) else where.name,
               "parameters": minimoe.count_parameters(model.config).total,
               "context": model.config.max_position_embeddings}
        for name in sets:
            for context in (256, 1024):
                if context <= row["context"]:
                    row[f"{name}_{context}"] = round(held_out_loss(model, measured[name], context, None), 4)
            row[f"{name}_slice"] = round(slice_loss(model, tokenizer, slices[name]), 4)
        results["models"][label] = row
        print(label, json.dumps(row), flush=True)
    results["held_out_documents"] = {"stdlib": held_names, "third_party": third_names}
    results["third_party_versions"] = {p: importlib.metadata.version(p) for p in THIRD_PARTY}
    results["python"] = platform.python_version()
    (args.moe_dir / "evaluation.json").write_text(json.dumps(results, indent=2) + "\n")
    write_cards(results, args.dense_dir, args.moe_dir)


def write_cards(results: dict, dense_dir: Path = DENSE_DIR, moe_dir: Path = MOE_DIR) -> None:
    """README.md beside each model's weights, from training.json and evaluation.json."""
    from model_cards import dense_card, moe_card

    dense_log, moe_log = (json.loads((folder / "training.json").read_text()) for folder in (dense_dir, moe_dir))
    (dense_dir / "README.md").write_text(dense_card(results, dense_log, moe_log))
    (moe_dir / "README.md").write_text(moe_card(results, moe_log, dense_log))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=["dense", "moe", "more", "evaluate", "cards"])
    parser.add_argument("--tokens", type=int, help="training tokens (dense 4M, moe 6M)")
    parser.add_argument("--batch", type=int, default=4, help="windows of 1024 tokens per step")
    parser.add_argument("--lr", type=float, help="peak learning rate (dense 3e-3, moe 2e-3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--baseline", type=Path, help="evaluate: also measure this model (same tokenizer) into evaluation.json")
    parser.add_argument("--assets", type=Path, default=ASSETS, help="where tiny-dense and tiny-moe are (default: "
                                                                   "minimoe/assets, the bundled models)")
    parser.add_argument("--threads", type=int, help="minimoe's threads (default: every core)")
    args = parser.parse_args()
    args.dense_dir, args.moe_dir = args.assets / DENSE_DIR.name, args.assets / MOE_DIR.name
    if args.threads:
        import minimoe.backend

        minimoe.backend.NUM_THREADS = args.threads
    if args.step == "cards":
        write_cards(json.loads((args.moe_dir / "evaluation.json").read_text()), args.dense_dir, args.moe_dir)
        return
    if args.step == "more" and not (args.tokens and args.lr):
        parser.error("more needs --tokens and --lr")
    {"dense": train_dense, "moe": train_moe, "more": train_moe_more, "evaluate": evaluate}[args.step](args)


if __name__ == "__main__":
    main()
