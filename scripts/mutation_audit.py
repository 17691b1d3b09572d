#!/usr/bin/env python
"""Plant small realistic bugs one at a time and report which ones the tests miss.

Each mutation replaces one exact piece of text in one source file of a temporary copy
of the repository, runs the tests most likely to notice (``pytest -x -q``, a few
files), and records the first failing test -- or that every test passed, i.e. the
bug *survived*.  The copy is restored after every mutation, so mutations never stack
and the working tree is never touched.

    python scripts/mutation_audit.py                     # every mutation
    python scripts/mutation_audit.py -k top_p -k eos     # those whose name contains a word
    python scripts/mutation_audit.py --tests-from REV    # today's code, the tests of git revision REV

``--tests-from`` measures how much a change to the tests helped: the same mutations of
the same code, judged by older tests.  A mutation whose text is not found (the code
moved on) is reported as ``n/a`` rather than silently skipped.  Not part of CI: a full
run takes 10-20 minutes on two busy cores.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COPY_IGNORE = shutil.ignore_patterns(".git", "__pycache__", ".hypothesis", ".pytest_cache", "*.egg-info",
                                     "notebooks", "docs", "site", "bench-out", "*.ipynb")

# pytest arguments per area: the files that test it, plus the parity checks a bug there would upset.
LOGIT_PARITY = "tests/test_parity.py::test_logits_match_transformers"
CONFIG_TESTS = ("tests/test_config.py", LOGIT_PARITY)
EOS_TESTS = ("tests/test_generate.py", "-k", "eos")
CHECKPOINT_TESTS = ("tests/test_checkpoint.py", LOGIT_PARITY)
GENERATE_TESTS = ("tests/test_generate.py", "tests/test_routing.py::test_trace_grows_through_generation_like_one_pass")
ROUTING_TESTS = ("tests/test_routing.py", "tests/test_parity.py::test_router_experts_and_aux_loss_match_transformers")


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]


def m(name: str, file: str, old: str, new: str, tests: tuple[str, ...]) -> Mutation:
    return Mutation(name, file, old, new, tests)


CONFIG, CHECKPOINT, GENERATE = "minimoe/config.py", "minimoe/checkpoint.py", "minimoe/generate.py"
ROUTING, LAYERS, MODEL = "minimoe/routing.py", "minimoe/layers.py", "minimoe/model.py"
FAMILY_TESTS = ("tests/test_parity.py", "-k", "mixtral or olmoe or qwen3")

MUTATIONS = [
    # --- config: defaults, explicit fields, the sparse-layer rule --------------------------------------
    m("config: norm_topk_prob defaults to true", CONFIG,
      'optional("norm_topk_prob", family.norm_topk_prob, bool)', 'optional("norm_topk_prob", True, bool)', CONFIG_TESTS),
    m("config: decoder_sparse_step defaults to 2", CONFIG,
      'optional("decoder_sparse_step", 1, int)', 'optional("decoder_sparse_step", 2, int)', CONFIG_TESTS),
    m("config: router_aux_loss_coef defaults to 0.01", CONFIG,
      'optional("router_aux_loss_coef", 0.001, float)', 'optional("router_aux_loss_coef", 0.01, float)', CONFIG_TESTS),
    m("config: rope_theta defaults to 1e6", CONFIG,
      'raw.get("rope_theta", default_theta)', 'raw.get("rope_theta", 1000000.0)', CONFIG_TESTS),
    m("config: rms_norm_eps defaults to 1e-5", CONFIG,
      'optional("rms_norm_eps", family.rms_norm_eps, float)', 'optional("rms_norm_eps", 1e-5, float)', CONFIG_TESTS),
    m("config: rms_norm_eps ignored when given", CONFIG,
      'rms_norm_eps=optional("rms_norm_eps", family.rms_norm_eps, float)', 'rms_norm_eps=family.rms_norm_eps',
      CONFIG_TESTS),
    m("config: explicit head_dim ignored", CONFIG,
      'head_dim = optional("head_dim", None, int)', 'head_dim = None', CONFIG_TESTS),
    m("config: num_key_value_heads defaults to the query heads", CONFIG,
      'optional("num_key_value_heads", family.num_key_value_heads or heads, int)', 'optional("num_key_value_heads", heads, int)',
      CONFIG_TESTS),
    m("config: tie_word_embeddings defaults to true", CONFIG,
      'optional("tie_word_embeddings", False, bool)', 'optional("tie_word_embeddings", True, bool)', CONFIG_TESTS),
    m("config: qkv_bias defaults to false", CONFIG,
      'optional("qkv_bias", True, bool)', 'optional("qkv_bias", False, bool)', CONFIG_TESTS),
    m("config: qkv_bias ignored when given", CONFIG,
      'qkv_bias=optional("qkv_bias", True, bool)', 'qkv_bias=True', CONFIG_TESTS),
    m("config: rope_parameters' theta ignored", CONFIG,
      'theta, rope_type = params["rope_theta"], params.get("rope_type", "default")',
      'theta, rope_type = 10000.0, params.get("rope_type", "default")', CONFIG_TESTS),
    m("config: sparse rule uses layer, not layer + 1", CONFIG,
      "(layer + 1) % self.decoder_sparse_step == 0", "layer % self.decoder_sparse_step == 0", CONFIG_TESTS),
    m("config: mlp_only_layers ignored", CONFIG,
      "layer not in self.mlp_only_layers\n            and", "", CONFIG_TESTS),
    m("config: eos list keeps only its first id", CONFIG,
      "return tuple(value)", "return value[0]", CONFIG_TESTS),
    m("model: eos from config.json, not generation_config.json", MODEL,
      'eos = self.generation_config.get("eos_token_id", self.config.eos_token_id)',
      'eos = self.config.eos_token_id', EOS_TESTS),
    # --- checkpoint: header validation and shard paths ---------------------------------------------------
    m("checkpoint: overlap check sorts by name", CHECKPOINT,
      "sorted(infos, key=lambda i: (i.begin, i.end))", "sorted(infos, key=lambda i: i.name)", CHECKPOINT_TESTS),
    m("checkpoint: overlap check in header order", CHECKPOINT,
      "sorted(infos, key=lambda i: (i.begin, i.end))", "list(infos)", CHECKPOINT_TESTS),
    m("checkpoint: adjacent tensors count as overlapping", CHECKPOINT,
      "info.begin < previous.end", "info.begin <= previous.end", CHECKPOINT_TESTS),
    m("checkpoint: scalar tensor takes no bytes", CHECKPOINT,
      "if shape else dtype.itemsize", "if shape else 0", CHECKPOINT_TESTS),
    m("checkpoint: tensor may not end at the end of the data", CHECKPOINT,
      "if end > data_size:", "if end >= data_size:", CHECKPOINT_TESTS),
    m("checkpoint: data section starts at the header", CHECKPOINT,
      "data_start = 8 + header_len", "data_start = header_len", CHECKPOINT_TESTS),
    m("checkpoint: shard name may hold a backslash", CHECKPOINT,
      ' and "\\\\" not in shard', "", CHECKPOINT_TESTS),
    m("checkpoint: shard name may hold a colon", CHECKPOINT,
      ' and ":" not in shard', "", CHECKPOINT_TESTS),
    m("checkpoint: shard name may be '.'", CHECKPOINT,
      'shard not in ("", ".", "..")', 'shard not in ("", "..")', CHECKPOINT_TESTS),
    m("checkpoint: index may put a tensor in the wrong shard", CHECKPOINT,
      "if found is None or found is not self.files[shard]:", "if found is None:", CHECKPOINT_TESTS),
    m("checkpoint: a tensor in two shards is accepted", CHECKPOINT,
      "if name in self._where:", "if False:", CHECKPOINT_TESTS),
    m("checkpoint: booleans count as sizes", CHECKPOINT,
      "isinstance(value, int) and not isinstance(value, bool) and value >= 0",
      "isinstance(value, int) and value >= 0", CHECKPOINT_TESTS),
    # --- generate: sampling filters, boundaries, stopping ------------------------------------------------
    m("top-p: keeps tokens whose running mass equals 1 - p", GENERATE,
      "dropped = mass_so_far <= 1 - p", "dropped = mass_so_far < 1 - p", GENERATE_TESTS),
    m("top-p: ties walked in reverse index order", GENERATE,
      'order = np.argsort(logits, kind="stable")', "order = np.argsort(-logits, kind=\"stable\")[::-1]",
      GENERATE_TESTS),
    m("top-p: may drop every token", GENERATE,
      "    dropped[-1] = False  # the most likely token always stays\n", "", GENERATE_TESTS),
    m("top-p: threshold p instead of 1 - p", GENERATE,
      "dropped = mass_so_far <= 1 - p", "dropped = mass_so_far <= p", GENERATE_TESTS),
    m("top-k: ties at the k-th logit dropped", GENERATE,
      "np.where(logits >= kth, logits, -np.inf)", "np.where(logits > kth, logits, -np.inf)", GENERATE_TESTS),
    m("top-k: applied after top-p", GENERATE,
      "    if top_k is not None:\n        logits = filter_top_k(logits, top_k)\n"
      "    if top_p is not None and top_p < 1.0:\n        logits = filter_top_p(logits, top_p)\n",
      "    if top_p is not None and top_p < 1.0:\n        logits = filter_top_p(logits, top_p)\n"
      "    if top_k is not None:\n        logits = filter_top_k(logits, top_k)\n", GENERATE_TESTS),
    m("temperature multiplies the logits", GENERATE,
      "np.asarray(logits, dtype=np.float64) / temperature", "np.asarray(logits, dtype=np.float64) * temperature",
      GENERATE_TESTS),
    m("top_p = 1 refused", GENERATE, "not 0 < top_p <= 1", "not 0 < top_p < 1", GENERATE_TESTS),
    m("context: prompt + new == context refused", GENERATE,
      "if prompt.size + max_new_tokens > context:", "if prompt.size + max_new_tokens >= context:", GENERATE_TESTS),
    m("context: one token past the context allowed up front", GENERATE,
      "if prompt.size + max_new_tokens > context:", "if prompt.size + max_new_tokens > context + 1:",
      GENERATE_TESTS),
    m("generate: reads one more token after the last", GENERATE,
      "        if step + 1 < max_new_tokens:\n            logits", "        if True:\n            logits",
      GENERATE_TESTS),
    m("generate: the eos token is not yielded", GENERATE,
      "        generated.append(token)\n        yield token\n        if token in eos",
      "        if token in eos:\n            return\n        generated.append(token)\n        yield token\n"
      "        if token in eos", GENERATE_TESTS),
    m("generate: seed ignored", GENERATE, "np.random.default_rng(seed)", "np.random.default_rng()", GENERATE_TESTS),
    # --- routing: the router's choice, traces, measuring interventions --------------------------------
    m("route: forced experts lowest probability first", LAYERS,
      "xp.argsort(-xp.take_along_axis(probs, expert_ids, -1), axis=-1",
      "xp.argsort(xp.take_along_axis(probs, expert_ids, -1), axis=-1", ROUTING_TESTS),
    m("route: norm_topk_prob ignored", LAYERS,
      "if norm_topk_prob else raw_weights", "if False else raw_weights", ROUTING_TESTS),
    m("route: disabled experts get logit 0, not -inf", LAYERS,
      "logits[:, list(disabled)] = -xp.inf", "logits[:, list(disabled)] = 0.0", ROUTING_TESTS),
    m("trace: attention_norm only for sparse layers", ROUTING,
      'recorder.stacked("attention_norm", range(config.num_hidden_layers))',
      'recorder.stacked("attention_norm", sparse)', ROUTING_TESTS),
    m("trace: concat joins per-layer arrays on the layer axis", ROUTING,
      "axis = TOKEN_AXIS.get(name, 1)\n            values", "axis = TOKEN_AXIS.get(name, 0)\n            values",
      ROUTING_TESTS),
    m("trace: rows report the raw probability as the weight", ROUTING,
      '"weight": float(self.expert_weights[s, t, rank])', '"weight": float(self.raw_weights[s, t, rank])',
      ROUTING_TESTS),
    m("measure: KL(intervened || original)", ROUTING,
      "kl=(np.exp(base) * (base - changed)).sum(-1)", "kl=(np.exp(changed) * (changed - base)).sum(-1)",
      ROUTING_TESTS),
    m("measure: KL without the reference weights", ROUTING,
      "kl=(np.exp(base) * (base - changed)).sum(-1)", "kl=(base - changed).mean(-1)", ROUTING_TESTS),
    m("measure: loss reported without the intervention", ROUTING,
      "loss=mean(nll)", "loss=mean(base_nll)", ROUTING_TESTS),
    m("measure: last_kl is the first position's", ROUTING, "last_kl=float(kl[-1])", "last_kl=float(kl[0])",
      ROUTING_TESTS),
    m("measure: loss predicts each token from its own position", ROUTING,
      "nll=-changed[rows, next_ids]", "nll=-changed[rows + 1, next_ids]",
      ROUTING_TESTS),
    m("measure: top1_changed counts unchanged positions", ROUTING,
      "top1_changed=base.argmax(-1) != changed.argmax(-1)", "top1_changed=base.argmax(-1) == changed.argmax(-1)",
      ROUTING_TESTS),
    m("interventions: shared expert switched off in the listed layers' complement", ROUTING,
      "else layer in self.shared_expert", "else layer not in self.shared_expert", ROUTING_TESTS),
    # --- the MoE family: each difference from Qwen2-MoE ---------------------------------------------------
    m("family: Mixtral's top-2 weights not renormalised", CONFIG,
      'Family("MixtralForCausalLM", always_renormalise=True', 'Family("MixtralForCausalLM", always_renormalise=False',
      FAMILY_TESTS),
    m("family: OLMoE's q/k norm taken per head", MODEL,
      "if norm and not norm.per_head:  # OLMoE", "if norm and norm.per_head:  # OLMoE", FAMILY_TESTS),
    m("family: Qwen3-MoE's mlp_only_layers ignored", CONFIG,
      'qk_norm="head", experts_keys=("num_experts", "num_local_experts"),\n                        sparse_step=True',
      'qk_norm="head", experts_keys=("num_experts", "num_local_experts"),\n                        sparse_step=False',
      FAMILY_TESTS),
    m("family: Mixtral's gate and up matrices swapped", "minimoe/weights.py",
      '{"gate": "w1", "up": "w3", "down": "w2"}', '{"gate": "w3", "up": "w1", "down": "w2"}', FAMILY_TESTS),
]


def run_tests(copy: Path, tests: tuple[str, ...]) -> tuple[bool, str]:
    """(passed, the first failing test id or the last output line) for ``tests`` run in ``copy``."""
    env = dict(os.environ, PYTHONPATH=str(copy), PYTHONDONTWRITEBYTECODE="1")
    result = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-rf",
                             "--no-header", *tests], cwd=copy, env=env, capture_output=True, text=True)
    lines = result.stdout.splitlines()
    failed = [line.split(" ", 2)[1] for line in lines if line.startswith(("FAILED ", "ERROR "))]
    return result.returncode == 0, failed[0] if failed else (lines[-1] if lines else result.stderr[-200:])


def apply(copy: Path, mutation: Mutation) -> str | None:
    """Plant the mutation in ``copy``; returns the original text, or None when it does not apply once."""
    path = copy / mutation.file
    original = path.read_text()
    if original.count(mutation.old) != 1:
        return None
    path.write_text(original.replace(mutation.old, mutation.new))
    return original


def make_copy(tests_from: str | None) -> Path:
    copy = Path(tempfile.mkdtemp(prefix="mutation-audit-")) / "repo"
    shutil.copytree(ROOT, copy, ignore=COPY_IGNORE)
    if tests_from:
        shutil.rmtree(copy / "tests")
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", tests_from, "tests"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(copy)], input=archive, check=True)
    return copy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-k", action="append", default=[], help="only mutations whose name contains this")
    parser.add_argument("--tests-from", help="git revision whose tests/ judge today's code")
    args = parser.parse_args()
    chosen = [mu for mu in MUTATIONS if not args.k or any(word in mu.name for word in args.k)]
    # Stopped with kill: unwind as for Ctrl-C, so the running pytest is killed and the copy removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("mutation audit stopped"))
    copy = make_copy(args.tests_from)
    try:
        sanity = {tests: run_tests(copy, tests) for tests in {mu.tests for mu in chosen}}
        broken = {tests: out for tests, (ok, out) in sanity.items() if not ok}
        if broken:
            sys.exit(f"the unmutated code already fails: {broken}")
        rows, start = [], time.perf_counter()
        for mutation in chosen:
            original = apply(copy, mutation)
            if original is None:
                rows.append((mutation.name, "n/a (text not found once)"))
                continue
            try:
                passed, first_failure = run_tests(copy, mutation.tests)
            finally:
                (copy / mutation.file).write_text(original)
            rows.append((mutation.name, "SURVIVED" if passed else first_failure))
            print(f"{mutation.name:70s} {rows[-1][1]}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(copy.parent)
    applied = [r for r in rows if not r[1].startswith("n/a")]
    survived = [r for r in applied if r[1] == "SURVIVED"]
    print(f"\n| mutation | caught by |\n|---|---|")
    for name, outcome in rows:
        print(f"| {name} | {outcome} |")
    print(f"\n{len(survived)} of {len(applied)} applied mutations survived "
          f"({len(rows) - len(applied)} not applicable); {time.perf_counter() - start:.0f} s"
          + (f"; tests from {args.tests_from}" if args.tests_from else ""))


if __name__ == "__main__":
    main()
