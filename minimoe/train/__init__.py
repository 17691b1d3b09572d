"""Training minimoe's models with minimoe: the backward pass, checked against torch's autograd.

    params = minimoe.train.parameters(model)          # the float32 weights the model computes with
    loss, grads = minimoe.train.loss_and_grads(model, ids)   # ids [B, T]; grads under the same names
    minimoe.train.AdamW(lr=1e-3).step(params, grads)            # torch.optim.AdamW's update, in place

:mod:`.parameters` turns a loaded model's weights into trainable float32 arrays; :mod:`.backward`
runs the model's own forward on a tape and walks its blocks back, through the layer backwards of
:mod:`minimoe.layers`.  :mod:`.optim` holds AdamW, clipping by global norm and the learning-rate
schedule; :mod:`.trainer` and :mod:`.data` are what ``minimoe train`` runs.
"""

from .backward import loss_and_grads
from .optim import AdamW, clip_grad_norm
from .parameters import parameters

__all__ = ["AdamW", "clip_grad_norm", "loss_and_grads", "parameters"]
