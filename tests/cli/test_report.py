"""`fcnseg report` as a user runs it: the summary line, the file, usage errors in one line with status 2."""
from __future__ import annotations

import re

import pytest

from fcnseg.cli import main
from tests.reporting.helpers import tiny_run


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    return tiny_run(tmp_path_factory.getbasetemp())


def test_writes_the_report_and_says_how_the_model_did(run_folder, tmp_path, capsys):
    out = tmp_path / "deep" / "r.html"
    assert main(["report", str(run_folder), "--out", str(out), "--images", "2", "--device", "cpu",
                 "--no-progress"]) == 0
    line = capsys.readouterr().out.strip()
    assert re.fullmatch(rf"{re.escape(str(out))}: 2 of 4 val images, mIoU 0\.\d{{4}}, pixel accuracy 0\.\d{{4}}; "
                        r"worst: \d{5}\.png \(mIoU \d\.\d{4}\)", line), line
    assert out.read_text().count('class="image"') == 2


@pytest.mark.parametrize("argv, words", [
    (["report", "{tmp}/nowhere"], "run folder"),
    (["report", "{tmp}"], "not a run folder"),
    (["report", "{run}", "--out", "{tmp}"], "is a folder"),
    (["report", "{run}", "--checkpoint", "{tmp}/x.pt"], "--checkpoint"),
    (["report", "{run}", "--images", "-1"], "--images"),
])
def test_usage_errors(run_folder, tmp_path, capsys, argv, words):
    try:  # argparse exits by itself for a malformed value; fcnseg's own checks return the status
        status = main([a.format(tmp=tmp_path, run=run_folder) for a in argv])
    except SystemExit as exit_:
        status = exit_.code
    assert status == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err
