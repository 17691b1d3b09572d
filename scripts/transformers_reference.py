"""The reference side of minimoe's benchmarks: transformers, in bf16.

``minimoe bench --against transformers`` and ``python -m minimoe.gpu_check`` load this file
from the checkout (``minimoe.tools.bench.reference_module``) only when they compare, so that the
package itself never imports torch or transformers (the ``test`` extra).
"""

from __future__ import annotations

import inspect
import os
import time
from pathlib import Path

import numpy as np
import torch
import transformers


def cache_argument(model_class) -> str:
    """The name of the KV-cache argument (and output field) of a transformers model's forward: ``cache``,
    or ``past_key_values`` before transformers 5.x renamed it."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


class TransformersEngine:
    """transformers' Qwen2MoeForCausalLM in bf16, eager attention, behind the same calls."""

    def __init__(self, job):
        self.job = job
        torch.set_num_threads(job.threads or len(os.sched_getaffinity(0)))
        self.threads = torch.get_num_threads()
        self.cache_arg = cache_argument(transformers.Qwen2MoeForCausalLM)

    def load(self) -> None:
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            self.job.model, dtype=torch.bfloat16, attn_implementation="eager").eval()

    def reset(self) -> None:
        self.cache = None

    def forward(self, ids: list[int]) -> np.ndarray:
        with torch.inference_mode():
            out = self.model(torch.tensor([ids]), use_cache=True, **{self.cache_arg: self.cache})
        self.cache = getattr(out, self.cache_arg)
        return out.logits[0, -1].float().numpy()


def time_on_gpu(path: Path, prompt: np.ndarray, decode: int, random_weights: bool = False) -> dict:
    """Prefill and greedy decode tokens/s and peak GPU memory of transformers in bf16 (``minimoe.gpu_check``).

    ``random_weights``: ``path`` holds only a config.json; the model is built on the GPU with
    transformers' own random initialisation (the same shapes as minimoe's random benchmark model).
    """
    if random_weights:
        config = transformers.AutoConfig.from_pretrained(path)
        with torch.device("cuda"):
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16,
                                                                   attn_implementation="eager")
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16,
                                                                  attn_implementation="eager").cuda()
    model.eval()
    cache_arg = cache_argument(type(model))
    ids = torch.from_numpy(prompt)[None].cuda()

    def run(model, prompt_ids, steps):
        with torch.inference_mode():
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = model(prompt_ids, use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            token.item()
            t1 = time.perf_counter()
            for _ in range(steps):
                out = model(token, use_cache=True, **{cache_arg: getattr(out, cache_arg)})
                token = out.logits[:, -1].argmax(-1, keepdim=True)
                token.item()
            t2 = time.perf_counter()
        return t1 - t0, t2 - t1

    run(model, ids[:, :16], 2)  # warm-up
    torch.cuda.reset_peak_memory_stats()
    prefill_s, decode_s = run(model, ids, decode)
    result = {"prefill_tok_s": ids.shape[1] / prefill_s, "decode_tok_s": decode / decode_s,
              "memory_gb": torch.cuda.max_memory_allocated() / 1e9, "transformers": transformers.__version__,
              "torch": torch.__version__}
    del model
    torch.cuda.empty_cache()
    return result
