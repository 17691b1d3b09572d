"""The bundled models' cards (README.md beside their weights), written from what training and evaluation measured.

Used by ``python scripts/train_bundled_model.py evaluate`` (and ``cards``, which rewrites them only).
Every number comes from ``training.json`` (written when a model was trained) or ``evaluation.json``
(written by ``evaluate``); nothing here is typed in by hand.
"""

from __future__ import annotations

from minimoe.assets import default_model_path
from minimoe.config import ModelConfig
from minimoe.inspect.params import count_parameters, format_count

MODELS = ("tiny-dense", "tiny-moe")  # the bundled models; evaluation.json may also hold a --baseline of one's own
DATA = """**Data.** The CPython {python} standard library's own `.py` sources (no tests, no idlelib) and the
`pydoc_data` help topics: text every Python install has, split into training and held-out documents by a
hash of their name ({stdlib_docs} held-out documents, {stdlib_tokens:,} tokens, never trained on). Python
outside the standard library is held out entirely: the sources of {third_party} ({third_docs} files,
{third_tokens:,} tokens)."""


def counts(kind: str) -> tuple[int, int]:
    """(total, activated per token) parameters of a bundled model, counted by minimoe.inspect.params."""
    count = count_parameters(ModelConfig.from_file(default_model_path(kind) / "config.json"))
    return count.total, count.activated


def loss_table(results: dict) -> str:
    """Held-out loss of every evaluated model on the same tokens, one row per (texts, window)."""
    models = [m for m in MODELS if m in results["models"]]
    head = "| held-out texts, window | " + " | ".join(models) + " | unigram |"
    lines = [head, "|---" * (len(models) + 2) + "|"]
    names = {"stdlib": "stdlib", "third_party": "outside the stdlib"}
    for name, label in names.items():
        for context in (256, 1024):
            cells = [results["models"][m].get(f"{name}_{context}") for m in models]
            cells = [f"{c:.3f}" if c is not None else "(context 256)" for c in cells]
            lines.append(f"| {label}, {context} tokens | " + " | ".join(cells)
                         + f" | {results['sets'][name]['unigram']:.3f} |")
    for name, label in names.items():
        cells = [f"{results['models'][m][f'{name}_slice']:.3f}" for m in models]
        lines.append(f"| shipped slice of {label} ({results['sets'][name]['slice_tokens']:,} tokens), 256 | "
                     + " | ".join(cells) + " | |")
    return "\n".join(lines)


def data_paragraph(results: dict) -> str:
    versions = results["third_party_versions"]
    return DATA.format(
        python=results["python"], stdlib_docs=len(results["held_out_documents"]["stdlib"]),
        stdlib_tokens=results["sets"]["stdlib"]["tokens"], third_docs=results["sets"]["third_party"]["documents"],
        third_party=" and ".join(f"{p} {v}" for p, v in versions.items()),
        third_tokens=results["sets"]["third_party"]["tokens"])


TRAINERS = {"minimoe.train": "minimoe's own trainer (NumPy backward, AdamW)"}
TORCH_TRAINER = "transformers + torch.optim.AdamW"  # every model trained before training.json said which


def training_line(log: dict) -> str:
    trainer = TRAINERS.get(log.get("trainer"), TORCH_TRAINER)
    return (f"{log['tokens_seen']:,} tokens ({log['steps']:,} steps of {log['batch']} windows of {log['context']} "
            f"tokens), AdamW, peak learning rate {log['peak_lr']}, cosine schedule, {log['train_minutes']} minutes "
            f"on {log['machine']}, trained by {trainer}")


def training_tokens(moe_log: dict, dense_log: dict) -> tuple[int, int]:
    """(tokens behind tiny-moe, counting its parent's training; tokens behind tiny-dense)."""
    moe = moe_log["tokens_seen"] + sum(stage["tokens_seen"] for stage in moe_log.get("more", []))
    return dense_log["tokens_seen"] + moe, dense_log["tokens_seen"]


def measured(results: dict, moe_log: dict, dense_log: dict) -> str:
    moe_tokens, dense_tokens = training_tokens(moe_log, dense_log)
    return f"""Held-out cross-entropy in nats per token (lower is better), every model on the same
{results['tokens_per_set']:,} held-out tokens of each kind: 50 chunks of 1024 tokens spread evenly over the
set, read whole or as windows of 256. The two were not trained on equal budgets: behind tiny-moe are
{moe_tokens / 1e6:.1f}M tokens (its parent's {dense_tokens / 1e6:.1f}M, then {(moe_tokens - dense_tokens) / 1e6:.1f}M as an MoE), behind tiny-dense
{dense_tokens / 1e6:.1f}M, so the gap between them is not the MoE architecture's alone. The upcycling experiment
(`docs/architecture.md`) sets an upcycled MoE against its parent trained on for the same tokens. The shipped slices (`tests/data/held_out/`,
the start of each set) are what `tests/test_bundled.py` recomputes with minimoe, standing in for the full sets.

{loss_table(results)}"""


