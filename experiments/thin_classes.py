"""Q6: options for thin and rare classes, each scored on a holdout of train (val never read).

One training run per option against the cross-entropy baseline: median-frequency class weights,
OHEM, cross-entropy + Lovasz-softmax, cross-entropy + Dice, larger crops, multi-scale training, and
FCN-4s when fcnseg has it. Every run trains with ``--holdout`` and is scored on the held-out training
images; test-time augmentation (multi-scale + flip) is scored by ``fcnseg eval --split train
--holdout`` on the baseline's and the best row's checkpoints. `choose` turns these scores into the
recipe Q7 trains (recommended.py), by the fixed rule CHOICE_RULE, so that no number is picked by hand.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from runner import EvalRun, TrainRun
from settings import BODIES, Settings, recommended_budget
from tables import Row

MARGIN = 0.005  # an option must beat what it would replace by half a point of mIoU to be adopted
TOLERANCE = 1e-9  # float rounding: a gain of exactly MARGIN counts
LOSS = "loss"  # the group of options that replace cross-entropy: one of them at most
CHOICE_RULE = (
    "Choice rule (applied by experiments/thin_classes.py to Q6's holdout mIoU, one seed per row): the best "
    f"of the loss rows (class weights, OHEM, CE + Lovasz, CE + Dice; one loss at a time) is adopted if it beats the "
    f"cross-entropy baseline by at least {100 * MARGIN:.1f} points; larger crops, multi-scale training and FCN-4s are "
    f"each adopted if their row beats the baseline by at least {100 * MARGIN:.1f} points, but a crop or scale range "
    "applies to Q7 only when Q6 trained with Q7's budget (`--budget recommended`); otherwise Q7 keeps the "
    "recommended run's crop and scale range, since 15 epochs cannot judge augmentations meant for 80; multi-scale "
    "+ flip test-time augmentation is adopted if it raises the holdout "
    f"mIoU of every checkpoint it was tried on by at least {100 * MARGIN:.1f} points. Options adopted separately "
    "are combined untested; everything else (steps, batch, lr, warm-up) is the recommended run's budget.")


@dataclass(frozen=True)
class Option:
    """One Q6 row: what it changes against the cross-entropy baseline.

    Attributes:
        key: the run-name suffix ("ce", "ohem", "crop360x480", ...).
        label: what the row says.
        group: "baseline", "loss" (exclusive), "crop", "scale" or "variant".
        args: extra ``fcnseg train`` options (a loss, class weights).
        changes: Settings fields it replaces (crop, scale_range).
        variant: the FCN variant.
    """

    key: str
    label: str
    group: str
    args: tuple[str, ...] = ()
    changes: tuple[tuple[str, Any], ...] = ()
    variant: str = "8s"


@dataclass
class Choice:
    """Q7's recipe as chosen from Q6: the options adopted, test-time augmentation or not, and why."""

    adopted: list[Option] = field(default_factory=list)
    tta: bool = False
    reasons: list[str] = field(default_factory=list)

    def option(self, group: str) -> Option | None:
        return next((o for o in self.adopted if o.group == group), None)


@dataclass
class Selection:
    """Q6's runs of one body: each option's training run, the holdout evaluations, the choice."""

    body: str
    budget: Settings
    trained: list[tuple[Option, str, TrainRun | None]]  # (option, run name, run; None in a dry run)
    skipped: list[str]
    evals: list[tuple[Option, EvalRun | None, EvalRun | None]] = field(default_factory=list)  # plain, TTA
    choice: Choice | None = None  # None in a dry run


