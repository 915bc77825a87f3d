"""The issue's speed targets checked against one run's measurements: one PASS/MISS line per target,
with its margin and, for a miss, why (in terms of the machine's measured peak).

The thresholds live here; report.py prints the lines under "## Targets" and quotes the thresholds.
"""
from __future__ import annotations

import math
from typing import Any

from configurations import BF16_INFER, BF16_TRAIN, EXACT_INFER, EXACT_TRAIN, UPSAMPLER_CONFIGS
from formatting import num, pct

MIN_AGREEMENT = 0.99  # argmax agreement with the fp32 baseline a bf16 inference row must keep
# "The same loss curve": the losses of the short fit within this mean relative distance of the
# baseline's. A mean, not a maximum: from step 3 on, fp32 rounding alone moves single steps by up to
# 1.5% (BatchNorm in training mode amplifies it), so a maximum would judge noise.
MAX_CURVE_GAP = 0.01


def targets(results: dict[str, Any], params: dict[str, Any], info: dict[str, Any]) -> list[str]:
    """One PASS/MISS line per target, with the margin and, for a miss, why."""
    machine, infer, train = results.get("machine", {}), results.get("infer", {}), results.get("train", {})
    epoch, up, sliding = results.get("epoch", {}), results.get("upsampler", {}), results.get("sliding")
    curve = results.get("curve") or {}
    native = bool(info.get("mkldnn_bf16"))
    out = [_bf16_inference(infer, machine, params, native), _fp32_inference(infer, machine),
           _training(train, curve, machine, native), _frozen_epoch(epoch, machine, params, native)]
    path = "fcnseg-bf16" if native else "fcnseg"
    shares = [up[path][str(b)]["share"] for b in params["batches"] if str(b) in up.get(path, {})]
    out.append(at_most_target(f"upsampler share of forward time ({UPSAMPLER_CONFIGS[path]}: the path `--amp auto` "
                              "takes on this CPU)", max(shares) if shares else None, 0.10,
                              "the upsampler's GEMM writes the full-resolution logits, a memory-bound cost that "
                              "does not shrink with the body"))
    out.append(at_most_target("sliding-window time per window vs a plain batch",
                              sliding["overhead"] if sliding else None, 0.10,
                              "cropping, stacking and merging window logits adds memory traffic"))
    return out


def _bf16_inference(infer: dict[str, Any], machine: dict[str, Any], params: dict[str, Any], native: bool) -> str:
    """3x the baseline's images/s on the bf16 route, keeping MIN_AGREEMENT at every batch size."""
    peak32, peak16 = machine.get("peak_fp32_gflops"), machine.get("peak_bf16_gflops")
    base = infer.get("baseline", {}).get("batches", {})
    per_batch, best_any = [], []
    for b in base:
        rows = [(infer[c]["batches"][b]["images_per_s"] / base[b]["images_per_s"], c, infer[c]["batches"][b]["agreement"])
                for c in BF16_INFER if b in infer.get(c, {}).get("batches", {})]
        good = [r for r in rows if r[2] >= MIN_AGREEMENT]
        if good:
            per_batch.append((*max(good), b))
        if rows:
            best_any.append(max(rows))
    worst = min(per_batch) if len(per_batch) == len(base) and per_batch else None
    if not native:
        why = (f"bf16 is emulated on this CPU: the bf16 conv peak measured {num(peak16)} GFLOP/s against "
               f"{num(peak32)} in fp32")
    elif not per_batch and best_any:
        why = (f"no bf16 configuration kept {100 * MIN_AGREEMENT:.0f}% argmax agreement (best "
               f"{100 * max(r[2] for r in best_any):.2f}%)")
    else:
        why = ("the bf16 body runs near the bf16 conv peak, and the fp32 baseline already runs at half the fp32 "
               "peak; the remaining time is memory-bound (the upsampler's output, BatchNorm and ReLU passes)")
    if not best_any and base and not params.get("bf16", True):
        return f"**n/a** inference, bf16 route: not measured; {why} (`--bf16 always` measures it anyway)"
    if worst is None and best_any:  # measured, but no bf16 row kept the agreement at every batch size
        return (f"**MISS** inference, bf16 route: no configuration with {100 * MIN_AGREEMENT:.0f}% argmax agreement at "
                f"every batch size (fastest regardless: {min(best_any)[0]:.2f}x). Why: {why}.")
    detail = f" (worst at batch {worst[3]}: {worst[1]}, agreement {100 * worst[2]:.2f}%)" if worst else ""
    return ratio_target("inference, bf16 route" + detail, worst[0] if worst else None, 3.0, why)


def _fp32_inference(infer: dict[str, Any], machine: dict[str, Any]) -> str:
    """1.5x the baseline's images/s on an exact (fp32) path, at every batch size."""
    base = infer.get("baseline", {}).get("batches", {})
    best_fp32 = []
    for b in base:
        candidates = [(infer[c]["batches"][b]["images_per_s"], c) for c in EXACT_INFER
                      if c in infer and b in infer[c]["batches"] and infer[c]["batches"][b]["agreement"] >= MIN_AGREEMENT]
        if candidates:
            ips, config = max(candidates)
            best_fp32.append((ips / base[b]["images_per_s"], config, b))
    worst32 = min(best_fp32) if best_fp32 else None
    detail = f" (worst at batch {worst32[2]}: {worst32[1]})" if worst32 else ""
    needed = 1.5 * base[worst32[2]]["images_per_s"] * machine["fcnseg_forward_gflop"] if worst32 and machine else None
    return ratio_target("inference, fp32 path" + detail, worst32[0] if worst32 else None, 1.5,
                        "the body's convolutions run in oneDNN on both sides; only layout, fusion and the "
                        f"upsampler differ, and 1.5x would take {num(needed)} GFLOP/s, "
                        f"{pct(needed, machine.get('peak_fp32_gflops'))} of the measured fp32 conv peak")


