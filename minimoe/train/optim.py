"""The optimizer side of training: :class:`AdamW`, :func:`clip_grad_norm` and the learning-rate schedule :func:`cosine_lr`.

All three work on dicts of float32 arrays keyed by checkpoint tensor names -- what
:func:`minimoe.train.parameters` and :func:`minimoe.train.loss_and_grads` give -- and update them
in place.  Each follows a PyTorch function operation for operation, so that the same inputs give
the same float32 numbers (tests/test_train_optim.py holds them to ``torch.optim.AdamW`` and
``torch.nn.utils.clip_grad_norm_``):

* AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization"), as ``torch.optim.AdamW``'s
  single-tensor path (the one it takes on the CPU), per tensor ``p`` with gradient ``g`` at step ``t``::

      p *= 1 - lr * weight_decay                      # decay, decoupled from the gradient
      m += (1 - beta1) * (g - m)                      # torch's exp_avg.lerp_(g, 1 - beta1)
      v = beta2 * v + (1 - beta2) * g * g
      p -= lr / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)

* Clipping by the global norm ``n = sqrt(sum of every gradient's squared entries)``: every gradient
  is multiplied by ``min(1, max_norm / (n + 1e-6))`` (always multiplied, as torch does, so a factor
  of exactly 1 still rounds the same way).

* The schedule: a linear warm-up over ``warmup`` steps multiplying a cosine that falls from ``peak``
  to ``floor * peak`` over all ``steps``.  After the warm-up it is exactly transformers'
  ``get_cosine_with_min_lr_schedule_with_warmup(num_warmup_steps=0, num_training_steps=steps,
  min_lr_rate=floor)``; during the warm-up that cosine is scaled by ``(step + 1) / warmup``, so the
  first step already learns (transformers' own warm-up gives its first step a learning rate of 0).
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from ..errors import MinimoeError

Tensors = Mapping[str, np.ndarray]  # checkpoint tensor name -> float32 array


class AdamW:
    """``torch.optim.AdamW(params, lr, betas, eps, weight_decay)`` over dicts of float32 arrays.

    ``optimizer.step(params, grads)`` updates ``params`` in place (every tensor in ``grads``; a
    tensor with no gradient is left alone, as torch leaves a parameter whose ``.grad`` is None).
    ``optimizer.lr`` may be changed between steps (the schedule does).  The moments live in
    ``optimizer.exp_avg`` / ``optimizer.exp_avg_sq`` (torch's names), created at the first step;
    :meth:`state` and :meth:`load_state` give and take them as a flat dict of arrays, for a
    checkpoint that resumes bit for bit.
    """

    def __init__(self, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01):
        if not lr > 0:
            raise MinimoeError(f"AdamW: the learning rate must be positive, got {lr}")
        if not all(0.0 <= beta < 1.0 for beta in betas):
            raise MinimoeError(f"AdamW: betas must lie in [0, 1), got {betas}")
        if eps < 0 or weight_decay < 0:
            raise MinimoeError(f"AdamW: eps and weight_decay must not be negative, got {eps} and {weight_decay}")
        self.lr, self.betas, self.eps, self.weight_decay = lr, tuple(betas), eps, weight_decay
        self.steps = 0  # torch counts per parameter; every tensor here steps together
        self.exp_avg: dict[str, np.ndarray] = {}
        self.exp_avg_sq: dict[str, np.ndarray] = {}

    def step(self, params: Tensors, grads: Tensors) -> None:
        """One AdamW update of each ``params[name]`` that has a ``grads[name]``, in place."""
        beta1, beta2 = self.betas
        self.steps += 1
        step_size = self.lr / (1 - beta1**self.steps)  # Python floats, as torch computes them
        bias_correction2_sqrt = (1 - beta2**self.steps) ** 0.5
        for name, grad in grads.items():
            param = params[name]
            if param.shape != grad.shape or param.dtype != np.float32 or grad.dtype != np.float32:
                raise ValueError(f"{name}: parameter {param.shape} {param.dtype} and gradient {grad.shape} "
                                 f"{grad.dtype} must be float32 arrays of one shape")
            if name not in self.exp_avg:
                self.exp_avg[name] = np.zeros_like(param)
                self.exp_avg_sq[name] = np.zeros_like(param)
            m, v = self.exp_avg[name], self.exp_avg_sq[name]
            param *= np.float32(1 - self.lr * self.weight_decay)
            m += np.float32(1 - beta1) * (grad - m)
            v *= np.float32(beta2)
            v += np.float32(1 - beta2) * (grad * grad)
            denom = np.sqrt(v)
            denom /= np.float32(bias_correction2_sqrt)
            denom += np.float32(self.eps)
            update = np.divide(m, denom, out=denom)  # reuse the buffer: one temporary per tensor
            update *= np.float32(-step_size)
            param += update

    def state(self) -> dict[str, np.ndarray]:
        """The moments and the step count as flat arrays: ``exp_avg.NAME``, ``exp_avg_sq.NAME``, ``steps``."""
        state = {"steps": np.array(self.steps, dtype=np.int64)}
        for name in self.exp_avg:
            state[f"exp_avg.{name}"] = self.exp_avg[name]
            state[f"exp_avg_sq.{name}"] = self.exp_avg_sq[name]
        return state

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Continue from :meth:`state`'s arrays (copied, as float32)."""
        self.steps = int(state["steps"])
        self.exp_avg = {key.removeprefix("exp_avg."): np.array(value, dtype=np.float32)
                        for key, value in state.items() if key.startswith("exp_avg.")}
        self.exp_avg_sq = {key.removeprefix("exp_avg_sq."): np.array(value, dtype=np.float32)
                           for key, value in state.items() if key.startswith("exp_avg_sq.")}


def global_norm(grads: Tensors) -> float:
    """``sqrt(sum over tensors of ||g||^2)``, each tensor's norm in float32 as ``torch.linalg.vector_norm``."""
    norms = np.array([np.linalg.norm(grad.reshape(-1)) for grad in grads.values()], dtype=np.float32)
    return float(np.linalg.norm(norms))


def clip_grad_norm(grads: Tensors, max_norm: float) -> float:
    """Scale every gradient in place so the global norm is at most ``max_norm``; returns the norm before.

    As ``torch.nn.utils.clip_grad_norm_(parameters, max_norm)``: the factor is
    ``min(1, max_norm / (norm + 1e-6))``.  A non-finite norm is returned as it is and the
    gradients are left alone: the caller decides what a NaN means (the trainer stops).
    """
    norm = global_norm(grads)
    if math.isfinite(norm):
        factor = min(np.float32(1.0), np.float32(max_norm) / (np.float32(norm) + np.float32(1e-6)))  # float32, as torch
        for grad in grads.values():
            grad *= factor
    return norm


def cosine_lr(peak: float, step: int, steps: int, warmup: int = 0, floor: float = 0.1) -> float:
    """The learning rate of step ``step`` (0-based) of ``steps``: warm-up times a cosine from ``peak`` to ``floor * peak``.

    ``peak * min(1, (step + 1) / warmup) * (floor + (1 - floor) * (1 + cos(pi * step / steps)) / 2)``;
    see the module docstring for how it relates to transformers' schedules.
    """
    warm = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    progress = min(1.0, step / max(1, steps))
    return peak * warm * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


__all__ = ["AdamW", "clip_grad_norm", "global_norm", "cosine_lr"]