def options(settings: Settings, variants: tuple[str, ...]) -> tuple[list[Option], list[str]]:
    """Q6's rows for a budget, and a note for each row left out (FCN-4s before fcnseg has it)."""
    rows = [Option("ce", "cross-entropy (baseline)", "baseline"),
            Option("ce-mfw", "cross-entropy + median-frequency class weights", LOSS,
                   ("--class-weights", "median-frequency")),
            Option("ohem", "OHEM (cross-entropy on the hardest pixels)", LOSS, ("--loss", "ohem")),
            Option("ce-lovasz", "cross-entropy + Lovasz-softmax", LOSS, ("--loss", "ce+lovasz")),
            Option("ce-dice", "cross-entropy + Dice", LOSS, ("--loss", "ce+dice"))]
    skipped = []
    if settings.large_crop != settings.crop:
        rows.append(Option(f"crop{settings.large_crop}", f"larger crops ({settings.large_crop})", "crop",
                           changes=(("crop", settings.large_crop),)))
    else:
        skipped.append(f"Larger crops: no row, the baseline already trains on {settings.crop} crops.")
    low, high = settings.wide_scale
    if tuple(settings.wide_scale) != tuple(settings.scale_range):
        rows.append(Option(f"scale{low}-{high}", f"multi-scale training (random scale {low}-{high})", "scale",
                           changes=(("scale_range", tuple(settings.wide_scale)),)))
    else:
        skipped.append(f"Multi-scale training: no row, the baseline already scales by {low}-{high}.")
    if "4s" in variants:
        rows.append(Option("ce", "FCN-4s (a stride-4 skip)", "variant", variant="4s"))
    else:
        skipped.append(f"FCN-4s: not measured, fcnseg has no such variant yet (fcnseg.models.fcn.VARIANTS is "
                       f"{', '.join(variants)}); the table gets its row once it has.")
    return rows, skipped


def choose(scores: list[tuple[Option, float]], tta: list[tuple[float, float]]) -> Choice:
    """Applies CHOICE_RULE.

    Args:
        scores: (option, holdout mIoU) of every Q6 row, the baseline among them.
        tta: (plain, with test-time augmentation) holdout mIoU of each checkpoint it was tried on.
    """
    baseline = next(miou for option, miou in scores if option.group == "baseline")
    choice = Choice()

    def judge(option: Option, miou: float, what: str) -> None:
        adopted = miou >= baseline + MARGIN - TOLERANCE
        choice.reasons.append(f"{what}: {option.label} {100 * miou:.1f} vs baseline {100 * baseline:.1f}: "
                              + ("adopted" if adopted else "not adopted"))
        if adopted:
            choice.adopted.append(option)

    losses = [(option, miou) for option, miou in scores if option.group == LOSS]
    if losses:
        judge(*max(losses, key=lambda pair: pair[1]), "best loss")
    for option, miou in scores:
        if option.group in ("crop", "scale", "variant"):
            judge(option, miou, option.group)
    choice.tta = bool(tta) and all(augmented >= plain + MARGIN - TOLERANCE for plain, augmented in tta)
    pairs = ", ".join(f"{100 * plain:.1f} -> {100 * augmented:.1f}" for plain, augmented in tta)
    choice.reasons.append(f"test-time augmentation: {pairs or 'not measured'}: "
                          + ("adopted" if choice.tta else "not adopted"))
    return choice


def select(ex: Any, body: str) -> Selection:
    """Trains (or finds) Q6's runs of ``body``, evaluates test-time augmentation on the holdout and
    chooses; made once per body for Q6 and Q7 alike. ``ex`` is run.py's Experiments."""
    if body in ex.selections:
        return ex.selections[body]
    from fcnseg.models.fcn import VARIANTS

    budget = recommended_budget(ex.s, body) if ex.budget == "recommended" else ex.s
    rows, skipped = options(budget, VARIANTS)
    selection = Selection(body, budget, [], skipped)
    for option in rows:
        name, args, _ = ex.model(body, variant=option.variant)
        name += f"-h{ex.s.holdout}" + ("-rec" if ex.budget == "recommended" else "") + f"-{option.key}"
        args += [*ex.common(settings=replace(budget, **dict(option.changes))), "--holdout", ex.s.holdout,
                 *option.args]
        selection.trained.append((option, name, ex.runner.train(name, args)))
    done = [(option, name, run) for option, name, run in selection.trained if run is not None]
    if not done:  # dry run: the baseline's evaluations show the commands
        holdout_evals(ex, selection.trained[0][1])
        ex.runner.log("# (the best row's checkpoint gets the same two evaluations, once the rows are trained)")
    else:
        best = max(done, key=lambda item: item[2].metrics["miou"])
        for option, name, _ in [done[0]] + ([best] if best is not done[0] else []):
            selection.evals.append((option, *holdout_evals(ex, name)))
        selection.choice = choose([(option, run.metrics["miou"]) for option, _, run in done],
                                  [(plain.report["miou"], tta.report["miou"]) for _, plain, tta in selection.evals])
    ex.selections[body] = selection
    return selection


