"""The ``minimoe`` command line: demo, generate, chat, inspect, params, bench, upcycle, train, atlas.

``--model`` defaults to the small MoE bundled with minimoe, so every command runs
offline on a fresh install.  Exit codes: 0 success; 1 bad input (a
:class:`~minimoe.errors.MinimoeError`: the message says what and where); 2 a usage
error; 130 interrupted.  ``bench`` exits 1 when an engine could not be run at all
(e.g. transformers not installed), after printing the others' results; an engine
stopped for lack of memory is a result, reported as such, and exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

from .. import __version__
from ..assets import BUNDLED_MODELS, default_model_path
from ..atlas.command import add_parser as add_atlas_parser
from ..config import shipped_configs
from ..errors import MinimoeError
from ..files import write_text
from ..generate import check_prompt, check_sampling
from ..inspect.params import Architecture, count_parameters, describe_architecture, describe_model, format_count
from .upcycle import METHODS, ROUTER_STD

# The prompt stops three spaces into the body's indentation, where the tokenizer splits it: byte-level BPE
# cuts "\n    return" into "\n   " + " return". A prompt ending at a bare "\n" asks for a line that starts
# at column 0, and the model (rightly) continues with a comment or a new def instead of a body.
DEMO_PROMPT = "def read_config(path):\n   "


def resolve_config(spec: str) -> Path:
    """A model folder, a config.json path, or the name of a shipped config."""
    path = Path(spec)
    if path.exists():
        return path
    shipped = shipped_configs()
    if spec in shipped:
        return shipped[spec]
    raise MinimoeError(f"{spec}: no such folder or file, and not a shipped config (one of: {', '.join(shipped)})")


def open_model(args: argparse.Namespace):
    """Load ``--model`` and its tokenizer, with a progress bar for large checkpoints."""
    from tqdm import tqdm

    from ..loading import load
    from ..tokenizer import load_tokenizer

    model = load(args.model, progress=lambda items, **kw: tqdm(list(items), leave=False, disable=None, **kw))
    return model, load_tokenizer(args.model)


# --- params --------------------------------------------------------------------------

def cmd_params(args: argparse.Namespace) -> None:
    print_parameter_counts(args.model, Architecture.from_file(resolve_config(args.model)))


def print_parameter_counts(name: str, architecture: Architecture) -> None:
    """The architecture in one line, then total / activated / activated non-embedding parameters."""
    print(f"{name}: {describe_architecture(architecture)}")
    for label, count in count_parameters(architecture).rows():
        print(f"  {label:26s} {format_count(count):>8s}  ({count:,})")


# --- upcycle -------------------------------------------------------------------------

def cmd_upcycle(args: argparse.Namespace) -> None:
    from ..config import ModelConfig
    from .upcycle import Recipe, upcycle, upcycled_config

    if args.method == "copy" and args.reinit is not None:
        raise MinimoeError("--reinit has no effect with --method copy, which re-initialises nothing")
    reinit = 0.5 if args.reinit is None else args.reinit
    recipe = Recipe(args.experts, args.shared_experts, args.top_k, args.expert_size, args.method, reinit, args.seed,
                    args.norm_topk_prob, args.router_std)
    if args.dry_run:  # a config alone will do, a shipped one too (as for `minimoe params`)
        config = upcycled_config(resolve_config(str(args.dense)), recipe)
        print(json.dumps(config, indent=2))
        moe = ModelConfig.from_dict(config, source=f"{args.out}/config.json")
        print_parameter_counts(str(args.out), Architecture.from_model_config(moe))
        return
    if not args.dense.exists() and str(args.dense) in shipped_configs():
        raise MinimoeError(f"{args.dense} is a shipped config, without weights to cut into experts: it works with "
                           "--dry-run only; upcycling itself needs the dense checkpoint's folder")
    from tqdm import tqdm

    upcycle(args.dense, args.out, **vars(recipe), force=args.force,
            progress=lambda items, **kw: tqdm(items, disable=None, **kw))
    print_parameter_counts(f"{args.out}: upcycled from {args.dense} ({args.method})",
                           Architecture.from_file(args.out))
    print(textwrap.fill("Untrained: its experts are pieces of the dense FFN and its router is random, so its "
                        "predictions start away from the dense model's until it is trained on (docs/architecture.md "
                        "measures how far, and in the upcycling experiment how training closes the gap).", width=100))


# --- generate ------------------------------------------------------------------------

def sampling_options(args: argparse.Namespace, model) -> dict:
    """Sampling flags, defaulting to the checkpoint's generation_config.json (greedy if it has none)."""
    defaults = model.generation_config
    sample = defaults.get("do_sample", False)
    temperature = args.temperature if args.temperature is not None else (defaults.get("temperature", 1.0) if sample else 0.0)
    return dict(
        temperature=temperature,
        top_k=args.top_k if args.top_k is not None else (defaults.get("top_k") if sample else None),
        top_p=args.top_p if args.top_p is not None else (defaults.get("top_p") if sample else None),
        seed=args.seed,
    )


