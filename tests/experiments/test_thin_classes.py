"""experiments/thin_classes.py and recommended.py on fake numbers: Q6's rows, the choice rule, Q7's
spread over seeds and its verdict on issue 22's targets."""
from __future__ import annotations

import statistics
import sys
from dataclasses import replace
from pathlib import Path

from tests.conftest import REPO_ROOT  # noqa: E402  (importlib mode: tests is a namespace)

sys.path.insert(0, str(REPO_ROOT / "experiments"))
import recommended  # noqa: E402
from recommended import recipe  # noqa: E402
from runner import TrainRun  # noqa: E402
from settings import FULL, QUICK, RECOMMENDED, recommended_budget  # noqa: E402
from thin_classes import MARGIN, Choice, Selection, choose, options, tta_text  # noqa: E402


def by_key(rows):
    return {(o.key, o.variant): o for o in rows}


def test_q6_rows_follow_the_budget_and_fcn_4s_only_when_fcnseg_has_it():
    rows, skipped = options(FULL, ("32s", "16s", "8s"))
    assert [o.key for o in rows] == ["ce", "ce-mfw", "ohem", "ce-lovasz", "ce-dice", "crop360x480", "scale0.5-2.0"]
    assert [o.group for o in rows].count("loss") == 4 and rows[0].group == "baseline"
    assert dict(by_key(rows)[("crop360x480", "8s")].changes) == {"crop": "360x480"}
    assert by_key(rows)[("ohem", "8s")].args == ("--loss", "ohem")
    assert len(skipped) == 1 and "FCN-4s" in skipped[0] and "32s, 16s, 8s" in skipped[0]

    rows, skipped = options(FULL, ("32s", "16s", "8s", "4s"))
    assert rows[-1].variant == "4s" and rows[-1].group == "variant" and not skipped

    # With the recommended budget, MobileNetV2 already trains on the larger crops and scales: no rows.
    rows, skipped = options(recommended_budget(FULL, "mobilenet_v2"), ("8s",))
    assert [o.group for o in rows] == ["baseline", "loss", "loss", "loss", "loss"] and len(skipped) == 3


def test_choice_rule_adopts_only_what_beats_the_baseline_by_the_margin():
    rows = {o.key: o for o in options(FULL, ("8s", "4s"))[0] if o.variant == "8s"}
    four = options(FULL, ("8s", "4s"))[0][-1]
    base = 0.60
    scores = [(rows["ce"], base), (rows["ce-mfw"], base + 0.02), (rows["ohem"], base + 0.03),
              (rows["ce-lovasz"], base + 0.01), (rows["ce-dice"], base - 0.01),
              (rows["crop360x480"], base + MARGIN), (rows["scale0.5-2.0"], base + MARGIN / 2), (four, base - 0.05)]
    choice = choose(scores, [(0.60, 0.62), (0.63, 0.64)])
    # One loss only, the best (OHEM, not the class weights that also beat the baseline); the crop at
    # exactly the margin; not the scale below it, nor FCN-4s.
    assert [o.key for o in choice.adopted] == ["ohem", "crop360x480"] and choice.tta
    assert choice.option("loss") is rows["ohem"] and choice.option("scale") is None
    assert len(choice.reasons) == 5 and "adopted" in choice.reasons[0] and "not adopted" in choice.reasons[2]

    # No loss beats the baseline by the margin; test-time augmentation must help every checkpoint.
    scores = [(rows["ce"], base), (rows["ce-mfw"], base + MARGIN / 2), (rows["ohem"], base - 0.1)]
    choice = choose(scores, [(0.60, 0.62), (0.63, 0.632)])
    assert choice.adopted == [] and not choice.tta and choose(scores, []).tta is False


def run(metrics_miou: float, pole: float | None, seconds: float, seed: int) -> TrainRun:
    metrics = {"miou": metrics_miou, "per_class_iou": {"Sky": 0.9, "Pole": pole}}
    return TrainRun(f"r{seed}", Path(f"runs/r{seed}"), ["train"], metrics, seconds, {})


def test_q7_recipe_takes_the_chosen_options_onto_the_recommended_budget():
    rows = {o.key: o for o in options(FULL, ("8s",))[0]}
    sel = Selection("mobilenet_v2", FULL, [], [], choice=Choice([rows["ce-lovasz"], rows["scale0.5-2.0"]], True))
    budget, variant, args, words = recipe(sel, "mobilenet_v2", FULL)
    expected = RECOMMENDED["mobilenet_v2"]
    assert (budget.iterations, budget.lr, budget.warmup_iters) == (expected["iterations"], expected["lr"], expected["warmup_iters"])
    # Q6 at the Q budget: its scale row, though adopted, does not judge Q7's longer runs: the
    # recommended run's crop and scale range stay.
    assert budget.crop == expected["crop"] and tuple(budget.scale_range) == tuple(expected["scale_range"])
    assert variant == "8s" and args == ("--loss", "ce+lovasz") and "Lovasz" in words and "3600 steps" in words
    # Q6 at Q7's budget (ResNet-18: 360x480 but scale 0.75-1.75, so it has a multi-scale row): applied.
    at_budget = recommended_budget(FULL, "resnet18")
    wide = {o.key: o for o in options(at_budget, ("8s",))[0]}["scale0.5-2.0"]
    sel_r18 = Selection("resnet18", at_budget, [], [], choice=Choice([wide], False))
    assert tuple(recipe(sel_r18, "resnet18", FULL)[0].scale_range) == ("0.5", "2.0")
    assert tuple(recipe(replace(sel_r18, choice=Choice()), "resnet18", FULL)[0].scale_range) == ("0.75", "1.75")
    assert recipe(replace(sel, choice=None), "resnet18", QUICK)[0].iterations == QUICK.iterations


def test_q7_spread_and_targets_from_the_seeds():
    results = [recommended.Result("mobilenet_v2", 0, "m", run(0.73, 0.26, 3000.0, 0), None, FULL),
               recommended.Result("mobilenet_v2", 1, "m", run(0.715, 0.30, 3700.0, 1), None, FULL)]
    table = recommended.spread_markdown(results)
    line = next(row for row in table.splitlines() if row.startswith("| MobileNetV2 | one padded pass"))
    mean = statistics.fmean([0.73, 0.715])
    assert f"| {100 * mean:.1f} (71.5-73.0) | 28.0 (26.0-30.0) |" in line
    assert "| on average only | yes, every seed | no |" in line  # one seed below 0.72; one run over the hour
    text = recommended.targets_text(results)
    assert "mIoU on average only" in text and "Not all targets met" in text

    results = [recommended.Result("mobilenet_v2", s, "m", run(0.74, 0.27, 3500.0, s), None, FULL) for s in (0, 1)]
    assert "**All three targets met by every seed.**" in recommended.targets_text(results)
    results[1].run.metrics["per_class_iou"]["Pole"] = None  # a class absent from truth and prediction
    assert "Pole not measured" in recommended.targets_text(results)


def test_tta_text():
    assert tta_text(FULL) == "scales 0.75/1/1.25 + flip"
    assert tta_text(replace(FULL, tta=("--flip",))) == "flip"