def moe_card(results: dict, log: dict, dense_log: dict) -> str:
    total, active = counts("moe")
    upcycle, train = log["commands"]
    stages = log.get("more", [])  # further training stages, each from the weights the one before saved
    more_commands = "".join(f"\n{stage['command']}   # then trained on" for stage in stages)
    more_lines = "".join(f" Then, from those weights with a fresh optimizer: {training_line(stage)}." for stage in stages)
    return f"""# tiny-moe: a miniature Qwen1.5-MoE, bundled with minimoe

A small **Qwen2-MoE** (`Qwen2MoeForCausalLM`) with Qwen1.5-MoE-A2.7B's routing structure exactly:
60 routed experts, the top 4 chosen per token by a softmax router whose weights are not renormalised,
and a sigmoid-gated shared expert 4 experts wide. Like the real model, which the Qwen1.5-MoE blog says was
upcycled ("we start by repurposing our existing Qwen-1.8B, transforming it into Qwen1.5-MoE-A2.7B"), it
was made from a dense model: [tiny-dense](../tiny-dense/README.md), upcycled with `minimoe upcycle` (shuffled
copies of its FFN cut into experts, and half of each expert re-initialised: the Qwen2 Technical Report's
recipe, the closest published one, applied per neuron as Drop-Upcycling does), then trained on. It is a toy: it writes Python-flavoured text, not correct programs.

| | tiny-moe | Qwen1.5-MoE-A2.7B |
|---|---|---|
| layers | 4 | 24 |
| hidden size | 128 | 2048 |
| attention heads (key/value heads) | 4 (4) | 16 (16) |
| routed experts, chosen per token | 60, top-4 | 60, top-4 |
| expert width | 88 | 1408 |
| shared expert width (sigmoid-gated) | 352 (= 4 experts) | 5632 (= 4 experts) |
| dense parent's FFN width | 344 (tiny-dense) | 5504 (Qwen1.5-1.8B) |
| `norm_topk_prob` | false | false |
| vocabulary | 4096 (byte-level BPE) | 151936 |
| context (`max_position_embeddings`) | 1024, the context it was trained at | 8192 |
| parameters, total / activated per token | {format_count(total)} / {format_count(active)} | 14.3B / 2.7B |
| weights | bf16 safetensors | bf16 safetensors |

**How it was made.**

```
python scripts/train_bundled_model.py dense      # tiny-dense, from scratch
{upcycle}
{train}        # runs the line above, then trains{more_commands}
python scripts/train_bundled_model.py evaluate   # this card
```

At upcycling, before any MoE training, its loss on all the held-out stdlib tokens (in 1024-token windows)
was {log['held_out_loss_1024_at_upcycling']:.3f} nats/token, against the parent's {dense_log['held_out_loss_1024']:.3f} on the same tokens.
Training, with the router's load-balancing loss at coefficient {log['router_aux_loss_coef']} (Qwen1.5-MoE's config.json says 0.001): {training_line(log)}.{more_lines}

{data_paragraph(results)}

**What it learned.** {measured(results, log, dense_log)}

Prompts longer than 1024 tokens raise `MinimoeError`: positions past the training context were never
seen, so minimoe refuses them rather than report routing from a model outside what it learned.
"""


def dense_card(results: dict, log: dict, moe_log: dict) -> str:
    total, _ = counts("dense")
    return f"""# tiny-dense: the dense parent of minimoe's bundled MoE

A small dense **Qwen2** (`Qwen2ForCausalLM`), the parent [tiny-moe](../tiny-moe/README.md) was upcycled
from, as Qwen1.5-MoE-A2.7B was from Qwen-1.8B. Same tokenizer, attention, norms and embedding shapes as
tiny-moe; its FFN (344 wide) relates to tiny-moe's experts (88 wide) as Qwen1.5-1.8B's 5504 does to
Qwen1.5-MoE's 1408 (3.9 experts per FFN). The blog calls the parent Qwen-1.8B; the shapes here are from
Qwen1.5-1.8B's config (`minimoe/configs/qwen1.5-1.8b.json`). `minimoe.default_model_path("dense")` gives this folder.

| | tiny-dense | Qwen1.5-1.8B |
|---|---|---|
| layers | 4 | 24 |
| hidden size | 128 | 2048 |
| attention heads (key/value heads) | 4 (4) | 16 (16) |
| FFN width (SwiGLU) | 344 | 5504 |
| vocabulary | 4096 (byte-level BPE, trained with it) | 151936 |
| context (`max_position_embeddings`) | 1024, the context it was trained at | 32768 |
| parameters | {format_count(total)} | 1.8B |

**How it was made.** `{log['command']}`: the tokenizer, then the model from scratch.
Training: {training_line(log)}.

{data_paragraph(results)}

**What it learned.** {measured(results, moe_log, log)}
"""

