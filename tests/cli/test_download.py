"""`fcnseg download voc2012`: a served archive is extracted; offline it says how to proceed by hand."""
from __future__ import annotations

import io
import socket
import tarfile

import pytest

import fcnseg.data.download as download
from fcnseg.cli import main


@pytest.fixture
def tiny_voc_tar(tmp_path):
    archive = tmp_path / "voc.tar"
    with tarfile.open(archive, "w") as tar:
        for name, data in {"VOCdevkit/VOC2012/ImageSets/Segmentation/train.txt": b"a\n",
                           "VOCdevkit/VOC2012/JPEGImages/README": b"-"}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return archive


def test_download_from_a_mirror(tmp_path, tiny_voc_tar, monkeypatch, capsys):
    monkeypatch.setattr(download, "VOC2012_URLS", (tiny_voc_tar.as_uri(),))
    monkeypatch.setattr(download, "VOC2012_MD5", download.md5sum(tiny_voc_tar))
    root = tmp_path / "data"
    assert main(["download", "voc2012", "--root", str(root), "--no-progress"]) == 0
    assert (root / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "train.txt").read_bytes() == b"a\n"
    assert "VOC2012 ready" in capsys.readouterr().out


def test_offline(tmp_path, monkeypatch, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/VOCtrainval_11-May-2012.tar"
    monkeypatch.setattr(download, "VOC2012_URLS", (url,))
    # A download that fails is a failure at run time (exit status 1), not a usage error.
    assert main(["download", "voc2012", "--root", str(tmp_path), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert url in err and download.VOC2012_MD5 in err and "put it at" in err and "Traceback" not in err