def check_sampling_flags(args: argparse.Namespace) -> None:
    """The sampling flags, checked before anything is loaded or printed (``main`` runs this first)."""
    check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed, args.stop, as_flags=True)


def prompt_ids(model, tokenizer, prompt: str, args: argparse.Namespace) -> list[int]:
    """``prompt``'s token ids, checked to be some, in the model's vocabulary, and to leave ``--max-new-tokens``
    positions in the context: a bad prompt fails before anything is printed."""
    ids = tokenizer.encode(prompt)
    if not ids:
        raise MinimoeError("the prompt is empty: give --prompt a text to continue")
    check_prompt(model.check_ids(ids), args.max_new_tokens, model.config.max_position_embeddings)
    return ids


def stream_text(model, tokenizer, ids: list[int], args: argparse.Namespace, out=sys.stdout) -> tuple[list[int], float]:
    """Generate after ``ids``, printing text as it completes; returns (new ids, seconds)."""
    decoder = tokenizer.stream(skip_special_tokens=True)
    generated: list[int] = []
    start = time.perf_counter()
    for token in model.generate_stream(ids, args.max_new_tokens, stop_strings=args.stop, tokenizer=tokenizer,
                                       **sampling_options(args, model)):
        generated.append(token)
        out.write(decoder.push(token))
        out.flush()
    out.write(decoder.flush())
    return generated, time.perf_counter() - start


def cmd_generate(args: argparse.Namespace) -> None:
    model, tokenizer = open_model(args)
    prompt = args.prompt
    if args.chat:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    ids = prompt_ids(model, tokenizer, prompt, args)
    if not args.chat:
        sys.stdout.write(prompt)
    generated, seconds = stream_text(model, tokenizer, ids, args)
    print()
    print(f"[{len(generated)} tokens in {seconds:.2f} s: {len(generated) / seconds:.1f} tokens/s]", file=sys.stderr)


# --- chat ----------------------------------------------------------------------------

def is_bundled(path: Path) -> bool:
    """Whether ``path`` is one of the models bundled with minimoe (the MoE or its dense parent)."""
    return Path(path).resolve() in {folder.resolve() for folder in BUNDLED_MODELS.values()}


def cmd_chat(args: argparse.Namespace) -> None:
    model, tokenizer = open_model(args)
    history = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"minimoe chat with {args.model} ({describe_model(model.config)}). Empty line or Ctrl-D to quit.")
    if is_bundled(args.model):  # on stderr, so that it shows even when the conversation is piped
        print(textwrap.fill(f"The bundled model ({args.model.name}) is a base model trained on the Python standard "
                            "library's sources, not a chat model: it answers every message with Python-flavoured "
                            "text. For a conversation, pass --model a chat checkpoint, e.g. a downloaded "
                            "Qwen1.5-MoE-A2.7B-Chat.", width=100), file=sys.stderr)
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        if not line.strip():
            break
        history.append({"role": "user", "content": line})
        ids = tokenizer.apply_chat_template(history, add_generation_prompt=True, tokenize=True)
        sys.stdout.write("assistant> ")
        generated, _ = stream_text(model, tokenizer, ids, args)
        print()
        history.append({"role": "assistant", "content": tokenizer.decode(generated, skip_special_tokens=True)})


