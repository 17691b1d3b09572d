"""Text generation over the KV cache: greedy, temperature, top-k, top-p, with a seed.

The sampling filters follow transformers' logits warpers, in the same order
(temperature, then top-k, then top-p), so the same settings keep the same tokens:

* top-k keeps every token whose logit is at least the k-th largest (ties kept);
* top-p walks the tokens from least to most likely and drops each one while the mass
  of it and everything before it is at most ``1 - p``; the most likely token always
  stays.  Tied tokens are walked in index order (lower id first, so dropped first).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Iterable, Iterator, Mapping

import numpy as np

from . import layers
from .backend import to_numpy
from .errors import MinimoeError
from .hooks import Interventions

if TYPE_CHECKING:
    from .model import Model
    from .tokenizer import Tokenizer


def filter_top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """Logits ``[V]`` with everything below the k-th largest set to -inf."""
    if k >= logits.size:
        return logits
    kth = np.partition(logits, -k)[-k]
    return np.where(logits >= kth, logits, -np.inf)


def filter_top_p(logits: np.ndarray, p: float) -> np.ndarray:
    """Logits ``[V]`` with the least likely tokens, up to ``1 - p`` of the mass, set to -inf.

    transformers' ``TopPLogitsWarper`` rule, step for step: sort ascending, accumulate
    the probabilities, drop every token whose running mass is ``<= 1 - p``, keep the
    last (most likely) one regardless.  At a tie across the cut the order decides which
    of the tied tokens go: here always index order, which is what ``torch.sort`` gives
    for up to 16 tokens (beyond that its tie order is unspecified, so no rule can match it).
    """
    order = np.argsort(logits, kind="stable")  # ascending; tied tokens by index
    mass_so_far = np.cumsum(softmax64(logits[order]))
    dropped = mass_so_far <= 1 - p
    dropped[-1] = False  # the most likely token always stays
    filtered = logits.copy()
    filtered[order[dropped]] = -np.inf
    return filtered


def softmax64(logits: np.ndarray) -> np.ndarray:
    """``[V]`` -> ``[V]`` probabilities in float64, so that top-p's cumulative sums are exact enough."""
    return layers.softmax(np, logits.astype(np.float64))


def next_token_distribution(logits: np.ndarray, temperature: float, top_k: int | None, top_p: float | None) -> np.ndarray:
    """The probabilities ``[V]`` the sampler draws from, after temperature, top-k and top-p."""
    logits = np.asarray(logits, dtype=np.float64) / temperature
    if top_k is not None:
        logits = filter_top_k(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = filter_top_p(logits, top_p)
    return softmax64(logits)


def sample_next(logits: np.ndarray, rng: np.random.Generator, temperature: float = 1.0,
                top_k: int | None = None, top_p: float | None = None) -> int:
    """One token id from logits ``[V]``; ``temperature == 0`` is greedy (argmax)."""
    if temperature == 0:
        return int(np.argmax(logits))
    probs = next_token_distribution(logits, temperature, top_k, top_p)
    return int(min(np.searchsorted(np.cumsum(probs), rng.random() * probs.sum(), side="right"), probs.size - 1))


def check_sampling(max_new_tokens: int, temperature: float | None, top_k: int | None, top_p: float | None,
                   seed: int | None = None, stop_strings: Iterable[str] = (), *, as_flags: bool = False) -> None:
    """Raise :class:`MinimoeError` unless every setting is usable (``None``: not set, nothing to check).

    ``as_flags`` names them as the command line spells them (``--top-p``, not ``top_p``).
    """
    def reject(name: str, rule: str, value) -> None:
        label = ("--stop" if name == "stop_strings" else "--" + name.replace("_", "-")) if as_flags else name
        raise MinimoeError(f"{label} must be {rule}, got {value!r}")

    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        reject("max_new_tokens", "a non-negative integer", max_new_tokens)
    if temperature is not None and not (math.isfinite(temperature) and temperature >= 0):
        reject("temperature", "a finite number >= 0 (0 is greedy)", temperature)
    if top_k is not None and top_k < 1:
        reject("top_k", ">= 1", top_k)
    if top_p is not None and not 0 < top_p <= 1:  # NaN fails too
        reject("top_p", "in (0, 1]", top_p)
    if isinstance(seed, (int, np.integer)) and seed < 0:  # NumPy's generators take no negative seed
        reject("seed", "a non-negative integer", seed)
    for text in stop_strings:
        if not text:  # every text contains "": generation would stop after one token
            reject("stop_strings", "non-empty", text)


def check_prompt(prompt: np.ndarray, max_new_tokens: int, context: int) -> None:
    """Raise :class:`MinimoeError` unless ``prompt`` ``[T]`` is non-empty and leaves room for the new tokens."""
    if prompt.ndim != 1 or prompt.size == 0:
        raise MinimoeError(f"generate takes a non-empty [T] list of ids, got shape {prompt.shape}")
    if prompt.size + max_new_tokens > context:
        raise MinimoeError(
            f"prompt of {prompt.size} tokens + {max_new_tokens} new tokens exceeds the context of {context} positions"
        )


def generate_stream(model: "Model", ids: Iterable[int], max_new_tokens: int, temperature: float = 1.0,
                    top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                    eos_token_ids: Iterable[int] | None = None, stop_strings: Iterable[str] = (),
                    tokenizer: "Tokenizer | None" = None, record=None,
                    interventions: "Mapping | Interventions | None" = None) -> Iterator[int]:
    """Yield new token ids one at a time, decoding through a KV cache.

    Stops after ``max_new_tokens``, after an id in ``eos_token_ids`` (which is yielded),
    or once the generated text contains one of ``stop_strings`` (needs ``tokenizer``).
    ``record`` and ``interventions`` (as :meth:`Model.forward` takes them) apply to every step.
    Raises :class:`MinimoeError` up front when prompt + new tokens exceed the context.
    """
    prompt = np.asarray(list(ids), dtype=np.int64)
    stop_strings = list(stop_strings)
    check_sampling(max_new_tokens, temperature, top_k, top_p, seed, stop_strings)
    check_prompt(prompt, max_new_tokens, model.config.max_position_embeddings)
    if stop_strings and tokenizer is None:
        raise MinimoeError("stop_strings need a tokenizer to decode the generated text")
    eos = set(model.eos_token_ids if eos_token_ids is None else eos_token_ids)
    rng = np.random.default_rng(seed)
    cache = model.new_cache(capacity=prompt.size + max_new_tokens)
    step_options = dict(record=record, interventions=Interventions.of(model.config, interventions))  # checked once
    logits = model.forward(prompt, cache=cache, **step_options)[-1]
    generated: list[int] = []
    for step in range(max_new_tokens):
        token = sample_next(to_numpy(logits), rng, temperature, top_k, top_p)  # cupy backend: to the host
        generated.append(token)
        yield token
        if token in eos or (stop_strings and any(s in tokenizer.decode(generated) for s in stop_strings)):
            return
        if step + 1 < max_new_tokens:
            logits = model.forward([token], cache=cache, **step_options)[-1]