def holdout_evals(ex: Any, name: str) -> tuple[EvalRun | None, EvalRun | None]:
    """``fcnseg eval`` of run ``name``'s last.pt on its holdout: one padded pass, then with test-time
    augmentation (multi-scale + flip)."""
    s = ex.s
    run_dir = ex.runner.out / "runs" / name
    args = ["--dataset", "camvid", "--root", str(ex.root), "--split", "train", "--holdout", s.holdout,
            "--mode", "whole", "--batch-size", "4", "--amp", s.eval_amp, "--workers", str(s.workers)]
    if s.max_val_images:
        args += ["--max-images", str(s.max_val_images)]
    plain = ex.runner.evaluate(f"{name} holdout", run_dir / "last.pt", args, run_dir / "eval" / "holdout.json")
    tta = ex.runner.evaluate(f"{name} holdout tta", run_dir / "last.pt", [*args, *s.tta],
                             run_dir / "eval" / "holdout-tta.json")
    return plain, tta


def tta_text(settings: Settings) -> str:
    """("--scales", "0.75", "1", "1.25", "--flip") -> "scales 0.75/1/1.25 + flip"."""
    scales, words = [], list(settings.tta)
    if "--scales" in words:
        for word in words[words.index("--scales") + 1:]:
            if word.startswith("--"):
                break
            scales.append(word)
    return " + ".join(([f"scales {'/'.join(scales)}"] if scales else []) + (["flip"] if "--flip" in words else []))


def q6(ex: Any) -> None:
    """Writes Q6: one row per option and body, test-time augmentation below, the choice in the notes."""
    selections = [select(ex, body) for body in ex.selection_bodies]
    rows, eval_rows, notes = [], [], []
    for sel in selections:
        name = f"{BODIES[sel.body].name} ({'ImageNet' if sel.body == 'mobilenet_v2' else 'random init'})"
        for option, _, run in sel.trained:
            rows.append(ex.row(run, f"{name}, FCN-{option.variant}, {option.label}"))
        for option, plain, tta in sel.evals:
            for report, how in ((plain, "one padded pass"), (tta, f"+ {tta_text(ex.s)}")):
                eval_rows.append(Row(f"{name}, {option.label}: {how}", report.report, report.report.get("seconds"),
                                     str(report.path), report.command))
        if sel.choice is not None:
            notes.append(f"{name}, what Q7 takes: " + "; ".join(sel.choice.reasons) + ".")
        notes += sel.skipped
    budget = selections[0].budget
    notes = [f"Selection table: every row trains on the other {100 - round(100 * float(ex.s.holdout))}% of CamVid "
             "train and is scored on the held-out images; val is never read, so these numbers choose Q7's recipe "
             "without looking at the split Q7 reports. One seed per row: differences below about a point are "
             "within the noise of one draw.",
             "Losses (fcnseg.ops.losses): median-frequency weights scale each class's cross-entropy by median "
             "class frequency / its frequency in the training masks; OHEM keeps the pixels whose true class has "
             "probability below 0.7 (at least 1/16 of them); Lovasz-softmax (a surrogate of each class's IoU) "
             "and Dice are added to cross-entropy with weight 1. Larger crops and multi-scale training change "
             f"only the crop or the scale range of the baseline ({budget.crop}, {'-'.join(budget.scale_range)}).",
             CHOICE_RULE, *notes]
    ex.write("q6", "Q6. Thin and rare classes: losses, crops, scales, test-time augmentation (chosen on a holdout "
             "of train)", rows, notes=notes,
             extra_tables=[(f"Test-time augmentation on the same holdout (`fcnseg eval --split train --holdout "
                            f"{ex.s.holdout}`, last.pt of the baseline and of the best row; eval time: the "
                            "prediction loop over the holdout, batch 4):", eval_rows, "eval time")])