# --- demo ----------------------------------------------------------------------------

TOKEN_COLUMN = 16  # the routing table's first column: each token's repr, cut to fit
LAYER_GAP = "  "  # between the routing table's layer groups


def routing_cell(trace, s: int, t: int, shared: bool) -> str:
    """Token ``t`` in sparse layer ``s``: its experts (highest weight first), their weights' sum, the shared gate."""
    cell = " ".join(f"{e:2d}" for e in trace.expert_ids[s, t]) + f" {trace.expert_weights[s, t].sum():4.2f}"
    return cell + (f" {trace.shared_gate[s, t]:6.2f}" if shared else "")


def routing_table(trace, prompt_tokens: int | None = None, shared: bool = True) -> list[str]:
    """Two header lines, then one line per token (and, given ``prompt_tokens``, a rule after the prompt's).

    Each sparse layer gets the ids of the experts the token chose (highest weight first),
    the sum of their weights and, with ``shared``, the shared expert's sigmoid gate.
    """
    subheader = "experts".ljust(3 * trace.top_k - 1) + "  sum" + (" shared" if shared else "")  # as wide as a cell
    layer_names = (f"layer {layer}".ljust(len(subheader)) for layer in trace.layers)
    lines = ["token".ljust(TOKEN_COLUMN) + LAYER_GAP.join(layer_names),
             " " * TOKEN_COLUMN + LAYER_GAP.join(subheader for _ in trace.layers)]
    rows = [repr(text)[: TOKEN_COLUMN - 1].ljust(TOKEN_COLUMN)
            + LAYER_GAP.join(routing_cell(trace, s, t, shared) for s in range(len(trace.layers)))
            for t, text in enumerate(trace.tokens)]
    if prompt_tokens is not None:
        rows.insert(prompt_tokens, f"---- {prompt_tokens} prompt tokens above, "
                                   f"{trace.num_tokens - prompt_tokens} generated below ----")
    return [line.rstrip() for line in lines + rows]


def routing_legend(config) -> str:
    """What the routing table's columns are, for this model's gating rule (wrapped to 100 columns)."""
    weights = ("1, because the top-k weights are renormalised (norm_topk_prob)" if config.norm_topk_prob else
               "below 1, because the top-k weights are not renormalised (norm_topk_prob is false, as in Qwen1.5-MoE)")
    legend = (f"Routing: for each token, in each sparse layer, the {config.num_experts_per_tok} experts "
              f"(of {config.num_experts}) the router chose, highest weight first; 'sum' is the sum of their weights, "
              f"the router's softmax probabilities: {weights}.")
    if config.has_shared_expert:
        legend += (" 'shared' is the shared expert's gate, the sigmoid of a learned linear function of the token's "
                   "hidden state (0 to 1), which scales the shared expert's output for that token: the shared expert "
                   "runs on every token, beside the routed ones.")
    legend += " The dashed rule marks where the prompt ends and the generated tokens begin."
    return textwrap.fill(legend, width=100)


