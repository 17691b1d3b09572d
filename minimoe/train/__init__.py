"""Training minimoe's models with minimoe: the backward pass, checked against torch's autograd.

    params = minimoe.train.parameters(model)          # the float32 weights the model computes with
    loss, grads = minimoe.train.loss_and_grads(model, ids)   # ids [B, T]; grads under the same names

:mod:`.parameters` turns a loaded model's weights into trainable float32 arrays; :mod:`.backward`
runs the model's own forward on a tape and walks its blocks back, through the layer backwards of
:mod:`minimoe.layers`.
"""

from .backward import loss_and_grads
from .parameters import parameters

__all__ = ["loss_and_grads", "parameters"]
