"""Device choice: CUDA, then Apple MPS, then CPU."""
from __future__ import annotations

import torch


def select_device(name: str | torch.device | None = "auto") -> torch.device:
    """Resolves "auto" (or None) to the best available device; passes explicit names through.

    Raises:
        ValueError: an explicit CUDA/MPS device was asked for but is not available.
    """
    if name is None or str(name) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use --device cpu or auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r} requested but MPS is not available; use --device cpu or auto")
    return device
