"""experiments/: the table writer on fake metrics, every dry-run command, Q1's quick mode end to end on
CamVid (skipped runs, a resumed run, a refused folder), and Q6 + Q7 quick (options scored on a holdout of
train, the choice, the recipe trained on all of train). `pytest -m slow` runs every table through
subprocesses."""
from __future__ import annotations

import json
import re
import sys

import pytest

from tests.conftest import REPO_ROOT, require_shared  # noqa: E402  (importlib mode: tests is a namespace)

sys.path.insert(0, str(REPO_ROOT / "experiments"))
import run as experiments  # noqa: E402
from tables import Row, format_seconds, markdown_table, write_table  # noqa: E402

from fcnseg.models.fcn import VARIANTS  # noqa: E402


def fake_metrics(miou: float, iou: list[float | None]) -> dict:
    return {"pixel_acc": 0.9, "mean_acc": 0.5, "miou": miou, "fwiou": 0.8,
            "per_class_iou": dict(zip(["Sky", "Road", "Car"], iou))}


def test_table_writer_on_fake_metrics(tmp_path):
    rows = [Row("a", fake_metrics(0.5, [0.9, 0.6, None]), 3725.0, "runs/a", ["train", "--out", "runs/a"]),
            Row("b", fake_metrics(0.61234, [0.8, 0.7, 0.33333]), 59.6, "runs/b", ["train", "--out", "runs/b"])]
    table = markdown_table(rows)
    lines = table.splitlines()
    assert lines[0] == "| Setting | mIoU | pixel acc | mean acc | train time | Sky | Road | Car |"
    assert lines[2] == "| a | 50.0 | 90.0 | 50.0 | 1 h 02 min | 90.0 | 60.0 | – |"
    assert lines[3] == "| b | **61.2** | 90.0 | 50.0 | 1 min 00 s | 80.0 | 70.0 | 33.3 |"
    md, js = write_table(tmp_path / "q9", "q9", "Q9. A title", "A caption.", rows, time_label="eval time",
                         settings={"epochs": 1}, notes=["a note"])
    text = md.read_text()
    assert text.startswith("### Q9. A title\n\nA caption.\n\n| Setting | mIoU | pixel acc | mean acc | eval time |")
    assert "- a note" in text and "fcnseg train --out runs/b" in text
    payload = json.loads(js.read_text())
    assert payload["settings"] == {"epochs": 1} and [r["label"] for r in payload["rows"]] == ["a", "b"]
    assert payload["rows"][0]["metrics"]["per_class_iou"]["Car"] is None


def test_format_seconds():
    assert [format_seconds(s) for s in (None, 4.4, 60, 3599, 7200)] == ["–", "4 s", "1 min 00 s", "59 min 59 s", "2 h 00 min"]


def test_dry_run_prints_every_command(tmp_path, capsys):
    assert experiments.main(["all", "--dry-run", "--out", str(tmp_path / "x"), "--root", str(tmp_path),
                             "--weights", str(tmp_path / "w.pth")]) == 0
    out = capsys.readouterr().out
    # Q1-Q5 as before; Q6: 7 MobileNetV2 rows (8 once fcnseg has FCN-4s) and the baseline's two holdout
    # evaluations; Q7: 2 bodies x 2 seeds, each with its val evaluation with test-time augmentation.
    q6_rows = 8 if "4s" in VARIANTS else 7
    assert out.count("fcnseg train ") == 6 + 6 + 5 + 2 + 2 + q6_rows + 4 and out.count("fcnseg eval ") == 8 + 2 + 4
    assert out.count("fcnseg tune ") == 1 and not (tmp_path / "x").exists()
    tune = next(line for line in out.splitlines() if line.startswith("fcnseg tune "))
    assert " --holdout 0.2 " in tune and tune.endswith("q4/tune-holdout")
    q6 = out[out.index("=== q6"):out.index("=== q7")].splitlines()
    assert sum(" --holdout 0.2 " in line for line in q6 if line.startswith("fcnseg train ")) == q6_rows
    assert all("--split train --holdout 0.2" in line for line in q6 if line.startswith("fcnseg eval "))
    q7 = out[out.index("=== q7"):].splitlines()
    trains = [line for line in q7 if line.startswith("fcnseg train ")]
    assert not any("--holdout" in line for line in q7) and all("--iterations 3" in line for line in trains)
    assert [line.split("--seed ")[1].split()[0] for line in trains] == ["0", "1", "0", "1"]
    assert "--model fcn_mobilenet_v2" in trains[0] and "--lr 0.02 " in trains[0] and "--warmup-iters 100 " in trains[0]
    assert "--model fcn_resnet18" in trains[2] and "--lr 0.03 " in trains[2] and "--iterations 3800 " in trains[2]


