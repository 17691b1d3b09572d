"""minimoe.train.optim against PyTorch: AdamW, clipping by global norm, and the learning-rate schedule.

The reference is torch's own optimizer and clipping run on copies of the same float32 arrays, and
transformers' own schedule function; nothing here compares minimoe with numbers it produced itself,
except the resume test, whose claim is exactly that (a restored optimizer continues bit for bit).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from minimoe.errors import MinimoeError
from minimoe.train.optim import AdamW, clip_grad_norm, cosine_lr, global_norm

torch = pytest.importorskip("torch")

SHAPES = {"model.embed_tokens.weight": (50, 16), "model.norm.weight": (16,),
          "model.layers.0.mlp.gate.weight": (8, 16), "model.layers.0.self_attn.q_proj.bias": (16,)}
# Float32 rounding: differences relative to each tensor's largest entry; measured worst 1.5e-7 (about one
# float32 ulp, where torch's CPU kernels round through fused multiply-adds and NumPy does not).
RTOL = 4e-7


def random_tensors(rng: np.random.Generator, scale: float = 1.0) -> dict[str, np.ndarray]:
    return {name: (rng.standard_normal(shape) * scale).astype(np.float32) for name, shape in SHAPES.items()}


def worst_relative(ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray]) -> float:
    """Largest |ours - theirs| of each tensor over that tensor's largest |theirs|, worst over tensors."""
    return max(float(np.abs(ours[n] - theirs[n]).max() / np.abs(theirs[n]).max()) for n in ours)


@pytest.mark.parametrize("settings", [
    dict(lr=1e-3),  # torch's defaults: betas (0.9, 0.999), eps 1e-8, weight_decay 0.01
    dict(lr=2e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1),  # what minimoe's trainer uses
    dict(lr=0.5, betas=(0.5, 0.9), eps=1e-3, weight_decay=0.0),
])
def test_adamw_matches_torch_over_several_steps(settings):
    rng = np.random.default_rng(0)
    params = random_tensors(rng)
    torch_params = {n: torch.nn.Parameter(torch.tensor(a)) for n, a in params.items()}
    theirs = torch.optim.AdamW(torch_params.values(), **settings)
    ours = AdamW(**settings)
    for step in range(6):
        grads = random_tensors(rng, scale=10.0 ** (step % 3 - 1))  # gradients of changing size
        if step == 4:  # the schedule changes the learning rate between steps
            ours.lr = settings["lr"] / 3
            for group in theirs.param_groups:
                group["lr"] = settings["lr"] / 3
        for name, p in torch_params.items():
            p.grad = torch.tensor(grads[name])
        theirs.step()
        ours.step(params, grads)
        expected = {n: p.detach().numpy() for n, p in torch_params.items()}
        assert worst_relative(params, expected) <= RTOL, f"step {step + 1}"
    for moment in ("exp_avg", "exp_avg_sq"):
        expected = {n: theirs.state[p][moment].numpy() for n, p in torch_params.items()}
        assert worst_relative(getattr(ours, moment), expected) <= RTOL, moment


def test_a_tensor_without_gradient_is_left_alone_as_torch_leaves_it():
    rng = np.random.default_rng(1)
    params = random_tensors(rng)
    frozen = params["model.norm.weight"].copy()
    grads = {n: g for n, g in random_tensors(rng).items() if n != "model.norm.weight"}
    AdamW(lr=0.1).step(params, grads)
    np.testing.assert_array_equal(params["model.norm.weight"], frozen)


def test_restored_state_continues_bit_for_bit():
    rng = np.random.default_rng(2)
    start, grads = random_tensors(rng), [random_tensors(rng) for _ in range(4)]
    straight = {n: a.copy() for n, a in start.items()}
    optimizer = AdamW(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    for g in grads:
        optimizer.step(straight, {n: a.copy() for n, a in g.items()})
    resumed = {n: a.copy() for n, a in start.items()}
    first = AdamW(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    for g in grads[:2]:
        first.step(resumed, {n: a.copy() for n, a in g.items()})
    second = AdamW(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    second.load_state({k: v.copy() for k, v in first.state().items()})
    for g in grads[2:]:
        second.step(resumed, {n: a.copy() for n, a in g.items()})
    for name in start:
        np.testing.assert_array_equal(resumed[name], straight[name])


@pytest.mark.parametrize("max_norm", [1.0, 1e6])  # clipped, and not (torch still multiplies by the factor 1)
def test_clip_grad_norm_matches_torch(max_norm):
    rng = np.random.default_rng(3)
    grads = random_tensors(rng, scale=3.0)
    tensors = [torch.nn.Parameter(torch.zeros(shape)) for shape in SHAPES.values()]
    for p, g in zip(tensors, grads.values()):
        p.grad = torch.tensor(g)
    expected_norm = torch.nn.utils.clip_grad_norm_(tensors, max_norm).item()
    norm = clip_grad_norm(grads, max_norm)
    assert norm == pytest.approx(expected_norm, rel=1e-6)
    assert worst_relative(grads, {n: p.grad.numpy() for n, p in zip(grads, tensors)}) <= RTOL
    if max_norm == 1.0:
        assert global_norm(grads) == pytest.approx(1.0, rel=1e-5)


def test_a_non_finite_norm_is_reported_and_the_gradients_left_alone():
    grads = {"a": np.array([1.0, np.inf], dtype=np.float32), "b": np.array([np.nan], dtype=np.float32)}
    assert not math.isfinite(clip_grad_norm(grads, 1.0))
    assert grads["a"][0] == 1.0


def test_schedule_is_transformers_cosine_with_min_lr_after_warmup_and_scaled_during_it():
    from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

    steps, warmup, peak, floor = 50, 7, 3e-3, 0.1
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    theirs = get_cosine_with_min_lr_schedule_with_warmup(optimizer, num_warmup_steps=0, num_training_steps=steps,
                                                         min_lr_rate=floor)
    for step in range(steps):
        expected = optimizer.param_groups[0]["lr"] * min(1.0, (step + 1) / warmup)
        assert cosine_lr(peak, step, steps, warmup, floor) == pytest.approx(expected, rel=1e-12), step
        optimizer.step()
        theirs.step()
    assert cosine_lr(peak, 0, steps, warmup) == pytest.approx(peak / warmup, rel=1e-3)  # the first step learns
    assert cosine_lr(peak, steps, steps, warmup) == pytest.approx(floor * peak)


@pytest.mark.parametrize("bad", [dict(lr=0.0), dict(lr=-1e-3), dict(lr=1e-3, betas=(0.9, 1.0)),
                                 dict(lr=1e-3, weight_decay=-0.1)])
def test_bad_settings_are_refused(bad):
    with pytest.raises(MinimoeError):
        AdamW(**bad)