def cmd_demo(args: argparse.Namespace) -> None:
    model, tokenizer = open_model(args)
    if not model.config.sparse_layers:
        raise MinimoeError(f"{args.model}: a dense model, with no router: there is no routing to show "
                           "(minimoe generate runs it)")
    ids = prompt_ids(model, tokenizer, args.prompt, args)  # every check done: from here on, only output
    print(f"minimoe demo: {args.model}")
    print(f"  {describe_model(model.config)}\n")
    print(f"--- prompt ({len(ids)} token{'s' if len(ids) != 1 else ''}) ---")
    last_line = args.prompt.rsplit("\n", 1)[-1]  # "" when the prompt ends with a newline
    print(args.prompt, end="\n" if last_line else "")
    # The generation continues the prompt's last line: repeat it, so the continuation reads in place.
    print("--- generated" + (" (after the prompt's last line, repeated)" if last_line else "") + " ---")
    sys.stdout.write(last_line)
    generated, seconds = stream_text(model, tokenizer, ids, args)
    print(f"\n--- {len(generated)} tokens in {seconds:.2f} s ({len(generated) / seconds:.1f} tokens/s) ---\n")
    print(routing_legend(model.config) + "\n")
    # One forward over every token, the last generated one included (no decoding step has read it yet).
    trace = model.trace(ids + generated, tokenizer=tokenizer)
    print("\n".join(routing_table(trace, len(ids), shared=model.config.has_shared_expert)))


# --- inspect -------------------------------------------------------------------------

def read_text(args: argparse.Namespace) -> str:
    """The text to inspect: --text, or the contents of --file (UTF-8)."""
    if args.text is not None:
        return args.text
    try:
        return args.file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MinimoeError(f"{args.file}: no such file") from None
    except UnicodeDecodeError as exc:
        raise MinimoeError(f"{args.file}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise MinimoeError(f"{args.file}: cannot read it ({exc.strerror or exc})") from None


def expert_query(spec: str) -> tuple[int, int]:
    """``"LAYER:EXPERT"`` -> (layer, expert), for ``--expert``."""
    layer, sep, expert = spec.partition(":")
    if not (sep and layer.strip().isdigit() and expert.strip().isdigit()):
        raise argparse.ArgumentTypeError(f"{spec!r} is not LAYER:EXPERT (e.g. 2:7)")
    return int(layer), int(expert)


def cmd_inspect(args: argparse.Namespace) -> None:
    from ..inspect.report import build_report, query_lines

    text = read_text(args)
    model, tokenizer = open_model(args)
    report = build_report(model, tokenizer, text, window=args.window, overlap=args.overlap,
                          tokens=[*args.token, *args.token_id], experts=args.expert)
    print(f"traced {report.windowing.describe()}", file=sys.stderr)
    if args.token or args.token_id or args.expert:
        print("\n".join(query_lines(report.queries)))
    for path in report.write(args.out, args.data):
        print(path)


# --- train --------------------------------------------------------------------------

def cmd_train(args: argparse.Namespace) -> None:
    from ..train.trainer import Settings, train_folder

    settings = Settings(tokens=args.tokens, context=args.context, batch=args.batch, lr=args.lr,
                        warmup=args.warmup if args.warmup is not None else args.tokens // (args.batch * args.context) // 20,
                        aux_loss_coef=args.aux_loss_coef, seed=args.seed, save_every=args.save_every,
                        eval_every=args.eval_every, eval_windows=args.eval_windows)
    log = train_folder(args.model_dir, args.data, args.out, settings, eval_paths=args.eval or (), resume=args.resume)
    held = log["held_out"]["loss"]
    print(f"trained {settings.steps} steps: loss {log['curve']['loss'][0]:.3f} -> {log['curve']['loss'][-1]:.3f}"
          + (f", held-out {held[0]:.3f} -> {held[-1]:.3f}" if held else "") + f"; model in {args.out}")


# --- bench --------------------------------------------------------------------------

def cmd_bench(args: argparse.Namespace) -> None:
    from . import bench

    if args.roofline is not None:
        rows = bench.prefill_roofline(args.model, args.roofline or [64, 1024], args.repeat, args.seed)
        print("\n".join(bench.format_roofline(rows)))
        if args.json:
            write_text(args.json, json.dumps({"model": str(args.model), "roofline": rows}, indent=2) + "\n")
        return
    engines = ["minimoe"] + ([args.against] if args.against else [])
    summary = bench.benchmark(args.model, engines, args.prompt_tokens, args.new_tokens, args.repeat, seed=args.seed,
                              threads=args.threads, memory_limit_gb=args.memory_limit_gb)
    print("\n".join(bench.format_table(summary)))
    if args.json:
        write_text(args.json, json.dumps(summary, indent=2) + "\n")
    if failures := bench.unfinished(summary):
        raise MinimoeError("; ".join(failures))


# --- the parser ----------------------------------------------------------------------

def add_model_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=default_model_path(),
                        help="checkpoint folder (config.json, *.safetensors, tokenizer files); default: the bundled model")


