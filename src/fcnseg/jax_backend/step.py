"""One training step in JAX: fcnseg's loss, gradients with BatchNorm in training mode, PyTorch's optimisers.

Everything here is a pure function of arrays, compiled with ``jax.jit``; the trainer (`train`) feeds it
batches from fcnseg's DataLoader and the learning rate of fcnseg's schedule. The arithmetic follows
PyTorch so that a run trains as ``--backend torch`` does:

- the loss is `fcnseg.ops.loss.segmentation_loss`: cross-entropy over labelled pixels (void 255
  ignored), "mean" (weighted by class weights as ``F.cross_entropy``) or "d2l" (sum over images of
  each image's mean pixel loss);
- BatchNorm normalises with batch statistics and updates its running ones with momentum 0.1 and the
  unbiased variance (`models.BatchNorm`);
- SGD is ``torch.optim.SGD``: ``g += wd * p; buf = momentum * buf + g; p -= lr * buf``; AdamW is
  ``torch.optim.AdamW``: ``p -= lr * (adam(g) + wd * p)``. Parameters PyTorch leaves out of its
  optimiser (a frozen body, a "fixed" upsampler) are never changed, weight decay included.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from fcnseg.constants import IGNORE_INDEX
from fcnseg.jax_backend.models import FCN

Params = Any  # nested dicts of arrays


class StepOutput(NamedTuple):
    """What `TrainStep.gradients` returns for one micro-batch."""

    loss: jax.Array
    correct: jax.Array  # labelled pixels whose argmax is right (the chapter's train accuracy)
    labelled: jax.Array
    batch_stats: Params
    grads: Params


def cross_entropy(logits: jax.Array, target: jax.Array, *, class_weights: jax.Array | None = None,
                  reduction: str = "mean", ignore_index: int = IGNORE_INDEX) -> jax.Array:
    """`fcnseg.ops.loss.segmentation_loss` on NHWC logits ``(N, H, W, C)`` and targets ``(N, H, W)``."""
    logp = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), axis=-1)
    labelled = target != ignore_index
    safe = jnp.where(labelled, target, 0)
    nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    weight = labelled.astype(nll.dtype)
    if class_weights is not None:
        weight = weight * class_weights[safe]
    if reduction == "mean":
        return jnp.sum(nll * weight) / jnp.sum(weight)
    per_image = jnp.sum(nll * weight, axis=(1, 2)) / jnp.maximum(jnp.sum(labelled, axis=(1, 2)), 1)
    return jnp.sum(per_image)


def optimizer(name: str, *, momentum: float, weight_decay: float) -> optax.GradientTransformation:
    """The update direction of ``torch.optim.SGD`` or ``AdamW``; the step multiplies it by ``-lr``."""
    if name == "adamw":
        return optax.chain(optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8), optax.add_decayed_weights(weight_decay))
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.trace(decay=momentum, nesterov=False))


def trainable_mask(params: Params, module: FCN) -> Params:
    """True for the parameters PyTorch's optimiser holds (``requires_grad``): not a frozen body's, not a
    "fixed" upsampler's weight."""
    flat = traverse_util.flatten_dict(params)
    mask = {}
    for path in flat:
        frozen_body = module.freeze_backbone and path[0] == "backbone"
        fixed = module.upsampler == "fixed" and path[0].startswith("upsample") and path[-1] == "weight"
        mask[path] = not (frozen_body or fixed)
    return traverse_util.unflatten_dict(mask)


def _loss(params: Params, batch_stats: Params, image: jax.Array, target: jax.Array, class_weights: jax.Array | None,
          module: FCN, reduction: str) -> tuple:
    logits, updates = module.apply({"params": params, "batch_stats": batch_stats}, jnp.transpose(image, (0, 2, 3, 1)),
                                   train=True, mutable=["batch_stats"])
    loss = cross_entropy(logits, target, class_weights=class_weights, reduction=reduction)
    labelled = target != IGNORE_INDEX
    correct = jnp.sum((jnp.argmax(logits, axis=-1) == target) & labelled)
    return loss, (correct, jnp.sum(labelled), updates["batch_stats"])


# Module-level and keyed by hashable descriptions (the Flax module, the optimiser's settings), so
# that runs in one process with the same model and settings (a resumed run, a test suite) share
# one compilation.
@functools.partial(jax.jit, static_argnames=("module", "reduction"))
def _gradients(params: Params, batch_stats: Params, image: jax.Array, target: jax.Array,
               class_weights: jax.Array | None, *, module: FCN, reduction: str) -> StepOutput:
    (loss, (correct, labelled, stats)), grads = jax.value_and_grad(_loss, has_aux=True)(
        params, batch_stats, image, target, class_weights, module, reduction)
    return StepOutput(loss, correct, labelled, stats, grads)


@functools.partial(jax.jit, static_argnames=("module", "settings"))
def _apply(params: Params, opt_state: Any, grads: Params, lr: jax.Array, *, module: FCN,
           settings: tuple[str, float, float]) -> tuple[Params, Any]:
    mask = trainable_mask(params, module)
    return apply_update(optimizer(settings[0], momentum=settings[1], weight_decay=settings[2]), mask,
                        params, opt_state, grads, lr)


def apply_update(tx: optax.GradientTransformation, mask: Params, params: Params, opt_state: Any, grads: Params,
                 lr: jax.Array | float) -> tuple[Params, Any]:
    """``params - lr * direction`` for the trainable parameters (``mask``); the others stay as they are."""
    grads = jax.tree_util.tree_map(lambda g, m: g if m else jnp.zeros_like(g), grads, mask)
    direction, opt_state = tx.update(grads, opt_state, params)
    params = jax.tree_util.tree_map(lambda p, d, m: p - lr * d if m else p, params, direction, mask)
    return params, opt_state


class TrainStep:
    """The compiled gradient and update functions of one model and optimiser.

    Args:
        module: the Flax FCN (not folded).
        optimizer_name: "sgd" or "adamw".
        momentum, weight_decay: as ``torch.optim.SGD``'s (AdamW ignores ``momentum``).
        reduction: "mean" or "d2l".
        class_weights: ``(C,)`` or None.
    """

    def __init__(self, module: FCN, optimizer_name: str = "sgd", *, momentum: float = 0.9, weight_decay: float = 0.0,
                 reduction: str = "mean", class_weights: np.ndarray | None = None) -> None:
        self.module, self.reduction = module, reduction
        self.settings = (optimizer_name, float(momentum), float(weight_decay))
        self.class_weights = None if class_weights is None else jnp.asarray(class_weights, jnp.float32)

    def gradients(self, params: Params, batch_stats: Params, image: np.ndarray, target: np.ndarray) -> StepOutput:
        """Loss and gradients of one micro-batch (``image`` NCHW float32, ``target`` NHW int32) and the
        BatchNorm statistics after it."""
        return _gradients(params, batch_stats, image, target, self.class_weights, module=self.module,
                          reduction=self.reduction)

    def apply(self, params: Params, opt_state: Any, grads: Params, lr: float) -> tuple[Params, Any]:
        """One optimiser update at learning rate ``lr``."""
        return _apply(params, opt_state, grads, jnp.float32(lr), module=self.module, settings=self.settings)

    def init(self, params: Params) -> Any:
        """The optimiser's state for ``params`` (zero momentum, as PyTorch's first step)."""
        return optimizer(self.settings[0], momentum=self.settings[1], weight_decay=self.settings[2]).init(params)
