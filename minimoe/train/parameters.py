"""The model's weights as trainable float32 arrays, under the checkpoint's tensor names.

A loaded model computes with its weights as the backend holds them: on NumPy the large
matrices stay bf16, memory-mapped from the checkpoint, and are upcast block by block at each
call (:class:`minimoe.backend.Linear`).  Training needs them as float32 arrays it can change.
:func:`parameters` upcasts every weight once, puts the float32 copy in the model's place (so the
model's own forward computes with it), and hands back those very arrays: changing one in place
changes what the model computes, and :func:`minimoe.train.loss_and_grads` returns its gradients
under the same names.
"""

from __future__ import annotations

from typing import Iterator
from weakref import WeakKeyDictionary

from ..checkpoint import names
from ..errors import MinimoeError
from ..model import Model, SparseMoeBlock, SwiGLU

TRAINABLE_BACKENDS = ("numpy", "cupy-plain")  # the reference operations; the CUDA kernels have no backward

_trained: WeakKeyDictionary = WeakKeyDictionary()  # model -> its parameters, made once


def parameters(model: Model) -> dict:
    """The float32 arrays ``model`` computes with, keyed by checkpoint tensor name
    (``model.layers.0.mlp.experts.3.gate_proj.weight``, ...), one per tensor and shaped like it.

    The first call upcasts the stored weights (bf16, f16 or f32, memory-mapped) into float32
    arrays of the model's own and puts them in the model; later calls return the same arrays.
    Updating them in place changes what ``model.forward`` computes.
    """
    if model in _trained:
        return _trained[model]
    if model.backend not in TRAINABLE_BACKENDS:
        raise MinimoeError(f"training runs on the reference operations (backend {' or '.join(TRAINABLE_BACKENDS)}), "
                           f"not on backend {model.backend!r}, whose CUDA kernels have no backward")
    xp = model.xp
    params: dict = {}

    def own(name: str, array):
        params[name] = xp.array(array, dtype=xp.float32)  # a copy: the stored one may be read-only or bf16
        return params[name]

    for name, holder, attribute in _places(model):
        setattr(holder, attribute, own(name, getattr(holder, attribute)))
    model.ops.weights_replaced()  # anything the backend made from the old arrays is stale
    _trained[model] = params
    return params


def _places(model: Model) -> Iterator[tuple[str, object, str]]:
    """``(tensor name, object, attribute)`` for every weight of ``model``: where the array of each lives."""
    config = model.config
    yield names.EMBED, model.embed, "weight"
    if not config.tie_word_embeddings:
        yield names.LM_HEAD, model.lm_head, "weight"
    yield names.FINAL_NORM, model, "final_norm"
    for layer in model.decoder:
        index = layer.index
        norms = names.norm_names(index)
        yield norms["input"], layer, "input_norm"
        yield norms["post_attention"], layer, "post_attention_norm"
        attention, attention_names = layer.attention, names.attention_names(index)
        for key in "qkvo":
            yield attention_names[f"{key}_weight"], getattr(attention, key), "weight"
        if config.qkv_bias:
            for key in "qkv":
                yield attention_names[f"{key}_bias"], getattr(attention, key), "bias"
        if attention.qk_norm is not None:
            norm_names = names.qk_norm_names(index)
            yield norm_names["q"], attention.qk_norm, "q_weight"
            yield norm_names["k"], attention.qk_norm, "k_weight"
        if isinstance(layer.mlp, SparseMoeBlock):
            moe = layer.mlp
            yield names.router_name(index, config.model_type), moe.router, "weight"
            for expert, mlp in enumerate(moe.experts):
                yield from _swiglu_places(names.expert_names(index, expert, config.model_type), mlp)
            if moe.shared is not None:
                yield from _swiglu_places(names.swiglu_names(names.shared_expert_prefix(index)), moe.shared)
                yield names.shared_expert_gate_name(index), moe.shared_gate, "weight"
        else:
            yield from _swiglu_places(names.swiglu_names(names.dense_mlp_prefix(index)), layer.mlp)


def _swiglu_places(mlp_names: dict[str, str], mlp: SwiGLU) -> Iterator[tuple[str, object, str]]:
    for part in ("gate", "up", "down"):
        yield mlp_names[part], getattr(mlp, part), "weight"