def add_sampling_flags(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=f"default {max_new_tokens}")
    parser.add_argument("--temperature", type=float, help="0 is greedy; default from generation_config.json")
    parser.add_argument("--top-k", type=int, help="keep the k most likely tokens")
    parser.add_argument("--top-p", type=float, help="keep the most likely tokens up to this probability mass")
    parser.add_argument("--seed", type=int, default=0, help="random seed, for reproducible sampling (default 0)")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="stop once the generated text contains TEXT (repeatable)")
    parser.set_defaults(check_flags=check_sampling_flags)


class CommandParser(argparse.ArgumentParser):
    """A subcommand's parser: an argument it does not know is an error shown with this command's usage (argparse
    would hand it up to the top-level parser, whose usage says nothing about the command's flags)."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, unknown = super().parse_known_args(args, namespace)
        if unknown:
            self.error(f"unrecognized arguments: {' '.join(unknown)}")
        return namespace, unknown


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minimoe", description="A readable NumPy Qwen1.5-MoE (Qwen2-MoE).")
    parser.add_argument("--version", action="version", version=f"minimoe {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=CommandParser)

    demo = commands.add_parser("demo", help="generate with the bundled model and show the experts each token chose",
                               description="Generate a short continuation, then show per token and layer which "
                                           "experts the router chose.")
    add_model_flag(demo)
    demo.add_argument("--prompt", default=DEMO_PROMPT, help=f"default {DEMO_PROMPT!r}")
    add_sampling_flags(demo, max_new_tokens=24)
    demo.set_defaults(run=cmd_demo)

    generate = commands.add_parser("generate", help="stream a continuation of a prompt, then report tokens/s",
                                   description="Stream a continuation of --prompt; tokens/s is printed to stderr.")
    add_model_flag(generate)
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template as a user message")
    add_sampling_flags(generate, max_new_tokens=64)
    generate.set_defaults(run=cmd_generate)

    chat = commands.add_parser("chat", help="interactive chat using the checkpoint's chat template",
                               description="Chat line by line; the whole history goes through the chat template.")
    add_model_flag(chat)
    chat.add_argument("--system", help="a system message to start the conversation with")
    add_sampling_flags(chat, max_new_tokens=128)
    chat.set_defaults(run=cmd_chat)

    inspect = commands.add_parser(
        "inspect", help="write an HTML report of how a text is routed (plots, per-token experts, interventions)",
        description="Trace a text, analyse its routing and write into --out: report.html (self-contained: plots "
                    "embedded), the plots as PNG, and the routing as trace.npz (chosen experts, weights, shared gate; "
                    "RoutingTrace.load_npz reads it). The large formats only on request: --router-scores, --json, "
                    "--csv. A report written into a folder that holds an earlier one replaces that report's files, "
                    "listed in its report-files.txt, and touches no other file.")
    add_model_flag(inspect)
    source = inspect.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="the text to inspect")
    source.add_argument("--file", type=Path, help="a UTF-8 text file to inspect")
    inspect.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder to write the report into")
    inspect.add_argument("--window", type=int, help="tokens per forward pass for long texts (default: the model's "
                                                     "context); at most the context")
    inspect.add_argument("--overlap", type=int, help="tokens each window re-reads before the ones it traces, as "
                                                      "context (default: half the window)")
    inspect.add_argument("--token", action="append", default=[], metavar="TEXT",
                         help="where does this token go in each layer? A text without a leading space also asks "
                              "for its ' '-variant (' def' beside 'def'); repeatable")
    inspect.add_argument("--token-id", action="append", default=[], type=int, metavar="ID",
                         help="the same, by token id; repeatable")
    inspect.add_argument("--expert", action="append", default=[], type=expert_query, metavar="LAYER:EXPERT",
                         help="which tokens does this expert of this layer take? repeatable")
    inspect.add_argument("--router-scores", dest="data", action="append_const", const="router_scores", default=[],
                         help="trace.npz also keeps every expert's router logits and probabilities [S, T, E]")
    inspect.add_argument("--json", dest="data", action="append_const", const="json",
                         help="also write trace.json: every array of the trace as JSON (large)")
    inspect.add_argument("--csv", dest="data", action="append_const", const="csv",
                         help="also write routing.csv: one row per token x layer x chosen expert (large)")
    inspect.set_defaults(run=cmd_inspect)

    params = commands.add_parser(
        "params", help="count total, activated and activated non-embedding parameters from config.json",
        description="Count parameters from a config alone. MODEL is a checkpoint folder, a config.json, "
                    f"or a shipped config: {', '.join(shipped_configs())}. Default: the bundled model.")
    params.add_argument("model", nargs="?", default=str(default_model_path()),
                        help="checkpoint folder, config.json, or shipped config name")
    params.set_defaults(run=cmd_params)

    upcycle = commands.add_parser(
        "upcycle", help="make a Qwen2-MoE checkpoint from a dense Qwen2 one (upcycling, as the blog says Qwen1.5-MoE was made)",
        description="Cut each dense FFN into --experts segments of --expert-size neurons (--shared-experts of them "
                    "fused into the shared expert, the rest routed), copy attention, norms and embeddings, and write "
                    "the MoE to OUT_DIR. Qwen1.5-MoE-A2.7B from Qwen1.5-1.8B: --experts 64 --shared-experts 4 "
                    "--top-k 4 --expert-size 1408. Methods: copy (plain replicas), qwen (replicas shuffled, then "
                    "--reinit of each expert's neurons drawn afresh; the Qwen2 report's recipe), drop "
                    "(Drop-Upcycling: no shuffle, --reinit drawn afresh).")
    upcycle.add_argument("dense", type=Path, metavar="DENSE_DIR",
                         help="dense Qwen2 checkpoint folder (with --dry-run, a config.json or a shipped config name "
                              "such as qwen1.5-1.8b will do)")
    upcycle.add_argument("out", type=Path, metavar="OUT_DIR", help="folder to write the MoE checkpoint into")
    sizes = upcycle.add_argument_group("required arguments: the MoE's shape")
    sizes.add_argument("--experts", type=int, required=True, help="segments per layer, shared ones included")
    sizes.add_argument("--shared-experts", type=int, required=True, help="segments fused into the shared expert")
    sizes.add_argument("--top-k", type=int, required=True, help="routed experts per token")
    sizes.add_argument("--expert-size", type=int, required=True, help="neurons per expert")
    upcycle.add_argument("--method", choices=METHODS, default="qwen", help="default qwen")
    upcycle.add_argument("--reinit", type=float, help="fraction of each expert's neurons drawn afresh (default 0.5)")
    upcycle.add_argument("--seed", type=int, default=0, help="same seed, same bytes (default 0)")
    upcycle.add_argument("--norm-topk-prob", action="store_true", help="renormalise the top-k weights (Qwen1.5-MoE: no)")
    upcycle.add_argument("--router-std", type=float, default=ROUTER_STD,
                         help=f"std of the new router's weights (default {ROUTER_STD})")
    upcycle.add_argument("--dry-run", action="store_true",
                         help="read only DENSE_DIR's config.json; print the MoE's config.json and parameter counts, "
                              "write nothing")
    upcycle.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists and is not empty")
    upcycle.set_defaults(run=cmd_upcycle)

    train = commands.add_parser(
        "train", help="train a checkpoint on text files (NumPy forward, backward and AdamW), with resumable checkpoints",
        description="Train MODEL_DIR on windows of --context tokens sampled from the text under --data, in an order "
                    "set by --seed: AdamW (betas 0.9, 0.95; weight decay 0.1), gradients clipped to norm 1, a linear "
                    "warm-up and a cosine down to a tenth of --lr. Writes OUT/checkpoint-N (Hub layout, float32, with "
                    "the optimizer state), OUT/training.json and, at the end, the final model in OUT. --resume "
                    "continues the run in OUT exactly as if it had not stopped.")
    train.add_argument("model_dir", type=Path, metavar="MODEL_DIR", help="checkpoint folder to start from")
    train.add_argument("--data", nargs="+", required=True, metavar="PATH", help="text files or folders to train on")
    train.add_argument("--out", type=Path, required=True, help="folder for checkpoints and the trained model")
    train.add_argument("--tokens", type=int, required=True, help="training tokens; steps = tokens / (batch x context)")
    train.add_argument("--context", type=int, required=True, help="tokens per window")
    train.add_argument("--batch", type=int, required=True, help="windows per step")
    train.add_argument("--lr", type=float, required=True, help="peak learning rate")
    train.add_argument("--warmup", type=int, help="warm-up steps (default: 5%% of the steps)")
    train.add_argument("--aux-loss-coef", type=float, help="load-balancing loss weight (default: the config's)")
    train.add_argument("--eval", nargs="+", metavar="PATH", help="held-out text files or folders")
    train.add_argument("--eval-every", type=int, default=0, help="steps between held-out evaluations (default: "
                                                                 "at the start and the end only)")
    train.add_argument("--eval-windows", type=int, default=32, help="held-out windows per evaluation (default 32)")
    train.add_argument("--save-every", type=int, default=0, help="steps between checkpoints (default: at the end)")
    train.add_argument("--seed", type=int, default=0, help="the order of the windows (default 0)")
    train.add_argument("--resume", action="store_true", help="continue the run in OUT from its latest checkpoint")
    train.set_defaults(run=cmd_train)

    bench = commands.add_parser(
        "bench", help="measure prefill and decode tokens/s, time to first token, load time and peak memory",
        description="Benchmark minimoe (and, with --against, transformers in bf16) on one checkpoint, each engine in "
                    "its own child process: load, then a cold run and --repeat warm runs of a prefill of random "
                    "tokens and greedy decoding. Exits 1 if an engine could not be run (e.g. not installed); one "
                    "stopped for lack of memory is reported as out of memory.")
    add_model_flag(bench)
    bench.add_argument("--against", choices=["transformers"], help="also measure this engine, and the ratios")
    bench.add_argument("--prompt-tokens", type=int, default=64, help="prompt length (default 64)")
    bench.add_argument("--new-tokens", type=int, default=16, help="tokens to generate, at least 2 (default 16)")
    bench.add_argument("--repeat", type=int, default=3, help="warm runs after the cold one; their median is reported")
    bench.add_argument("--seed", type=int, default=0, help="seed of the random prompt (default 0)")
    bench.add_argument("--threads", type=int, help="threads for each engine (default: all cores)")
    bench.add_argument("--json", type=Path, metavar="FILE", help="also write the results here")
    bench.add_argument("--roofline", type=int, nargs="*", metavar="TOKENS",
                       help="instead: minimoe's warm prefill of these prompt lengths (default 64 1024) beside the "
                            "fastest NumPy could go on this machine (docs/benchmarks.md)")
    bench.add_argument("--memory-limit-gb", type=float, help=argparse.SUPPRESS)  # a tighter watchdog, for tests
    bench.set_defaults(run=cmd_bench)

    add_atlas_parser(commands, add_model_flag)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if check_flags := getattr(args, "check_flags", None):
            check_flags(args)  # before the command loads or prints anything
        args.run(args)
    except MinimoeError as exc:
        print(f"minimoe: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