def test_q6_budget_recommended_trains_the_rows_with_the_recommended_runs_budget(tmp_path, capsys):
    assert experiments.main(["q6", "--dry-run", "--budget", "recommended", "--bodies", "resnet18", "mobilenet_v2",
                             "--out", str(tmp_path / "x"), "--root", str(tmp_path), "--weights", str(tmp_path / "w.pth")]) == 0
    trains = [line for line in capsys.readouterr().out.splitlines() if line.startswith("fcnseg train ")]
    # MobileNetV2's budget already has the larger crops and scales (no rows for them); ResNet-18's has
    # 360x480 crops but scale 0.75-1.75, so it keeps the multi-scale row.
    extra = 1 if "4s" in VARIANTS else 0
    assert len(trains) == (6 + extra) + (5 + extra)
    assert all("--crop 360x480 " in line and "--holdout 0.2 " in line for line in trains)
    assert sum("--iterations 3800 " in line for line in trains) == 6 + extra
    assert sum("--iterations 3600 " in line for line in trains) == 5 + extra


def test_q1_quick_end_to_end_skips_and_resumes(tmp_path, capsys):
    require_shared("camvid")
    require_shared("weights/mobilenet_v2_imagenet_features.pth")
    out = tmp_path / "experiments"
    assert experiments.main(["q1", "--quick", "--out", str(out)]) == 0
    table = json.loads((out / "q1" / "table.json").read_text())
    assert [r["label"].split("FCN-32s, ")[-1] for r in table["rows"]] == [
        "bilinear init, learned", "Xavier init, learned", "bilinear, fixed"]
    assert all(0 <= r["metrics"]["miou"] <= 1 and len(r["metrics"]["per_class_iou"]) == 11 for r in table["rows"])
    assert all(r["seconds"] is not None for r in table["rows"])
    md = (out / "q1" / "table.md").read_text()
    assert "Quick check only" in md and "64x96 crops" in md and "2 images at 360x480" in md
    assert (out / "RESULTS.md").read_text().count("### Q1.") == 1

    # Finished runs are skipped.
    capsys.readouterr()
    assert experiments.main(["q1", "--quick", "--out", str(out)]) == 0
    assert capsys.readouterr().out.count("done before") == 3

    # A run cut after its last checkpoint resumes (and ends with the same metrics).
    run_dir = out / "runs" / "mobilenet_v2-imagenet-32s-xavier"
    before = json.loads((run_dir / "metrics.json").read_text())
    (run_dir / "metrics.json").unlink()
    assert experiments.main(["q1", "--quick", "--out", str(out)]) == 0
    assert "resuming an interrupted run" in capsys.readouterr().out
    assert "--resume" in (run_dir / "train.log").read_text()
    assert json.loads((run_dir / "metrics.json").read_text()) == before

    # A folder made by another command is refused, not reused.
    spec = json.loads((run_dir / "experiment.json").read_text())
    spec["command"][spec["command"].index("--iterations") + 1] = "3"
    (run_dir / "experiment.json").write_text(json.dumps(spec))
    assert experiments.main(["q1", "--quick", "--out", str(out)]) == 1
    assert "holds a run of another command" in capsys.readouterr().err


def test_q7_trains_the_seeds_given(tmp_path, capsys):
    assert experiments.main(["q7", "--dry-run", "--seeds", "4", "7", "4", "--bodies", "mobilenet_v2",
                             "--out", str(tmp_path / "x")]) == 0
    out = capsys.readouterr().out
    trains = [line for line in out.splitlines() if line.startswith("fcnseg train ")]
    # Q6's rows first (seed 0, on the holdout of train), then Q7's runs: one per seed given, on all of train.
    q7 = [t for t in trains if "--holdout" not in t]
    assert [re.search(r"--seed (\d+)", t).group(1) for t in q7] == ["4", "7"]
    assert len(trains) - len(q7) == (8 if "4s" in VARIANTS else 7)


