"""experiments/repo_paths.py: the commands the tables and docs/RESULTS.md show name files relative to the
repository (``../shared/data/...``), never by this machine's absolute paths."""
from __future__ import annotations

import json
import sys

from tests.conftest import REPO_ROOT  # noqa: E402  (importlib mode: tests is a namespace)

sys.path.insert(0, str(REPO_ROOT / "experiments"))
import run as experiments  # noqa: E402
from repo_paths import DOCUMENTED_SHARED_DATA, command_text, repo_relative, shared_data_dir  # noqa: E402
from tables import Row, write_table  # noqa: E402


def test_paths_in_the_repository_and_the_shared_data_become_relative(tmp_path):
    repo, shared = tmp_path / "clone", tmp_path / "elsewhere" / "data"
    assert repo_relative(str(shared / "camvid"), repo, shared) == "../shared/data/camvid"
    assert repo_relative(str(shared), repo, shared) == "../shared/data"
    assert repo_relative(str(repo / "runs" / "a" / "last.pt"), repo, shared) == "runs/a/last.pt"
    assert repo_relative(str(tmp_path / "sibling" / "w.pth"), repo, shared) == "../sibling/w.pth"
    # Options, numbers, relative paths and paths the user chose elsewhere are kept as given.
    for arg in ("--root", "0.01", "runs/x", "none", "/opt/data/camvid"):
        assert repo_relative(arg, repo, shared) == arg


def test_command_text_of_a_command_with_absolute_paths():
    shared = shared_data_dir()
    command = ["train", "--root", str(shared / "camvid"), "--weights-backbone",
               str(shared / "weights" / "mobilenet_v2_imagenet_features.pth"), "--lr", "0.01",
               "--out", str(REPO_ROOT / "runs" / "experiments" / "runs" / "a")]
    assert command_text(command) == ("fcnseg train --root ../shared/data/camvid --weights-backbone "
                                     "../shared/data/weights/mobilenet_v2_imagenet_features.pth --lr 0.01 "
                                     "--out runs/experiments/runs/a")
    assert DOCUMENTED_SHARED_DATA.as_posix() == "../shared/data"


def test_written_tables_show_no_absolute_path(tmp_path):
    shared = shared_data_dir()
    run_dir = REPO_ROOT / "runs" / "experiments" / "runs" / "a"
    command = ["train", "--root", str(shared / "camvid"), "--out", str(run_dir)]
    rows = [Row("a", {"miou": 0.5, "per_class_iou": {"Sky": 0.9}}, 60.0, str(run_dir), command)]
    md, js = write_table(tmp_path / "q9", "q9", "Q9. A title", "A caption.", rows)
    text = md.read_text()
    assert "fcnseg train --root ../shared/data/camvid --out runs/experiments/runs/a" in text
    assert str(REPO_ROOT) not in text and str(shared) not in text
    row = json.loads(js.read_text())["rows"][0]
    assert row["command"] == ["train", "--root", "../shared/data/camvid", "--out", "runs/experiments/runs/a"]
    assert row["run"] == "runs/experiments/runs/a"


def test_dry_run_prints_commands_relative_to_the_repository(capsys):
    # The default data location: whatever it is on this machine, the commands name ../shared/data.
    assert experiments.main(["q1", "--dry-run", "--bodies", "mobilenet_v2"]) == 0
    out = capsys.readouterr().out
    commands = [line for line in out.splitlines() if line.startswith("fcnseg ")]
    assert len(commands) == 3
    for line in commands:
        assert "--root ../shared/data/camvid" in line
        assert "--weights-backbone ../shared/data/weights/mobilenet_v2_imagenet_features.pth" in line
        assert str(REPO_ROOT.parent) not in line
