"""A real run folder, as `fcnseg train` writes it, small enough for tests (about 5 s on two cores)."""
from __future__ import annotations

from pathlib import Path

from fcnseg.cli import main
from fcnseg.data.synthetic import make_synthetic


def tiny_run(base: Path) -> Path:
    """``base/tiny-run``: 2 epochs of a ResNet-18 FCN-8s on 16 synthetic 48x64 scenes (4 in val),
    trained once per test session (the folder is reused when it is complete)."""
    run = base / "tiny-run"
    if (run / "best.pt").is_file() and (run / "metrics.json").is_file():
        return run
    data = make_synthetic(base / "tiny-data", num_classes=3, n=20, size=(48, 64), seed=0, progress=False)
    status = main(["train", "--root", str(data), "--out", str(run), "--weights-backbone", "none", "--crop", "48x64",
                   "--epochs", "2", "--batch-size", "8", "--workers", "0", "--device", "cpu", "--no-progress",
                   "--overwrite"])
    assert status == 0
    return run
