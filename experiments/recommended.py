"""Q7: the recommended recipe that follows from Q6, trained on all of train, two seeds, val read once.

For each body, the options Q6 chose on its holdout of train (`thin_classes.choose`) are trained with
the recommended run's budget (`settings.RECOMMENDED`) on the whole training split, once per seed.
Each run is scored on val once: its final validation (one padded pass over whole images) and, when
Q6 adopted it, ``fcnseg eval`` with test-time augmentation. The table gives every run, the mean and
spread over the seeds, where the curves are, and whether issue 22's targets (`settings.TARGETS`) are met.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from repo_paths import repo_relative
from runner import EvalRun, TrainRun
from settings import BODIES, TARGETS, Settings, recommended_budget
from tables import Row, format_seconds
from thin_classes import CHOICE_RULE, LOSS, Choice, Selection, select, tta_text

THIN = "Pole"  # the thinnest CamVid class, with its own target


@dataclass
class Result:
    """One Q7 run: its training run (final val metrics) and its val evaluation with test-time augmentation."""

    body: str
    seed: int
    label: str
    run: TrainRun | None
    tta: EvalRun | None
    budget: Settings


def recipe(sel: Selection, body: str, settings: Settings) -> tuple[Settings, str, tuple[str, ...], str]:
    """(budget, variant, extra training options, words) of the recipe Q6 chose for ``body``: the
    recommended budget with Q6's adopted options. Q6's crop and scale rows change the crop and scale
    range only when Q6 trained with Q7's budget (``--budget recommended``): a 15-epoch run cannot
    judge an augmentation meant for 80 epochs, so after Q6 at the Q budget they stay the
    recommended run's."""
    choice = sel.choice or Choice()
    budget = recommended_budget(settings, body)
    at_budget = (sel.budget.iterations, sel.budget.epochs) == (budget.iterations, budget.epochs)
    changes: dict[str, Any] = {}
    for option in choice.adopted:
        if at_budget or option.group not in ("crop", "scale"):
            changes.update(dict(option.changes))
    budget = replace(budget, **changes)
    variant = next((o.variant for o in choice.adopted if o.group == "variant"), "8s")
    loss = choice.option(LOSS)
    low, high = budget.scale_range
    words = (f"{loss.label if loss else 'cross-entropy'}, {budget.crop} crops, scale {low}-{high}, "
             f"{budget.iterations or budget.epochs} {'steps' if budget.iterations else 'epochs'}")
    return budget, variant, loss.args if loss else (), words


def train_and_score(ex: Any, body: str, sel: Selection, seed: int) -> Result:
    """Trains ``body`` with the recipe of ``sel`` on all of train (seed ``seed``) and evaluates val with
    test-time augmentation when Q6 adopted it (or, in a dry run, to show the command)."""
    budget, variant, loss_args, words = recipe(sel, body, ex.s)
    name, args, label = ex.model(body, variant=variant)
    low, high = budget.scale_range
    loss = sel.choice.option(LOSS) if sel.choice else None
    name += f"-rec-{loss.key if loss else 'ce'}-crop{budget.crop}-scale{low}-{high}-seed{seed}"
    run = ex.runner.train(name, [*args, *ex.common(settings=budget, seed=seed), *loss_args])
    tta = None
    if sel.choice is None or sel.choice.tta:
        run_dir = ex.runner.out / "runs" / name
        eval_args = ["--dataset", "camvid", "--root", str(ex.root), "--split", "val", "--mode", "whole",
                     "--batch-size", "4", "--amp", ex.s.eval_amp, "--workers", str(ex.s.workers), *ex.s.tta]
        if ex.s.max_val_images:
            eval_args += ["--max-images", str(ex.s.max_val_images)]
        tta = ex.runner.evaluate(f"{name} val tta", run_dir / "last.pt", eval_args, run_dir / "eval" / "val-tta.json")
    return Result(body, seed, f"{label}, FCN-{variant}, {words}", run, tta, budget)


def q7(ex: Any) -> None:
    """Writes Q7: every run (and its TTA evaluation), the spread over seeds, targets, curves."""
    results, choices = [], {}
    for body in sorted(ex.bodies, key=lambda b: b != "mobilenet_v2"):  # the headline body first
        source = body if body in ex.selection_bodies else ex.selection_bodies[0]
        sel = select(ex, source)
        if sel.choice is None:
            ex.runner.log("# q7: the options come from q6's holdout scores, unknown in a dry run; the commands "
                          "below show the baseline's")
        choices[body] = (source, sel.choice)
        results += [train_and_score(ex, body, sel, seed) for seed in ex.s.seeds]
    rows = []
    for r in results:
        rows.append(ex.row(r.run, f"{r.label}, seed {r.seed}: one padded pass"))
        if r.run is not None and r.tta is not None:
            rows.append(Row(f"{r.label}, seed {r.seed}: + {tta_text(ex.s)}", r.tta.report, r.run.train_seconds,
                            str(r.tta.path), r.tta.command))
    if not any(rows):
        return  # dry run
    ex.write("q7", "Q7. The recommended recipe, chosen on the holdout of train: two seeds, val read once", rows,
             notes=notes(ex, results, choices), extra_markdown=spread_markdown(results) + "\n\n" + curves(results))


