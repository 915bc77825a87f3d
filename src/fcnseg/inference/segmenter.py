"""`Segmenter`: a model with its class names, colours and normalisation, predicting photos.

It turns photos in any form (path, PIL image, array, tensor) into label maps of exactly the
photo's size, by whole-image or sliding-window prediction (`fcnseg.inference.windows`). Photos are
read by `fcnseg.data.io.image_to_tensor`, the reader training uses too: files upright by their
EXIF orientation, so a phone photo's label map has the size a viewer shows.
"""
from __future__ import annotations

import contextlib
import os
from types import EllipsisType
from typing import Sequence, overload

import numpy as np
import torch
from torch import nn

from fcnseg.constants import DEFAULT_BACKEND, IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD
from fcnseg.data.io import ImageLike, image_to_tensor
from fcnseg.errors import OptionError
from fcnseg.inference.backends import EngineRequest, make_engine
from fcnseg.inference.windows import (
    DEFAULT_WINDOW,
    MODES,
    Mode,
    Size,
    check_scales,
    check_window,
    predict_scales,
    predict_sliding,
    predict_whole,
)
from fcnseg.models.checkpoint import load_checkpoint, model_from_checkpoint
from fcnseg.models.inference_form import inference_form
from fcnseg.models.model_folder import resolve_model_folder
from fcnseg.ops.argmax import class_map
from fcnseg.runtime import resolve_amp_dtype, select_device


