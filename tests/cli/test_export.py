"""`fcnseg export`: writes the ONNX file and prints the parity report."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fcnseg import fcn_resnet18
from fcnseg.cli import main
from fcnseg.models.checkpoint import make_checkpoint, save_checkpoint

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'fcnseg[export]')")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = fcn_resnet18(variant="16s", num_classes=3, weights_backbone=None)
    return save_checkpoint(make_checkpoint(model, classes=["a", "b", "c"], colors=[(0, 0, 0), (1, 2, 3), (4, 5, 6)]),
                           tmp_path_factory.mktemp("ck") / "fcn16s.pt")


def test_export_prints_the_parity_report(checkpoint, tmp_path, capsys):
    out = tmp_path / "model.onnx"
    # The legacy exporter keeps this test quick; tests/test_export.py covers the dynamo one.
    status = main(["export", str(checkpoint), "--format", "onnx", "--out", str(out), "--exporter", "legacy",
                   "--sizes", "64x96", "67x93"])
    printed = capsys.readouterr().out
    assert status == 0 and out.is_file()
    assert "2x3x64x96: max abs diff" in printed and "1x3x67x93: max abs diff" in printed
    assert "all within 0.0001" in printed and "dynamic batch, height and width" in printed

    from fcnseg.export import read_onnx_metadata

    assert read_onnx_metadata(out)["classes"] == ["a", "b", "c"]


def test_no_verify_and_default_output_path(checkpoint, tmp_path, capsys):
    local = tmp_path / "copy.pt"
    local.write_bytes(checkpoint.read_bytes())
    assert main(["export", str(local), "--exporter", "legacy", "--opset", "17", "--no-verify"]) == 0
    printed = capsys.readouterr().out
    assert (tmp_path / "copy.onnx").is_file()
    assert "not checked" in printed and "opset 17" in printed


def test_errors_are_clean(checkpoint, tmp_path, capsys):
    assert main(["export", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "m.onnx")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert main(["export", str(checkpoint), "--opset", "17", "--out", str(tmp_path / "m.onnx")]) == 2
    assert "opset 18" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", str(checkpoint), "--sizes", "64by96"])


@pytest.mark.parametrize(("out", "message"), [
    ("{tmp}", "is a folder; give a file name"),
    ("{checkpoint}/m.onnx", "fcn16s.pt is a file, not a folder"),
])
def test_a_bad_out_is_refused_before_exporting(out, message, checkpoint, tmp_path, monkeypatch, capsys):
    import fcnseg.export.onnx

    monkeypatch.setattr(fcnseg.export.onnx, "export_onnx", lambda *a, **k: pytest.fail("exported before checking --out"))
    assert main(["export", str(checkpoint), "--out", out.format(tmp=tmp_path, checkpoint=checkpoint)]) == 2
    assert message in capsys.readouterr().err


def test_verify_is_a_flag_pair_and_tolerance_must_be_positive(checkpoint, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert main(["export", str(checkpoint), "--out", str(out), "--exporter", "legacy", "--sizes", "64x64",
                 "--no-verify", "--verify", "--static"]) == 0
    assert "all within" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exited:
        main(["export", str(checkpoint), "--tolerance", "0"])
    assert exited.value.code == 2 and "--tolerance" in capsys.readouterr().err