def notes(ex: Any, results: list[Result], choices: dict[str, tuple[str, Choice | None]]) -> list[str]:
    lines = ["Every run trains on all of CamVid train (no holdout) and is read on val once: the final "
             "validation of last.pt (the periodic validations only draw the curves; nothing is chosen from them) "
             "and, where Q6 adopted it, one `fcnseg eval` with test-time augmentation. The recipe was chosen on "
             "Q6's holdout of train, never on val."]
    for body, (source, choice) in choices.items():
        from_where = "its own Q6 rows" if source == body else f"{BODIES[source].name}'s Q6 rows (Q6 did not run {BODIES[body].name})"
        budget = next(r.budget for r in results if r.body == body)
        lines.append(f"{BODIES[body].name}: options from {from_where}: "
                     + "; ".join(choice.reasons if choice else ["none (dry run)"])
                     + f". Budget (the recommended run's): {budget.iterations} steps of batch {budget.batch_size}, "
                     f"lr {budget.lr} {budget.schedule}, warm-up {budget.warmup_iters}, weight decay {budget.weight_decay}, "
                     f"validation every {budget.eval_every} epoch(s).")
    lines += [CHOICE_RULE, "Not chosen on the holdout: the budget itself (steps, batch, lr, warm-up, weight decay) is "
              "the recommended runs' of docs/RESULTS.md, whose lr 0.02 came from the first Q4 search (scored on "
              "val) and which Q4's re-run, scored on the holdout of train, places among its best trials (see Q4).", targets_text(results)]
    return lines


def _stats(values: list[float | None]) -> tuple[float, float, float] | None:
    known = [v for v in values if v is not None]
    return (statistics.fmean(known), min(known), max(known)) if known and len(known) == len(values) else None


def _spread(stats: tuple[float, float, float] | None) -> str:
    if stats is None:
        return "–"
    mean, low, high = stats
    return f"{100 * mean:.1f} ({100 * low:.1f}-{100 * high:.1f})"


def _verdict(stats: tuple[float, float, float] | None, target: float) -> str:
    if stats is None:
        return "not measured"
    mean, low, _ = stats
    return "yes, every seed" if low >= target else "on average only" if mean >= target else "no"


def predictions(results: list[Result]) -> list[tuple[str, str, list[dict], list[float | None]]]:
    """(body, prediction, metrics of each seed, train seconds of each seed) for the spread table."""
    out = []
    for body in dict.fromkeys(r.body for r in results):
        mine = [r for r in results if r.body == body and r.run is not None]
        seconds = [r.run.train_seconds for r in mine]
        out.append((body, "one padded pass", [r.run.metrics for r in mine], seconds))
        if mine and all(r.tta is not None for r in mine):
            out.append((body, "test-time augmentation", [r.tta.report for r in mine], seconds))
    return out


def spread_markdown(results: list[Result]) -> str:
    """The mean and min-max over seeds of val mIoU, Pole IoU and train time, and the targets met."""
    miou_t, thin_t, hours = 100 * TARGETS["miou"], 100 * TARGETS["pole"], TARGETS["seconds"] / 3600
    lines = [f"Over the seeds ({', '.join(str(s) for s in dict.fromkeys(r.seed for r in results))}): mean (min-max), "
             "in %:", "",
             f"| Body | prediction | seeds | val mIoU | {THIN} IoU | train time mean (max) | mIoU >= {miou_t:g} | "
             f"{THIN} >= {thin_t:g} | training <= {hours:g} h |",
             "|:---|:---|---:|---:|---:|---:|:---|:---|:---|"]
    for body, prediction, metrics, seconds in predictions(results):
        miou = _stats([m.get("miou") for m in metrics])
        thin = _stats([m.get("per_class_iou", {}).get(THIN) for m in metrics])
        known = [s for s in seconds if s is not None]
        time = f"{format_seconds(statistics.fmean(known))} ({format_seconds(max(known))})" if known else "–"
        in_time = "–" if not known else "yes" if max(known) <= TARGETS["seconds"] else "no"
        lines.append(f"| {BODIES[body].name} | {prediction} | {len(metrics)} | {_spread(miou)} | {_spread(thin)} | "
                     f"{time} | {_verdict(miou, TARGETS['miou'])} | {_verdict(thin, TARGETS['pole'])} | {in_time} |")
    return "\n".join(lines)


def targets_text(results: list[Result]) -> str:
    """Issue 22's targets, stated for the MobileNetV2 recipe's chosen prediction."""
    chosen = [p for p in predictions(results) if p[0] == "mobilenet_v2"]
    head = (f"Targets (issue 22, for the recommended MobileNetV2 recipe): val mIoU >= {TARGETS['miou']:.2f}, "
            f"{THIN} IoU >= {TARGETS['pole']:.2f}, within {TARGETS['seconds'] // 3600:g} hour of training on 2 CPU "
            "cores (test-time augmentation adds prediction time, not training time)")
    if not chosen:
        return head + ": not measured here (MobileNetV2 not run)."
    body, prediction, metrics, seconds = chosen[-1]  # with test-time augmentation when Q6 adopted it
    miou = _stats([m.get("miou") for m in metrics])
    thin = _stats([m.get("per_class_iou", {}).get(THIN) for m in metrics])
    known = [s for s in seconds if s is not None]
    in_time = bool(known) and max(known) <= TARGETS["seconds"]
    met = miou is not None and thin is not None and miou[1] >= TARGETS["miou"] and thin[1] >= TARGETS["pole"] and in_time
    return (f"{head}. The recipe's prediction ({prediction}): mIoU {_verdict(miou, TARGETS['miou'])}, "
            f"{THIN} {_verdict(thin, TARGETS['pole'])}, training within the hour: {'yes' if in_time else 'no'}. "
            + ("**All three targets met by every seed.**" if met else "**Not all targets met by every seed.**"))


def curves(results: list[Result]) -> str:
    lines = ["Training curves (loss, val mIoU by epoch) of each run:", ""]
    for r in results:
        if r.run is not None:
            lines.append(f"- {BODIES[r.body].name}, seed {r.seed}: `{repo_relative(str(Path(r.run.run_dir) / 'curves.png'))}`")
    return "\n".join(lines)
