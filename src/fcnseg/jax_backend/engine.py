"""The "jax" inference engine: an fcnseg FCN converted to Flax, jit-compiled per input shape.

`fcnseg.inference.backends` builds it for ``Segmenter(..., backend="jax")`` and ``fcnseg predict
--backend jax``. It takes the model the segmenter holds, in either form: as built (BatchNorm in
inference mode, running statistics) or the inference form with BatchNorm folded into the
convolutions (the segmenter's default); the Flax model mirrors whichever it gets, so the logits are
the PyTorch model's up to float rounding. Torch tensors cross to JAX as NumPy arrays on the CPU.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch

from fcnseg.errors import CheckpointError, OptionError
from fcnseg.inference.backends import EngineRequest
from fcnseg.jax_backend.convert import Variables, from_torch_model
from fcnseg.jax_backend.models import FCN

# torch autocast dtype -> the dtype the Flax model computes in. fp16 is refused: XLA's CPU backend
# emulates it, and JAX here is a CPU install.
_COMPUTE_DTYPES = {None: jnp.float32, torch.float32: jnp.float32, torch.bfloat16: jnp.bfloat16}


# Module-level, with the Flax module (hashable by its fields) and dtype static: segmenters of the same
# model architecture share compilations, one per input shape.
@functools.partial(jax.jit, static_argnames=("module", "dtype"))
def forward(variables: Variables, image: jax.Array, *, module: FCN, dtype: Any) -> jax.Array:
    """NCHW float32 in, NCHW float32 logits out; the transposes run inside the compiled graph."""
    if dtype != jnp.float32:
        variables = jax.tree_util.tree_map(lambda v: v.astype(dtype) if v.dtype == jnp.float32 else v, variables)
    logits = module.apply(variables, jnp.transpose(image, (0, 2, 3, 1)).astype(dtype), train=False)
    return jnp.transpose(logits, (0, 3, 1, 2)).astype(jnp.float32)


class JaxEngine:
    """A callable ``(N, 3, H, W)`` float32 torch batch -> ``(N, C, H, W)`` float32 torch logits.

    Args:
        module: the Flax FCN.
        variables: its ``params`` and ``batch_stats``.
        device: the torch device the logits are returned on.
        dtype: the JAX compute dtype (``jnp.float32`` or ``jnp.bfloat16``).

    `forward` is compiled once per input shape (and keeps every compiled shape), so a run over
    photos of many sizes compiles once per size; sliding windows all share one shape.
    """

    def __init__(self, module: FCN, variables: Variables, device: torch.device, dtype: Any = jnp.float32) -> None:
        self.module = module
        self.variables = jax.device_put(variables)
        self.device = device
        self.dtype = dtype

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        batch = image.detach().to("cpu", torch.float32).contiguous().numpy()
        logits = np.array(forward(self.variables, batch, module=self.module, dtype=self.dtype))  # writable, for torch
        return torch.from_numpy(logits).to(self.device)


def jax_engine(request: EngineRequest) -> JaxEngine:
    """The factory `fcnseg.inference.backends` registers as "jax".

    Raises:
        OptionError: fp16 autocast (use bf16 or none), or a model that is not an fcnseg FCN.
    """
    if request.dtype not in _COMPUTE_DTYPES:
        raise OptionError(f"backend 'jax' computes in float32 or bfloat16, not {request.dtype}; "
                          "use --amp bf16 or --amp none (Python: amp='bf16' or 'none')")
    try:
        module, variables = from_torch_model(request.model)
    except CheckpointError as err:
        raise OptionError(f"backend 'jax': {err}") from None
    return JaxEngine(module, variables, request.device, _COMPUTE_DTYPES[request.dtype])