class Segmenter:
    """A model with its class metadata, predicting label maps for images of any size.

    Args:
        model: the FCN. With ``optimize`` a copy of it is moved to ``device`` and put in eval mode;
            otherwise the model itself is.
        classes: class names, index = class id.
        colors: one RGB triple per class.
        mean, std: the normalisation the model was trained with (per channel, on 0..1 values).
        device: "auto"/None for the best available device, or a device name.
        mode: "whole" (one pass per image) or "sliding" (windows averaged, see `predict_sliding`).
        window, stride: sliding-window geometry; ``stride`` None for two thirds of the window.
        flip: horizontal-flip test-time augmentation.
        scales: multi-scale test-time augmentation: the image also predicted resized by these
            factors, logits averaged (`predict_scales`; with ``flip``, flipped at every scale).
            ``(1, 1.5, 2)`` with ``flip`` is what the CamVid recipe's holdout chose (docs/RESULTS.md, Q7),
            at 12x the prediction time.
        batch_size: images (whole mode) or windows (sliding mode) per forward pass.
        amp: mixed precision, as ``--amp``: "auto" (the default) runs bf16 on CPUs that compute
            it natively (AVX-512 BF16, AMX) and on bf16-capable GPUs, fp16 on other GPUs, and
            float32 elsewhere (`fcnseg.runtime.resolve_amp_dtype`); "bf16", "fp16", or "none"
            for float32. The fast path is the default path: on the AVX-512 BF16 CPU of
            docs/BENCHMARKS.md bf16 predicts 1.9x as many images per second as float32, with the
            same class on 100.00% of the pixels.
        dtype: an explicit autocast dtype (``torch.bfloat16``, ``torch.float16``, or None for
            float32) that overrides ``amp``; left out, ``amp`` decides.
        ignore_index: the void label of the training data (kept as metadata; never predicted).
        optimize: predict with `fcnseg.models.inference_form` of an fcnseg FCN (BatchNorm folded
            into the convolutions, channels-last memory: the same logits up to float rounding,
            faster); a copy, so ``model`` itself is left as it is. False, or a model that is not an
            fcnseg FCN, predicts with ``model`` as given.
        backend: the engine that runs the forward pass (`fcnseg.inference.backends`): "auto"
            (the default: the fastest installed engine for the precision, `DEFAULT_BACKEND`),
            "torch", or an installed optional engine.
        compile: compile the engine's graph (`torch.compile` for "torch"): slower first calls,
            faster later ones.
        calibration: images (as `predict` takes them) that calibrate a quantising engine
            ("torch-int8"): a few dozen like those to be segmented.

    Example:
        >>> segmenter = Segmenter.from_checkpoint("runs/voc/best.pt")
        >>> label = segmenter.predict("photo.jpg")          # (H, W) int64 class ids
        >>> proba = segmenter.predict_proba("photo.jpg")    # (C, H, W) float32
    """

    def __init__(
        self,
        model: nn.Module,
        classes: Sequence[str],
        colors: Sequence[Sequence[int]],
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        device: str | torch.device | None = None,
        *,
        mode: Mode = "whole",
        window: Size = DEFAULT_WINDOW,
        stride: Size | None = None,
        flip: bool = False,
        scales: Sequence[float] = (1.0,),
        batch_size: int = 8,
        amp: str = "auto",
        dtype: torch.dtype | None | EllipsisType = ...,
        ignore_index: int = IGNORE_INDEX,
        optimize: bool = True,
        backend: str = DEFAULT_BACKEND,
        compile: bool = False,
        calibration: Sequence[ImageLike] = (),
    ) -> None:
        if mode not in MODES:
            raise OptionError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        if len(classes) != len(colors):
            raise ValueError(f"{len(classes)} class names but {len(colors)} colours")
        if batch_size < 1:
            raise OptionError(f"batch_size must be positive, got {batch_size}")
        check_window(window, stride)  # here, not at the first image: a usage error shows at once
        check_scales(scales)
        self.device = select_device(device)
        self.amp = amp
        amp_dtype = resolve_amp_dtype(amp, self.device)  # also refuses an unknown choice
        # Resolved here, once: the autocast every prediction of this segmenter runs under.
        self.dtype = amp_dtype if dtype is ... else dtype
        self.model = (inference_form(model) if optimize else model).to(self.device).eval()
        self.backend = backend
        self.classes = list(classes)
        self.colors = [tuple(int(v) for v in c) for c in colors]
        self.mean = torch.tensor([float(m) for m in mean], device=self.device).view(3, 1, 1)
        self.std = torch.tensor([float(s) for s in std], device=self.device).view(3, 1, 1)
        calibrate = tuple(self.preprocess(image).unsqueeze(0) for image in calibration)
        # What predictions call: the model itself, or an engine built from it.
        self.engine = make_engine(backend, EngineRequest(self.model, self.device, self.dtype, compile, calibrate))
        self.mode = mode
        self.window = (int(window[0]), int(window[1]))
        self.stride = stride
        self.flip = flip
        self.scales = tuple(float(scale) for scale in scales)
        self.batch_size = batch_size
        self.ignore_index = ignore_index

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | os.PathLike | dict,
        device: str | torch.device | None = None,
        **options,
    ) -> "Segmenter":
        """Builds the model a checkpoint describes, with its classes, colours and normalisation.

        Args:
            checkpoint: a checkpoint file, a model folder (`from_pretrained`), or a loaded checkpoint dict.
            device: as in `Segmenter`.
            **options: ``mode``, ``window``, ``stride``, ``flip``, ``scales``, ``batch_size``, ``amp`` ("auto"
                by default, as in `Segmenter`), ``dtype``, ``optimize``, ``backend``, ``compile``, ``calibration``.

        Raises:
            CheckpointError: missing, corrupt or foreign checkpoint.
        """
        if not isinstance(checkpoint, dict):
            checkpoint = load_checkpoint(checkpoint)
        model = model_from_checkpoint(checkpoint)
        return cls(model, checkpoint["classes"], checkpoint["colors"], checkpoint["mean"], checkpoint["std"],
                   device, ignore_index=checkpoint["ignore_index"], **options)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        revision: str | None = None,
        *,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        device: str | torch.device | None = None,
        **options,
    ) -> "Segmenter":
        """Loads a model folder (``fcnseg export CKPT --format hf``): a local folder, or a Hugging Face
        Hub repository ``"owner/name"`` (downloaded once into the Hugging Face cache; needs
        ``pip install 'fcnseg[hub]'``). Only safetensors and JSON are read: loading runs no code.

        Args:
            name_or_path: a model folder (or a checkpoint file), or a Hub repository id.
            revision: the Hub branch, tag or commit (default: the main branch).
            cache_dir: the Hugging Face cache (default: ``HF_HUB_CACHE``, ~/.cache/huggingface/hub).
            local_files_only: use the cache only, never the network (as ``HF_HUB_OFFLINE=1``).
            device, **options: as in `from_checkpoint`.

        Raises:
            CheckpointError: no such folder, or a folder that is not a model folder (naming the file
                it lacks).
            WeightsError: the repository is neither reachable nor cached; the message says how to
                provide the folder instead.

        Example:
            >>> segmenter = Segmenter.from_pretrained("models/camvid-fcn8s")
        """
        folder = resolve_model_folder(name_or_path, revision=revision, cache_dir=cache_dir,
                                      local_files_only=local_files_only)
        return cls.from_checkpoint(load_checkpoint(folder), device, **options)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def preprocess(self, image: ImageLike) -> torch.Tensor:
        """An image as the model's input: ``(3, H, W)`` float32, normalised, on the device."""
        return (image_to_tensor(image).to(self.device) - self.mean) / self.std

    def logits(self, image: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, C, H, W)`` of a preprocessed batch ``(N, 3, H, W)``, by this segmenter's mode."""
        with self.engine_threads():
            if self.scales != (1.0,):
                return predict_scales(self._logits_at_one_scale, image, self.scales)
            return self._logits_at_one_scale(image)

    def _logits_at_one_scale(self, image: torch.Tensor) -> torch.Tensor:
        if self.mode == "sliding":
            return predict_sliding(self.engine, image, window=self.window, stride=self.stride,
                                   batch_size=self.batch_size, flip=self.flip, dtype=self.dtype)
        return predict_whole(self.engine, image, flip=self.flip, dtype=self.dtype)

    @contextlib.contextmanager
    def engine_threads(self):
        """Torch single-threaded in this thread while another engine (onnxruntime, OpenVINO, JAX)
        computes on the CPU: torch's OpenMP threads spin after each of its parallel regions and take
        the cores from the engine's threads (onnxruntime 46 -> 80 images/s on 2 cores, docs/ENGINES.md)."""
        if isinstance(self.engine, nn.Module) or self.device.type != "cpu":
            yield
            return
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)

    @overload
    def predict(self, image: ImageLike) -> np.ndarray: ...
    @overload
    def predict(self, image: list[ImageLike]) -> list[np.ndarray]: ...

    def predict(self, image):
        """Class ids of each pixel.

        Args:
            image: a path, PIL image, ``(H, W, 3)`` array or ``(3, H, W)`` tensor (uint8 0..255 or
                float 0..1), of any size; or a list of them.

        Returns:
            int64 array ``(H, W)`` of the image's exact size, or a list of them for a list.
        """
        with self.engine_threads():
            if isinstance(image, list):
                return [class_map(logits, 0).cpu().numpy() for logits in self._logits_each(image)]
            return class_map(self._logits_each([image])[0], 0).cpu().numpy()

    @overload
    def predict_proba(self, image: ImageLike) -> np.ndarray: ...
    @overload
    def predict_proba(self, image: list[ImageLike]) -> list[np.ndarray]: ...

    def predict_proba(self, image):
        """Class probabilities (softmax of the logits), as `predict` takes images.

        Returns:
            float32 array ``(C, H, W)``, or a list of them for a list.
        """
        with self.engine_threads():
            if isinstance(image, list):
                return [logits.softmax(0).cpu().numpy() for logits in self._logits_each(image)]
            return self._logits_each([image])[0].softmax(0).cpu().numpy()

    def _logits_each(self, images: list[ImageLike]) -> list[torch.Tensor]:
        """Logits ``(C, H, W)`` per image, in order; images of equal size share forward passes.

        Only equal sizes are batched: padding a smaller image to a larger one would change the
        logits near its border (the model's receptive field sees the padding), so results would
        depend on which other images happen to be in the list.
        """
        tensors = [self.preprocess(image) for image in images]
        results: list[torch.Tensor | None] = [None] * len(tensors)
        by_size: dict[tuple[int, int], list[int]] = {}
        for index, tensor in enumerate(tensors):
            by_size.setdefault(tuple(tensor.shape[-2:]), []).append(index)
        # In sliding mode the batch is of windows, so images go one at a time into predict_sliding.
        per_pass = self.batch_size if self.mode == "whole" else 1
        for indices in by_size.values():
            for start in range(0, len(indices), per_pass):
                chunk = indices[start : start + per_pass]
                logits = self.logits(torch.stack([tensors[i] for i in chunk]))
                for i, item in zip(chunk, logits):
                    results[i] = item
        return results