def test_q6_q7_quick_choose_on_the_holdout_then_train_on_all_of_train(tmp_path):
    require_shared("camvid")
    require_shared("weights/mobilenet_v2_imagenet_features.pth")
    out = tmp_path / "experiments"
    assert experiments.main(["q6", "q7", "--quick", "--out", str(out)]) == 0
    q6 = json.loads((out / "q6" / "table.json").read_text())
    assert len(q6["rows"]) == (8 if "4s" in VARIANTS else 7) and "holdout" in q6["caption"]
    for row in q6["rows"]:  # each row validated on 2 training images held out of training, not on val
        run_dir = REPO_ROOT / row["run"]
        assert "--holdout 0.2" in " ".join(row["command"]) and "--split" not in row["command"]
        assert "validating on 2 images held out of the training split (0.2)" in (run_dir / "train.log").read_text()
    # fcnseg eval --split train --holdout 0.2 scores the images the runs validated on: its plain pass
    # repeats the run's final validation.
    evals = q6["extra_tables"][0]["rows"]
    trained = {re.split(r", FCN-\d+s, ", r["label"])[1]: r["metrics"]["miou"] for r in q6["rows"]}
    plain = [r for r in evals if r["label"].endswith("one padded pass")]
    assert plain and len(evals) == 2 * len(plain)
    for r in plain:
        assert r["metrics"]["miou"] == pytest.approx(trained[r["label"].split(", ", 1)[1].split(":")[0]], abs=1e-6)

    # The choice, by the rule written in the notes, recomputed from the table.
    base = trained["cross-entropy (baseline)"]
    losses = {k: v for k, v in trained.items() if k.startswith(("cross-entropy +", "OHEM"))}
    best_loss = max(losses, key=losses.get)
    tta = [(p["metrics"]["miou"], t["metrics"]["miou"]) for p, t in zip(evals[::2], evals[1::2])]
    tta_adopted = all(b >= a + 0.005 - 1e-9 for a, b in tta)
    q7 = json.loads((out / "q7" / "table.json").read_text())
    commands = [" ".join(r["command"]) for r in q7["rows"]]
    trains = [c for c in commands if c.startswith("train ")]
    assert len(trains) == 2 and len(q7["rows"]) == (4 if tta_adopted else 2)
    assert [c.split("--seed ")[1].split()[0] for c in trains] == ["0", "1"]
    assert not any("--holdout" in c for c in commands)
    loss_args = {"cross-entropy + median-frequency class weights": "--class-weights median-frequency",
                 "OHEM (cross-entropy on the hardest pixels)": "--loss ohem",
                 "cross-entropy + Lovasz-softmax": "--loss ce+lovasz", "cross-entropy + Dice": "--loss ce+dice"}
    for loss, args in loss_args.items():
        assert all((args in c) == (loss == best_loss and losses[loss] >= base + 0.005 - 1e-9) for c in trains)
    crop_adopted = trained["larger crops (96x128)"] >= base + 0.005 - 1e-9
    assert all(("--crop 96x128" if crop_adopted else "--crop 64x96") in c for c in trains)
    if "4s" in VARIANTS:
        fcn4s_adopted = trained["FCN-4s (a stride-4 skip)"] >= base + 0.005 - 1e-9
        assert all(("--variant 4s" if fcn4s_adopted else "--variant 8s") in c for c in trains)
    md = (out / "q7" / "table.md").read_text()
    assert "Targets (issue 22" in md and "Quick check only" in md and "curves.png" in md
    mious = [r["metrics"]["miou"] for r in q7["rows"] if r["label"].endswith("one padded pass")]
    spread = next(line for line in md.splitlines() if line.startswith("| MobileNetV2 | one padded pass"))
    assert f"| {100 * sum(mious) / 2:.1f} ({100 * min(mious):.1f}-{100 * max(mious):.1f}) |" in spread
    assert (out / "RESULTS.md").read_text().count("### Q6.") == 1


@pytest.mark.slow
def test_every_table_quick_through_subprocesses(tmp_path):
    require_shared("camvid")
    out = tmp_path / "experiments"
    assert experiments.main(["all", "--quick", "--launcher", "subprocess", "--bodies", "resnet18", "mobilenet_v2",
                             "--out", str(out)]) == 0
    for key in experiments.TABLES:
        assert (out / key / "table.md").exists() and (out / key / "table.json").exists(), key
    q5 = json.loads((out / "q5" / "table.json").read_text())
    assert len(q5["rows"]) == 8
    # The plain whole-image evaluation repeats the training run's final validation.
    whole = next(r for r in q5["rows"] if r["label"].startswith("MobileNetV2") and r["label"].endswith("one padded pass"))
    trained = json.loads((out / "runs" / "mobilenet_v2-imagenet-8s-bilinear" / "metrics.json").read_text())
    assert whole["metrics"]["miou"] == pytest.approx(trained["miou"], abs=1e-6)


def test_prediction_grid_script_writes_one_png_of_camvid_examples(tmp_path):
    import torch

    from fcnseg import fcn_mobilenet_v2
    from fcnseg.data import build_dataset
    from fcnseg.models.checkpoint import make_checkpoint, save_checkpoint

    root = require_shared("camvid")
    classes = build_dataset("camvid", root, "val").classes
    torch.manual_seed(0)
    model = fcn_mobilenet_v2(variant="8s", num_classes=len(classes), weights_backbone=None)
    checkpoint = save_checkpoint(make_checkpoint(model, classes=list(classes), colors=[(i * 20, 0, 0) for i in range(len(classes))]),
                                 tmp_path / "model.pt")
    import prediction_grid  # experiments/prediction_grid.py

    out = tmp_path / "grid.png"
    assert prediction_grid.main([str(checkpoint), "--dataset", "camvid", "--root", str(root), "--split", "val",
                                 "--images", "0", "5", "--out", str(out), "--device", "cpu"]) == 0
    from PIL import Image

    with Image.open(out) as grid:
        assert grid.width > grid.height / 2 and grid.height > 200  # two rows of three panels and a legend
