"""What the speed benchmark measures: the sizes of a full and a quick run, and the configurations of
every case with the sentence that describes each in the report.

One list shared by the cases (which build each configuration), the runner (which plans one process
per configuration) and the report (which names its rows), so that the three cannot disagree. Only
constants live here: this module imports nothing, and everything else may import it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES = 21  # VOC's 20 classes and background, as the chapter's model
MARK = "BENCH-RESULT "  # prefixes the JSON result line a case process prints for the runner

FULL: dict[str, Any] = {
    "size": [320, 480], "batches": [1, 8], "train_batch": 8, "repeats": 5, "warmup": 2, "train_repeats": 3,
    "curve_steps": 20, "curve_batch": 4, "curve_lr": 0.001, "epoch_images": 24, "epoch_batch": 8, "epoch_repeats": 2,
    "image_size": [360, 480], "sliding_image": [375, 500], "peak_conv": [4, 256, 56, 56], "compile": True,
}
QUICK: dict[str, Any] = {
    "size": [64, 96], "batches": [1, 2], "train_batch": 2, "repeats": 2, "warmup": 1, "train_repeats": 2,
    "curve_steps": 3, "curve_batch": 2, "curve_lr": 0.001, "epoch_images": 4, "epoch_batch": 2, "epoch_repeats": 1,
    "image_size": [72, 96], "sliding_image": [75, 100], "peak_conv": [1, 32, 28, 28], "compile": False,
}

# Inference configurations: (name, description). The baselines run with glibc's default
# allocator; fcnseg's with `fcnseg.runtime.keep_freed_memory`.
INFER_CONFIGS = {
    "baseline": "chapter model under torch.no_grad (the reference for ratios)",
    "baseline-as-written": "the same, recording autograd as the chapter's predict() does",
    "fp32": "fcnseg FCN-32s, fp32 NCHW, inference_mode",
    "fp32-cl": "+ channels_last",
    "fp32-cl-fold": "+ BatchNorm folded into the convs: fcnseg's inference form, what `Segmenter`, `fcnseg predict` "
                    "and `fcnseg eval` run",
    "fp32-cl-jit": "+ body traced, torch.jit.freeze + optimize_for_inference (oneDNN fusion)",
    "compile": "+ torch.compile (inductor, freezing)",
    "bf16-cl": "channels_last + bf16 autocast (the upsampler in bf16 too where bf16 is native)",
    "bf16-cl-fold": "+ BatchNorm folded into the convs: what `Segmenter` and `fcnseg predict/eval --amp auto` run",
    "bf16-compile": "bf16 autocast + torch.compile (inductor, freezing)",
}
BF16_INFER = ("bf16-cl", "bf16-cl-fold", "bf16-compile")
TRAIN_CONFIGS = {
    "baseline": "chapter's step as written (SGD, d2l loss, accuracy count)",
    "baseline-alloc": "the same, with fcnseg.runtime.keep_freed_memory",
    "fp32": "fcnseg train_step, fp32 NCHW, foreach SGD",
    "fp32-cl": "+ channels_last",
    "compile": "+ torch.compile of the model (inductor)",
    "fp32-cl-fused": "channels_last + the last upsampling fused with the loss: the step `fcnseg train` runs on CPUs "
                     "without native bf16",
    "bf16-cl": "channels_last + bf16 autocast (what `--amp auto` picks on CPUs with native bf16)",
    "bf16-cl-fused": "+ the last upsampling fused with the loss: the step `fcnseg train` runs on CPUs with native bf16",
    "bf16-cl-dice": "bf16-cl with the ce+dice loss (`--loss ce+dice`) on the full-size logits, unfused",
    "bf16-cl-dice-fused": "the same loss fused with the last upsampling (a first pass for Dice's sums): the step "
                          "`fcnseg train --loss ce+dice` runs on CPUs with native bf16",
}
BF16_TRAIN = ("bf16-cl", "bf16-cl-fused")
# Steps of another loss (cross-entropy + Dice): compared with each other, never with the baseline's curve.
DICE_TRAIN = ("bf16-cl-dice", "bf16-cl-dice-fused")
# The frozen-backbone epoch's configurations (the report describes them: their text depends on the CPU).
EPOCH_CONFIGS = ("baseline", "uncached", "cached", "cached-fused", "cached-fused-bf16", "cached-fixed")
UPSAMPLER_CONFIGS = {
    "baseline": "baseline nn.ConvTranspose2d",
    "fcnseg": "fcnseg TransposedConvUpsampler (fp32, channels_last)",
    "fcnseg-bf16": "fcnseg TransposedConvUpsampler (bf16 autocast, channels_last)",
}
# Configurations measured only with bf16 (--bf16): emulated bf16 is several times slower than fp32, so
# on CPUs without it they would add half an hour to a run and only show that.
BF16_CONFIGS = {"infer": BF16_INFER, "train": BF16_TRAIN + DICE_TRAIN, "epoch": ("cached-fused-bf16",), "upsampler": ("fcnseg-bf16",)}
# Configurations that compute fp32 logits; the bf16 ones trade precision for speed and must keep the
# argmax agreement (inference) or the loss curve (training) that the targets require.
EXACT_INFER = ("fp32", "fp32-cl", "fp32-cl-fold", "fp32-cl-jit", "compile")
EXACT_TRAIN = ("fp32", "fp32-cl", "compile", "fp32-cl-fused")
# Cases that measure all their configurations in one process (the others run one process each in a
# full run) and report one result rather than one per configuration.
SINGLE_PROCESS_CASES = ("machine", "curve", "sliding")
