"""Weights both ways: a PyTorch fcnseg model or state dict <-> Flax variables of `fcnseg.jax_backend.models.FCN`.

The Flax modules are named after the PyTorch ones (see `models`), so a parameter's path joined by dots
is its state-dict key; only the leaf names and layouts differ:

========================  ======================  =============================================
PyTorch                    Flax                    layout
========================  ======================  =============================================
conv ``weight``            params ``kernel``       (O, I, kh, kw) -> (kh, kw, I, O)
conv/BN ``bias``           params ``bias``         same
BN ``weight``              params ``scale``        same
BN ``running_mean/var``    batch_stats ``mean/var``  same
BN ``num_batches_tracked`` batch_stats, same name  int64 -> int32 (JAX's default integer)
upsampler ``weight``       params ``weight``       same (C_in, C_out, 2s, 2s): ConvTranspose2d's
========================  ======================  =============================================

Loading is strict, as fcnseg's checkpoints are: a missing or unexpected key or a shape that differs
from the Flax model's is an error naming it.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import traverse_util

from fcnseg.errors import CheckpointError
from fcnseg.jax_backend.models import FCN, VARIANTS

Variables = dict[str, Any]  # {"params": ..., "batch_stats": ...} nested dicts of arrays

_BN_STATS_BACK = {"mean": "running_mean", "var": "running_var", "num_batches_tracked": "num_batches_tracked"}


def flax_model(model_name: str, model_kwargs: Mapping[str, Any], *, folded: bool = False) -> FCN:
    """The Flax FCN that a checkpoint's ``model_name`` and ``model_kwargs`` describe.

    Args:
        model_name: ``fcn_resnet18``, ``fcn_resnet34``, ``fcn_resnet50`` or ``fcn_mobilenet_v2``.
        model_kwargs: the builder's arguments (``variant``, ``num_classes``, ``upsampler``...).
        folded: the inference form (BatchNorm folded into convolutions).

    Raises:
        CheckpointError: a model name or variant the JAX backend has no Flax model for.
    """
    backbone = model_name.removeprefix("fcn_")
    if backbone not in ("resnet18", "resnet34", "resnet50", "mobilenet_v2"):
        raise CheckpointError(f"the JAX backend has no Flax model for {model_name!r}")
    variant = model_kwargs.get("variant", "32s")
    if variant not in VARIANTS:
        raise CheckpointError(f"the JAX backend has no Flax model for FCN-{variant} (it builds FCN-"
                              f"{', '.join(VARIANTS)}); use another backend (--backend torch)")
    return FCN(backbone=backbone, num_classes=int(model_kwargs.get("num_classes", 21)),
               variant=variant, upsampler=model_kwargs.get("upsampler", "bilinear"),
               upsampler_bias=bool(model_kwargs.get("upsampler_bias", False)),
               freeze_backbone=bool(model_kwargs.get("freeze_backbone", False)), folded=folded)


def flax_model_of(model: torch.nn.Module) -> FCN:
    """The Flax FCN computing what ``model`` (an fcnseg FCN, as built or in its inference form) computes.

    Raises:
        CheckpointError: ``model`` is not an fcnseg FCN (no ``model_name``/``model_kwargs``).
    """
    if not hasattr(model, "model_name") or not hasattr(model, "model_kwargs"):
        raise CheckpointError(f"the JAX backend converts fcnseg FCNs only, not {type(model).__name__}")
    folded = not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    return flax_model(model.model_name, model.model_kwargs, folded=folded)


@functools.lru_cache(maxsize=32)
def variable_shapes(module: FCN) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """``{torch key: (flax path with its collection first, flax shape)}``, computed without allocating weights.

    Cached per model description (Linen modules hash by their fields): tracing the model is the
    slow part of a conversion.
    """
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
    out = {}
    for collection, tree in shapes.items():
        for path, leaf in traverse_util.flatten_dict(tree).items():
            out[_torch_key(collection, path)] = ((collection, *path), tuple(leaf.shape))
    return out


def _torch_key(collection: str, path: tuple[str, ...]) -> str:
    *module, leaf = path
    if collection == "batch_stats":
        leaf = _BN_STATS_BACK[leaf]
    elif leaf in ("kernel", "scale"):
        leaf = "weight"
    return ".".join([*module, leaf])


def torch_to_flax(state_dict: Mapping[str, torch.Tensor], module: FCN) -> Variables:
    """Flax variables of ``module`` from a PyTorch state dict, loaded strictly.

    Args:
        state_dict: the FCN's state dict (``model.state_dict()``, or a checkpoint's ``state_dict``;
            of the inference form when ``module.folded``).
        module: the Flax FCN it must fit.

    Raises:
        CheckpointError: naming missing or unexpected keys, or a key whose shape differs.
    """
    expected = variable_shapes(module)
    missing, unexpected = sorted(set(expected) - set(state_dict)), sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"state dict does not fit the Flax {module.backbone} FCN-{module.variant}: "
                              f"missing {_preview(missing)}, unexpected {_preview(unexpected)}")
    flat: dict[tuple[str, ...], Any] = {}
    for key, (path, shape) in expected.items():
        value = state_dict[key].detach().cpu().numpy()
        if path[-1] == "num_batches_tracked":
            value = value.astype(np.int32)
        elif path[-1] == "kernel":
            value = value.transpose(2, 3, 1, 0)
        if value.shape != shape:
            raise CheckpointError(f"{key} has shape {tuple(value.shape)}, the Flax model expects {shape} "
                                  f"(after conversion)")
        flat[path] = jnp.asarray(value)
    return traverse_util.unflatten_dict(flat)


def flax_to_torch(variables: Variables) -> dict[str, torch.Tensor]:
    """A PyTorch state dict (for `fcnseg.models.build_model`'s FCN) from Flax variables."""
    state: dict[str, torch.Tensor] = {}
    for collection, tree in variables.items():
        for path, leaf in traverse_util.flatten_dict(tree).items():
            value = np.asarray(jax.device_get(leaf))
            if path[-1] == "kernel":
                value = value.transpose(3, 2, 0, 1)
            if path[-1] == "num_batches_tracked":
                value = value.astype(np.int64)
            state[_torch_key(collection, path)] = torch.from_numpy(np.array(value))  # a writable copy
    return state


def _preview(keys: list[str], limit: int = 4) -> str:
    shown = ", ".join(keys[:limit])
    return f"{len(keys)} [{shown}{', ...' if len(keys) > limit else ''}]"


def from_torch_model(model: torch.nn.Module) -> tuple[FCN, Variables]:
    """The Flax FCN and its variables for an fcnseg PyTorch FCN (as built, or its inference form)."""
    module = flax_model_of(model)
    return module, torch_to_flax(model.state_dict(), module)