def _training(train: dict[str, Any], curve: dict[str, Any], machine: dict[str, Any], native: bool) -> str:
    """2.5x the baseline's training steps/s at the same loss curve (bf16 rows count only if they keep it)."""
    peak32, peak16 = machine.get("peak_fp32_gflops"), machine.get("peak_bf16_gflops")
    base_train = train.get("baseline", {}).get("images_per_s")
    same_curve = curve.get("mean_rel_diff_bf16") is not None and curve["mean_rel_diff_bf16"] <= MAX_CURVE_GAP
    allowed = EXACT_TRAIN + (BF16_TRAIN if same_curve else ())
    best = max(((train[c]["images_per_s"], c) for c in allowed if c in train), default=None)
    train_ratio = best[0] / base_train if best and base_train else None
    needed = 2.5 * base_train * machine["fcnseg_train_gflop"] if base_train and machine else None
    if not native:
        why = ("forward and backward through ResNet-18 are the same oneDNN convolutions on both sides; 2.5x would "
               f"take {num(needed)} GFLOP/s, {pct(needed, peak32)} of the measured fp32 conv peak, with no native "
               "bf16 on this CPU to trade precision for speed")
    elif not same_curve:
        why = "the bf16 step's losses left the baseline's curve (see Loss curve), so only fp32 rows count"
    else:
        why = (f"2.5x would take {num(needed)} GFLOP/s, {pct(needed, peak16)} of the bf16 conv peak: backward "
               "convolutions, BatchNorm and the optimiser's passes over the weights run below it")
    return ratio_target(f"training step at the same loss curve ({best[1] if best else '-'})", train_ratio, 2.5, why)


def _frozen_epoch(epoch: dict[str, Any], machine: dict[str, Any], params: dict[str, Any], native: bool) -> str:
    """20x faster frozen-backbone epochs on cached features (the one-time cache build excluded)."""
    peak32, peak16 = machine.get("peak_fp32_gflops"), machine.get("peak_bf16_gflops")
    up_gflop = upsampler_gflop(params)
    base_epoch = epoch.get("baseline", {}).get("epoch_s")
    cached = min(((epoch[c]["epoch_s"], c) for c in ("cached", "cached-fused", "cached-fused-bf16") if c in epoch),
                 default=None)
    fixed = epoch.get("cached-fixed", {}).get("epoch_s")
    fixed_text = (f"; with the paper's fixed bilinear final upsampling (upsampler=\"fixed\") the cached epoch is "
                  f"{base_epoch / fixed:.0f}x" if fixed and base_epoch else "")
    steps = (epoch.get("baseline", {}).get("images") or 0) // params["epoch_batch"]
    peak = peak16 if native and cached and "bf16" in cached[1] else peak32
    if cached and steps and peak:
        step_ms = 1e3 * cached[0] / steps
        gemm_ms = 1e3 * 3 * up_gflop * params["epoch_batch"] / peak
        why = (f"what remains of a step ({step_ms:.0f} ms at batch {params['epoch_batch']}) is the head at full "
               f"resolution: the chapter's learned 21x21x64x64 transposed convolution, whose three GEMMs (forward and "
               f"two backward, 3 x {up_gflop:.2f} GFLOP per image, counting only the pixels inside the image) alone "
               f"take {gemm_ms:.0f} ms at the measured conv peak, and a softmax with its gradient over 21 x H x W values per image; 20x needs "
               f"{1e3 * base_epoch / 20 / steps:.0f} ms per step" + fixed_text if base_epoch else "")
    else:
        why = "not all of the epoch case ran"
    return ratio_target(f"frozen-backbone epoch, cached features ({cached[1] if cached else '-'}; excluding the "
                        "one-time cache build)", base_epoch / cached[0] if base_epoch and cached else None, 20.0, why)


def upsampler_gflop(params: dict[str, Any]) -> float:
    """FLOPs of the chapter's transposed convolution (21 classes, stride 32) on one image."""
    h, w = params["size"]
    return 2 * 21 * 21 * 4 * math.ceil(h / 32) * math.ceil(w / 32) * 32 * 32 / 1e9


def ratio_target(name: str, value: float | None, goal: float, why: str) -> str:
    """A speed-up target: PASS when ``value`` (a ratio) reaches ``goal``."""
    if value is None or not math.isfinite(value):
        return f"**n/a** {name}: not measured in this run"
    if value >= goal:
        return f"**PASS** {name}: {value:.2f}x >= {goal:g}x (margin +{100 * (value / goal - 1):.0f}%)"
    return f"**MISS** {name}: {value:.2f}x < {goal:g}x (short by {100 * (1 - value / goal):.0f}%). Why: {why}."


def at_most_target(name: str, value: float | None, goal: float, why: str) -> str:
    """A share target: PASS when ``value`` (a fraction) stays at or under ``goal``."""
    if value is None or not math.isfinite(value):
        return f"**n/a** {name}: not measured in this run"
    if value <= goal:
        return f"**PASS** {name}: {100 * value:.1f}% <= {100 * goal:.0f}% (margin {100 * (goal - value):.1f} points)"
    return f"**MISS** {name}: {100 * value:.1f}% > {100 * goal:.0f}% (over by {100 * (value - goal):.1f} points). Why: {why}."
