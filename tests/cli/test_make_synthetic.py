"""`fcnseg make-synthetic`: writes a loadable folder dataset; bad arguments are one-line errors."""
from __future__ import annotations

from fcnseg.cli import main
from fcnseg.data import build_dataset


def test_writes_a_dataset(tmp_path, capsys):
    out = tmp_path / "scenes"
    assert main(["make-synthetic", str(out), "--classes", "3", "--n", "5", "--size", "24x32", "--seed", "7",
                 "--no-progress"]) == 0
    assert f"--dataset folder --root {out}" in capsys.readouterr().out
    train, val = build_dataset("folder", out, "train"), build_dataset("folder", out, "val")
    assert (len(train), len(val)) == (4, 1) and len(train.classes) == 3
    assert train[0][0].shape == (3, 24, 32)


def test_bad_arguments_are_reported_without_traceback(tmp_path, capsys):
    assert main(["make-synthetic", str(tmp_path / "x"), "--size", "big"]) == 2
    assert "--size must look like 128x160" in capsys.readouterr().err
    assert main(["make-synthetic", str(tmp_path / "x"), "--classes", "99", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "2 to 41 classes" in err and "Traceback" not in err
