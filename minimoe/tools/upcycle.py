"""Upcycling: a dense Qwen2 checkpoint made into a fine-grained Qwen2-MoE one, as the blog says Qwen1.5-MoE was.

What the sources say, and which says what:

* The Qwen1.5-MoE blog: "we start by repurposing our existing Qwen-1.8B, transforming it into
  Qwen1.5-MoE-A2.7B. A noteworthy finding is that introducing randomness during initialization
  significantly expedites convergence". It names no recipe.
* The closest published recipe is the Qwen2 Technical Report's (arXiv 2407.10671, the section on
  expert initialization), given for Qwen2's MoE models; nothing Qwen published says Qwen1.5-MoE was
  made exactly this way (that it was is our assumption).  With expert width ``h_E``, ``n`` experts
  and dense FFN width ``h_FFN``: replicate the FFN ``ceil(n * h_E / h_FFN)`` times, **shuffle each
  copy along the intermediate dimension**, cut the concatenation into ``n`` experts of width ``h_E``
  (the remainder is discarded), then **randomly re-initialise 50% of each expert's parameters**.  The shuffling and
  the 50% are the report's, not the blog's (the blog only says "randomness").
* Sparse upcycling (Komatsuzaki et al., ICLR 2023): every expert starts as a copy of the dense
  FFN; the router is new and random; attention, norms and embeddings are copied.
* Drop-Upcycling (Nakamura et al., ICLR 2025, arXiv 2502.19261): re-initialise a fraction ``r``
  of each expert's intermediate neurons (a gate row, its up row and its down column together)
  from a normal distribution with the original matrix's mean and standard deviation; ``r = 0.5``
  was their best.

The one idea that makes all of this readable: a SwiGLU FFN is a **sum over its intermediate
neurons**, ``down(silu(gate h) * up h) = sum_i down[:, i] * silu(gate[i] . h) * (up[i] . h)``, so
any set of neurons is itself a (narrower) SwiGLU, and an expert can be written down as *the list
of dense neurons it holds*.  The recipe's steps are small functions over those lists:

    replicate(5504, 17)           -> [17, 5504]   neuron indices of 17 copies of the FFN
    shuffle(copies, rng)          -> [17, 5504]   each copy in its own random order
    cut_into_experts(copies, 64, 1408) -> [64, 1408]  consecutive segments; 3456 of 93568 left over
    FeedForward.take(neurons)     -> one expert's gate/up/down weights
    reinitialise(expert, 0.5, ..) -> half its neurons drawn afresh from N(mean, std)

Methods (``method=``): ``"copy"`` replicate and cut, nothing random (with ``expert_size`` equal to
the FFN width this is sparse upcycling); ``"qwen"`` replicate, shuffle, cut, re-initialise
``reinit`` of each expert's neurons (the report's recipe); ``"drop"`` replicate, cut, re-initialise
``reinit`` (Drop-Upcycling: no shuffle).  The report does not say how re-initialised values are
drawn; both random methods use Drop-Upcycling's N(mean, std) of the dense matrix, per matrix and layer.

Shared experts: ``num_experts`` counts every segment; the first ``shared_experts`` segments of a
layer are concatenated into the shared expert (Qwen1.5-MoE-A2.7B: 64 segments of 1408, of which
4 make the 5632-wide shared expert and 60 are routed).  That the shared expert is 4 fused segments
is our reading of the config (5632 = 4 x 1408); the blog says "4 shared experts".

What starts fresh, and why:

* The **router** (``mlp.gate.weight`` ``[E, H]``) is new, as in sparse upcycling: drawn from
  N(0, ``router_std``), 0.02 by default (transformers' ``initializer_range`` for Qwen2-MoE).  Small
  logits make the initial softmax nearly uniform, so no expert is favoured before training
  decides; ``router_std=0`` gives exactly uniform weights (what the exactness test uses).
* The **shared expert's gate** (``mlp.shared_expert_gate.weight`` ``[1, H]``) starts at zero, so
  ``sigmoid(0) = 0.5`` scales the shared expert by one half for every token: an input-independent
  start where the gate's gradient is largest, rather than a random per-token preference.
* Attention, norms, the embedding and the output head are copied unchanged.

Memory: the dense checkpoint is memory-mapped; the output is written one tensor at a time (one
expert, three tensors, at most), so upcycling Qwen1.5-1.8B into the 14.3B MoE needs a few hundred
MB, not the 28.6 GB it writes.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple

import numpy as np

from ..checkpoint.names import (EMBED, dense_mlp_prefix, expected_shapes, expert_prefix, router_name,
                                shared_expert_gate_name, shared_expert_prefix, swiglu_names)
from ..checkpoint.reader import Checkpoint
from ..checkpoint.writer import SHARD_BYTES, SIDE_FILES, write_checkpoint
from ..config import ModelConfig, read_config_file
from ..errors import MinimoeError
from ..layers import swiglu
from ..loading import check_shapes

METHODS = ("copy", "qwen", "drop")
ROUTER_STD = 0.02  # transformers' initializer_range for Qwen2-MoE
ROUTER_AUX_LOSS_COEF = 0.001  # Qwen1.5-MoE-A2.7B's config.json
# Files besides the weights that a checkpoint folder carries over unchanged.
# Independent random streams per layer (numpy SeedSequence entropy [seed, layer, stream, ...]), so that
# any one expert can be rebuilt alone, in any order, and the same seed always gives the same bytes.
SHUFFLE_STREAM, ROUTER_STREAM, SEGMENT_STREAM = 0, 1, 2


# --- the FFN as a list of neurons ------------------------------------------------------

class FeedForward(NamedTuple):
    """A SwiGLU MLP's weights: gate ``[F, H]``, up ``[F, H]``, down ``[H, F]``; neuron ``i`` is gate[i], up[i], down[:, i]."""

    gate: np.ndarray
    up: np.ndarray
    down: np.ndarray

    @property
    def width(self) -> int:
        """F, the number of intermediate neurons."""
        return self.gate.shape[0]

    def take(self, neurons: np.ndarray) -> "FeedForward":
        """The narrower SwiGLU made of the neurons ``neurons`` ``[k]`` (repeats allowed): ``[F, .]`` -> ``[k, .]``."""
        return FeedForward(self.gate[neurons], self.up[neurons], self.down[:, neurons])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """``down(silu(gate x) * up x)`` in float32 (:func:`minimoe.layers.swiglu`): x ``[N, H]`` -> ``[N, H]``."""
        gate, up, down = (np.asarray(w, dtype=np.float32) for w in self)
        return swiglu(np, x, lambda v: v @ gate.T, lambda v: v @ up.T, lambda v: v @ down.T)


