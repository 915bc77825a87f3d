"""The one shared-data helper: finds ../shared/data or $FCNSEG_SHARED_DATA; skips when absent, fails under CI."""
from __future__ import annotations

import pytest

from tests.conftest import REPO_ROOT, SHARED_DATA_ENV, require_shared, shared_data_dir


def test_default_location_is_beside_the_repository(monkeypatch):
    monkeypatch.delenv(SHARED_DATA_ENV, raising=False)
    assert shared_data_dir() == REPO_ROOT.parent / "shared" / "data"


def test_present_data_is_returned(tmp_path, monkeypatch):
    (tmp_path / "camvid").mkdir()
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "w.pth").write_bytes(b"x")
    monkeypatch.setenv(SHARED_DATA_ENV, str(tmp_path))
    monkeypatch.setenv("CI", "true")
    assert require_shared("camvid") == tmp_path / "camvid"
    assert require_shared("weights/w.pth") == tmp_path / "weights" / "w.pth"
    assert require_shared() == tmp_path


@pytest.mark.parametrize("ci", [None, "false", ""])
def test_absent_data_skips_with_the_reason(tmp_path, monkeypatch, ci):
    monkeypatch.setenv(SHARED_DATA_ENV, str(tmp_path))
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.skip.Exception, match=f"{tmp_path / 'camvid'}.*absent.*{SHARED_DATA_ENV}"):
        require_shared("camvid")


@pytest.mark.parametrize("ci", ["true", "TRUE", "1"])
def test_absent_data_fails_under_ci(tmp_path, monkeypatch, ci):
    monkeypatch.setenv(SHARED_DATA_ENV, str(tmp_path / "nowhere"))
    monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.fail.Exception, match="CI=true requires it"):
        require_shared("voc2012-sample")
