"""experiments/: the table writer on fake metrics, and Q1's quick mode end to end on CamVid
(skipped runs, a resumed run, a refused folder). `pytest -m slow` runs every table through subprocesses."""
from __future__ import annotations

import json
import sys

import pytest

from tests.conftest import REPO_ROOT, require_shared  # noqa: E402  (importlib mode: tests is a namespace)

sys.path.insert(0, str(REPO_ROOT / "experiments"))
import run as experiments  # noqa: E402
from tables import Row, format_seconds, markdown_table, write_table  # noqa: E402


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
    assert out.count("fcnseg train ") == 6 + 6 + 5 + 2 + 2 and out.count("fcnseg eval ") == 8
    assert out.count("fcnseg tune ") == 1 and not (tmp_path / "x").exists()


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