def concat_neurons(parts: Iterable[FeedForward]) -> FeedForward:
    """Several SwiGLUs side by side as one wider one (their outputs summed): how segments become the shared expert."""
    parts = list(parts)
    return FeedForward(np.concatenate([p.gate for p in parts]), np.concatenate([p.up for p in parts]),
                       np.concatenate([p.down for p in parts], axis=1))


# --- the recipe's steps, over neuron indices --------------------------------------------

def replicate(ffn_width: int, copies: int) -> np.ndarray:
    """The dense FFN's neuron indices, ``copies`` times over: ``[copies, F]``, each row ``0 .. F-1``."""
    return np.tile(np.arange(ffn_width), (copies, 1))


def shuffle(replicas: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each copy in its own random order along the intermediate dimension: ``[copies, F]`` -> ``[copies, F]``.

    A permuted copy computes exactly the same function (the sum over neurons does not care about
    order); what changes is which neurons end up in the same expert when the copies are cut.
    """
    return rng.permuted(replicas, axis=1)


def cut_into_experts(replicas: np.ndarray, num_experts: int, expert_size: int) -> np.ndarray:
    """Concatenate the copies and cut consecutive segments: ``[copies, F]`` -> ``[num_experts, expert_size]``.

    What is left after ``num_experts * expert_size`` neurons is discarded, as the Qwen2 report says.
    """
    flat = replicas.reshape(-1)
    needed = num_experts * expert_size
    if needed > flat.size:
        raise MinimoeError(f"{num_experts} experts of {expert_size} neurons need {needed}, but the "
                           f"{replicas.shape[0]} copies hold {flat.size}")
    return flat[:needed].reshape(num_experts, expert_size)


def copies_needed(ffn_width: int, num_experts: int, expert_size: int) -> int:
    """``ceil(n * h_E / h_FFN)``: how many copies of the FFN the experts are cut from (17 for Qwen1.5-MoE)."""
    return math.ceil(num_experts * expert_size / ffn_width)


def segment_neurons(ffn_width: int, num_experts: int, expert_size: int, shuffled: bool,
                    rng: np.random.Generator | None = None) -> np.ndarray:
    """The dense neurons of every segment: replicate, shuffle (if ``shuffled``), cut. ``[num_experts, expert_size]``."""
    replicas = replicate(ffn_width, copies_needed(ffn_width, num_experts, expert_size))
    if shuffled:
        replicas = shuffle(replicas, rng)
    return cut_into_experts(replicas, num_experts, expert_size)


def weight_stats(ffn: FeedForward) -> dict[str, tuple[float, float]]:
    """(mean, std) of each dense matrix, the distribution Drop-Upcycling draws fresh neurons from."""
    stats = {}
    for role, weight in ffn._asdict().items():
        values = np.asarray(weight, dtype=np.float32)
        stats[role] = (float(values.mean(dtype=np.float64)), float(values.std(dtype=np.float64)))
    return stats


def reinitialise(expert: FeedForward, fraction: float, stats: dict[str, tuple[float, float]],
                 rng: np.random.Generator) -> tuple[FeedForward, np.ndarray]:
    """Draw ``round(fraction * width)`` whole neurons of ``expert`` afresh; returns (new expert, their positions).

    A neuron is its gate row, up row and down column together, each drawn from N(mean, std) of the
    dense matrix it came from (``stats``, from :func:`weight_stats`); every other neuron is left
    byte for byte as it was.  Shapes are unchanged: ``[k, H]``, ``[k, H]``, ``[H, k]``.
    """
    count = round(fraction * expert.width)
    chosen = np.sort(rng.choice(expert.width, size=count, replace=False))
    gate, up, down = (np.array(weight) for weight in expert)  # writable copies, stored dtype

    def draw(role: str, shape: tuple[int, int], dtype: np.dtype) -> np.ndarray:
        mean, std = stats[role]
        return (mean + std * rng.standard_normal(shape, dtype=np.float32)).astype(dtype)

    hidden = gate.shape[1]
    gate[chosen] = draw("gate", (count, hidden), gate.dtype)
    up[chosen] = draw("up", (count, hidden), up.dtype)
    down[:, chosen] = draw("down", (hidden, count), down.dtype)
    return FeedForward(gate, up, down), chosen


# --- options and the config they give ---------------------------------------------------

@dataclass(frozen=True)
class Recipe:
    """How to upcycle: ``num_experts`` segments per layer (shared ones included), ``shared_experts`` of
    them fused into the shared expert, ``top_k`` of the routed ones per token, each ``expert_size`` wide."""

    num_experts: int
    shared_experts: int
    top_k: int
    expert_size: int
    method: str = "qwen"
    reinit: float = 0.5
    seed: int = 0
    norm_topk_prob: bool = False
    router_std: float = ROUTER_STD

    @property
    def routed_experts(self) -> int:
        return self.num_experts - self.shared_experts

    @property
    def reinit_fraction(self) -> float:
        """The fraction of each expert's neurons drawn afresh: ``reinit``, or 0 for ``"copy"``."""
        return 0.0 if self.method == "copy" else self.reinit

    def check(self, ffn_width: int, source: str) -> None:
        """Refuse options that cannot be carried out on a dense FFN of ``ffn_width`` neurons."""
        for field in ("num_experts", "shared_experts", "top_k", "expert_size", "seed"):
            value = getattr(self, field)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
                raise MinimoeError(f"{field} must be a non-negative integer, got {value!r}")
        if self.method not in METHODS:
            raise MinimoeError(f"method {self.method!r} is not one of {', '.join(map(repr, METHODS))}")
        if self.shared_experts >= self.num_experts:
            raise MinimoeError(
                f"shared_experts ({self.shared_experts}) must be fewer than num_experts ({self.num_experts}): "
                "num_experts counts every segment, the shared ones included, and at least one must be routed")
        if not 1 <= self.top_k <= self.routed_experts:
            raise MinimoeError(f"top_k ({self.top_k}) must be between 1 and the {self.routed_experts} routed experts "
                               f"(num_experts {self.num_experts} - shared_experts {self.shared_experts})")
        if not 1 <= self.expert_size <= ffn_width:
            raise MinimoeError(f"expert_size {self.expert_size} cannot be cut from the dense FFN of {source} "
                               f"(intermediate_size {ffn_width}): an expert holds 1 to {ffn_width} of its neurons")
        if not (isinstance(self.reinit, (int, float)) and 0.0 <= self.reinit <= 1.0):
            raise MinimoeError(f"reinit {self.reinit!r} is outside [0, 1] (the fraction of each expert's neurons "
                               "drawn afresh)")
        if not (isinstance(self.router_std, (int, float)) and 0.0 <= self.router_std < math.inf):
            raise MinimoeError(f"router_std {self.router_std!r} must be a finite number >= 0")


def read_dense_config(dense_path: str | Path) -> tuple[dict[str, Any], ModelConfig, str]:
    """The dense checkpoint's config.json (as parsed, and as a :class:`ModelConfig`) and its path; refuse any non-dense-Qwen2."""
    raw, source = read_config_file(dense_path)
    model_type = raw.get("model_type")
    if model_type == "qwen2_moe":
        raise MinimoeError(f"{source}: model_type 'qwen2_moe' is already a mixture of experts; "
                           "upcycling starts from a dense Qwen2 (Qwen2ForCausalLM, model_type 'qwen2')")
    if model_type != "qwen2":
        raise MinimoeError(f"{source}: model_type {model_type!r} is not a dense Qwen2; "
                           "upcycling starts from Qwen2ForCausalLM (model_type 'qwen2')")
    return raw, ModelConfig.from_dict(raw, source), source


def upcycled_config(dense_path: str | Path, recipe: Recipe) -> dict[str, Any]:
    """The config.json of the MoE that ``recipe`` makes from the dense checkpoint at ``dense_path``.

    Everything the dense config says is kept (attention, vocabulary, context, dtype, token ids); the
    MoE fields are added and every layer becomes sparse.  ``intermediate_size`` stays the dense FFN's
    width: only a dense layer would use it, and there is none.
    """
    raw, dense, source = read_dense_config(dense_path)
    recipe.check(dense.intermediate_size, source)
    moe = dict(raw, architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe",
               num_experts=recipe.routed_experts, num_experts_per_tok=recipe.top_k,
               moe_intermediate_size=recipe.expert_size,
               shared_expert_intermediate_size=recipe.shared_experts * recipe.expert_size,
               norm_topk_prob=recipe.norm_topk_prob, decoder_sparse_step=1, mlp_only_layers=[],
               router_aux_loss_coef=ROUTER_AUX_LOSS_COEF, output_router_logits=False)
    return dict(sorted(moe.items()))  # the key order save_pretrained writes


# --- the tensors of the MoE --------------------------------------------------------------

def upcycled_tensors(dense: Checkpoint, moe_config: ModelConfig, recipe: Recipe, dtype: np.dtype
                     ) -> tuple[dict[str, tuple[int, ...]], Iterator[tuple[str, np.ndarray]]]:
    """Every tensor of the MoE, in the order of :func:`~minimoe.checkpoint.names.expected_shapes`: (shapes, lazy stream).

    Tensors the dense model has (attention, norms, embedding, head) are copied; each layer's MoE
    tensors are built from its dense FFN when the stream reaches them.
    """
    shapes = expected_shapes(moe_config)
    layers = {layer: UpcycledLayer(dense, layer, recipe) for layer in moe_config.sparse_layers}

    @functools.lru_cache(maxsize=1)  # one expert in memory: its gate, up and down are written one after another
    def mlp(layer: int, which: int | None) -> FeedForward:
        return layers[layer].mlp(which)

    def projection(layer: int, which: int | None, role: str) -> np.ndarray:
        return getattr(mlp(layer, which), role)

    built: dict[str, Callable[[], np.ndarray]] = {}
    for layer, upcycled in layers.items():
        built[router_name(layer)] = upcycled.router
        built[shared_expert_gate_name(layer)] = upcycled.shared_gate
        prefixes = {e: expert_prefix(layer, e) for e in range(recipe.routed_experts)} | {None: shared_expert_prefix(layer)}
        for which, prefix in prefixes.items():
            for role, name in swiglu_names(prefix).items():
                built[name] = functools.partial(projection, layer, which, role)

    def stream() -> Iterator[tuple[str, np.ndarray]]:
        for name in shapes:
            array = built[name]() if name in built else dense.array(name)
            yield name, np.asarray(array).astype(dtype, copy=False)

    return shapes, stream()


class UpcycledLayer:
    """One decoder layer's MoE block, built on demand from the layer's dense FFN (memory-mapped)."""

    def __init__(self, dense: Checkpoint, layer: int, recipe: Recipe):
        names = swiglu_names(dense_mlp_prefix(layer))
        self.ffn = FeedForward(*(dense.array(names[role]) for role in ("gate", "up", "down")))
        self.layer, self.recipe = layer, recipe
        self.hidden = self.ffn.gate.shape[1]

    def rng(self, *stream: int) -> np.random.Generator:
        return np.random.default_rng([self.recipe.seed, self.layer, *stream])

    @functools.cached_property
    def segments(self) -> np.ndarray:
        """The dense neurons of each segment, ``[num_experts, expert_size]``: replicated, shuffled for "qwen", cut."""
        recipe = self.recipe
        return segment_neurons(self.ffn.width, recipe.num_experts, recipe.expert_size, recipe.method == "qwen",
                               self.rng(SHUFFLE_STREAM))

    @functools.cached_property
    def stats(self) -> dict[str, tuple[float, float]]:
        return weight_stats(self.ffn)

    def segment(self, index: int) -> FeedForward:
        """Segment ``index``: its dense neurons, ``reinit_fraction`` of them drawn afresh."""
        expert = self.ffn.take(self.segments[index])
        fraction = self.recipe.reinit_fraction
        if fraction:
            expert, _ = reinitialise(expert, fraction, self.stats, self.rng(SEGMENT_STREAM, index))
        return expert

    def mlp(self, which: int | None) -> FeedForward:
        """Routed expert ``which`` (the segments after the shared ones), or the shared expert for ``None``."""
        shared = self.recipe.shared_experts
        if which is None:
            parts = [self.segment(s) for s in range(shared)]
            return concat_neurons(parts) if parts else self.ffn.take(np.arange(0))  # no shared expert: width 0
        return self.segment(shared + which)

    def router(self) -> np.ndarray:
        """``[E, H]`` from N(0, router_std): nearly uniform routing until training says otherwise."""
        return self.recipe.router_std * self.rng(ROUTER_STREAM).standard_normal(
            (self.recipe.routed_experts, self.hidden), dtype=np.float32)

    def shared_gate(self) -> np.ndarray:
        """``[1, H]`` of zeros: sigmoid(0) = 0.5 scales the shared expert for every token alike."""
        return np.zeros((1, self.hidden), dtype=np.float32)


# --- writing the folder -----------------------------------------------------------------

def upcycle(dense_path: str | Path, out_path: str | Path, *, num_experts: int, shared_experts: int, top_k: int,
            expert_size: int, method: str = "qwen", reinit: float = 0.5, seed: int = 0, norm_topk_prob: bool = False,
            router_std: float = ROUTER_STD, force: bool = False, shard_bytes: int = SHARD_BYTES,
            progress: Callable[..., Iterable] | None = None) -> Path:
    """Make a ``Qwen2MoeForCausalLM`` checkpoint folder at ``out_path`` from the dense Qwen2 at ``dense_path``.

    Qwen1.5-MoE-A2.7B's shape from Qwen1.5-1.8B: ``num_experts=64, shared_experts=4, top_k=4, expert_size=1408``.
    ``method`` is ``"copy"``, ``"qwen"`` or ``"drop"`` (see the module docstring; ``"copy"``
    re-initialises nothing, whatever ``reinit`` says); ``reinit`` is the fraction of each expert's
    neurons drawn afresh, to the nearest neuron.  The router starts N(0, ``router_std``), the
    shared expert's gate at zero (sigmoid 0.5 for every token).  The same ``seed`` gives the same
    bytes.

    The weights are written in the dense checkpoint's dtype (its embedding's), in shards of at most
    ``shard_bytes`` with a ``model.safetensors.index.json`` when larger; config.json, tokenizer and
    generation files come along.  Everything is written into a temporary folder beside ``out_path``
    and renamed at the end, so a failure (a full disk, Ctrl-C) never leaves a folder that looks
    complete.  An existing non-empty ``out_path`` is replaced only with ``force=True``.
    ``progress`` (e.g. ``tqdm.tqdm``) wraps the stream of tensors as they are written.
    """
    recipe = Recipe(num_experts, shared_experts, top_k, expert_size, method, reinit, seed, norm_topk_prob, router_std)
    dense_folder, out = Path(dense_path), Path(out_path)
    moe_raw = upcycled_config(dense_folder, recipe)
    _, dense_config, _ = read_dense_config(dense_folder)
    moe_config = ModelConfig.from_dict(moe_raw, source=f"{out}/config.json")
    _check_output(out, dense_folder, force)
    dense = Checkpoint(dense_folder)
    check_shapes(dense, expected_shapes(dense_config).items())
    dtype = dense.info(EMBED).dtype
    shapes, tensors = upcycled_tensors(dense, moe_config, recipe, dtype)
    if progress is not None:
        tensors = progress(tensors, total=len(shapes), desc=f"writing {out.name}", unit="tensor")
    with _staging(out) as staging:
        (staging / "config.json").write_text(json.dumps(moe_raw, indent=2) + "\n")
        write_checkpoint(staging, shapes, dtype, tensors, shard_bytes)
        for name in SIDE_FILES:
            if (dense_folder / name).is_file():
                shutil.copyfile(dense_folder / name, staging / name)
    return out


def _check_output(out: Path, dense_folder: Path, force: bool) -> None:
    """Refuse to write over the dense checkpoint, over a file, or over a non-empty folder without ``force``."""
    target, source = out.resolve(), dense_folder.resolve()
    if target == source or target in source.parents:
        raise MinimoeError(f"{out}: the output would replace the dense checkpoint {dense_folder} it is made from")
    if out.exists() and not out.is_dir():
        raise MinimoeError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise MinimoeError(f"{out}: folder exists and is not empty (use --force, or force=True, to replace it)")


@contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A fresh folder beside ``out`` to write into; renamed to ``out`` on success, removed on any failure."""
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        yield staging
        _replace(out, staging)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise MinimoeError(f"{out}: writing the upcycled checkpoint failed ({exc.strerror or exc}); "
                           f"the partial output was removed and {out} was left as it was") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _replace(out: Path, staging: Path) -> None:
    """Put ``staging`` at ``out``, the old ``out`` (if any) moved aside first and deleted last."""
    if not out.exists():
        staging.rename(out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    out.rename(old)
    staging.rename(out)
    shutil.rmtree(old)


__all__ = ["upcycle", "Recipe", "FeedForward", "replicate", "shuffle", "cut_into_experts", "reinitialise",
           "segment_neurons", "copies_needed", "concat_neurons", "weight_stats", "upcycled_config", "upcycled_tensors",
           "UpcycledLayer", "read_dense_config", "METHODS"]
