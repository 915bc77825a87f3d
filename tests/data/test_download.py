"""Downloads and extraction, against a local HTTP server and tiny archives built here."""
from __future__ import annotations

import hashlib
import io
import socket
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from fcnseg.data import VOCSegmentation
from fcnseg.data.download import VOC2012_FILENAME, download_voc2012, fetch, md5sum, safe_extract
from fcnseg.errors import DataError

PAYLOAD = bytes(range(256)) * 64  # 16 KiB
PAYLOAD_MD5 = hashlib.md5(PAYLOAD).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        server = self.server
        data = server.files.get(self.path)
        server.log.append((self.path, self.headers.get("Range")))
        if data is None:
            self.send_error(404)
            return
        start = 0
        if self.headers.get("Range") and server.ranges:
            start = int(self.headers["Range"].split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        if server.cut_after is not None:  # a dropped connection mid-transfer
            body = body[: server.cut_after]
            server.cut_after = None
        server.sent += len(body)  # before writing: the client may check it as soon as it has the bytes
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.files, httpd.log, httpd.ranges, httpd.cut_after, httpd.sent = {}, [], True, None, 0
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/{VOC2012_FILENAME}"  # nothing listens there any more: refused at once


def make_tar(path: Path, files: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return path


def test_fetch_verifies_and_renames(server, tmp_path):
    server.files["/f.tar"] = PAYLOAD
    dest = fetch([server.url + "/f.tar"], tmp_path / "f.tar", PAYLOAD_MD5, progress=False)
    assert dest.read_bytes() == PAYLOAD and not (tmp_path / "f.tar.part").exists()


def test_bad_checksum_falls_back_to_the_mirror(server, tmp_path):
    server.files["/bad.tar"] = PAYLOAD[:-1] + b"X"
    server.files["/good.tar"] = PAYLOAD
    dest = fetch([server.url + "/bad.tar", server.url + "/good.tar"], tmp_path / "f.tar", PAYLOAD_MD5, progress=False)
    assert md5sum(dest) == PAYLOAD_MD5
    assert [path for path, _ in server.log] == ["/bad.tar", "/good.tar"]
    assert server.log[1][1] is None  # the corrupt download was discarded, not resumed


def test_every_checksum_wrong_is_an_error_and_leaves_nothing(server, tmp_path):
    server.files["/bad.tar"] = b"something else"
    with pytest.raises(DataError, match=f"MD5 {hashlib.md5(b'something else').hexdigest()}, expected {PAYLOAD_MD5}"):
        fetch([server.url + "/bad.tar"], tmp_path / "f.tar", PAYLOAD_MD5, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_download_resumes_with_range(server, tmp_path):
    server.files["/f.tar"] = PAYLOAD
    server.cut_after = 5000
    with pytest.raises(DataError, match="(?s)could not download .*connection closed after 5000 of 16384 bytes"):
        fetch([server.url + "/f.tar"], tmp_path / "f.tar", PAYLOAD_MD5, progress=False)
    assert not (tmp_path / "f.tar").exists() and (tmp_path / "f.tar.part").stat().st_size == 5000
    server.sent = 0
    fetch([server.url + "/f.tar"], tmp_path / "f.tar", PAYLOAD_MD5, progress=False)
    assert server.log[-1] == ("/f.tar", "bytes=5000-") and server.sent == len(PAYLOAD) - 5000
    assert (tmp_path / "f.tar").read_bytes() == PAYLOAD


def test_server_without_range_restarts(server, tmp_path):
    server.files["/f.tar"] = PAYLOAD
    server.ranges = False
    (tmp_path / "f.tar.part").write_bytes(b"stale bytes from elsewhere")
    fetch([server.url + "/f.tar"], tmp_path / "f.tar", PAYLOAD_MD5, progress=False)
    assert (tmp_path / "f.tar").read_bytes() == PAYLOAD


def test_complete_part_file_is_accepted_after_416(server, tmp_path):
    server.files["/f.tar"] = PAYLOAD
    (tmp_path / "f.tar.part").write_bytes(PAYLOAD)
    fetch([server.url + "/f.tar"], tmp_path / "f.tar", PAYLOAD_MD5, progress=False)
    assert (tmp_path / "f.tar").read_bytes() == PAYLOAD


def test_file_urls_work(tmp_path):
    (tmp_path / "src.tar").write_bytes(PAYLOAD)
    dest = fetch([(tmp_path / "src.tar").as_uri()], tmp_path / "out" / "f.tar", PAYLOAD_MD5, progress=False)
    assert dest.read_bytes() == PAYLOAD


def test_offline_error_says_where_to_put_the_file(tmp_path):
    url = closed_port_url()
    with pytest.raises(DataError) as err:
        download_voc2012(tmp_path, urls=[url], progress=False)
    message = str(err.value)
    assert url in message and "6cd6e144f989b92b3379bac3b3de84fd" in message
    assert str(tmp_path / VOC2012_FILENAME) in message
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("member, links", [
    ("../evil", None),
    ("/tmp/fcnseg-absolute-evil", None),
    ("VOCdevkit/../../evil", None),
    (None, {"VOCdevkit/link": "../../outside"}),
])
def test_malicious_members_are_refused_before_writing(tmp_path, member, links):
    files = {"VOCdevkit/ok.txt": b"fine"}
    if member:
        files[member] = b"pwned"
    archive = make_tar(tmp_path / "evil.tar", files, links)
    target = tmp_path / "target"
    with pytest.raises(DataError, match="refusing to extract member"):
        safe_extract(archive, target, progress=False)
    assert not (tmp_path / "evil").exists() and not Path("/tmp/fcnseg-absolute-evil").exists()
    assert list(target.iterdir()) == []  # checked first: nothing at all was written


def test_safe_extract_merges_into_existing_folders(tmp_path):
    (tmp_path / "VOCdevkit" / "VOC2007").mkdir(parents=True)
    archive = make_tar(tmp_path / "a.tar", {"VOCdevkit/VOC2012/x.txt": b"x"})
    safe_extract(archive, tmp_path, progress=False)
    assert (tmp_path / "VOCdevkit" / "VOC2007").is_dir()
    assert (tmp_path / "VOCdevkit" / "VOC2012" / "x.txt").read_bytes() == b"x"
    assert not any(p.name.startswith(".extracting") for p in tmp_path.iterdir())


def test_corrupt_archive_is_a_data_error(tmp_path):
    (tmp_path / "broken.tar").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(DataError, match="cannot extract .*broken.tar"):
        safe_extract(tmp_path / "broken.tar", tmp_path / "t", progress=False)


@pytest.fixture
def voc_tar(tmp_path, make_voc_tree):
    tree = tmp_path / "tree"
    make_voc_tree(tree)
    archive = tmp_path / "served.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(tree / "VOCdevkit", arcname="VOCdevkit")
    return archive


def test_download_voc2012_end_to_end(server, tmp_path, voc_tar):
    server.files["/voc.tar"] = voc_tar.read_bytes()
    root = tmp_path / "data"
    base = download_voc2012(root, urls=[closed_port_url(), server.url + "/voc.tar"], md5=md5sum(voc_tar), progress=False)
    assert base == root / "VOCdevkit" / "VOC2012"
    assert len(VOCSegmentation(root, "train", download=False)) == 2
    assert (root / VOC2012_FILENAME).is_file()  # kept for a later re-extraction
    # Already there: no network at all (an empty URL list would fail if it were needed).
    assert download_voc2012(root, urls=[], md5="0" * 32, progress=False) == base


def test_dataset_download_flag_uses_a_hand_placed_archive(tmp_path, voc_tar, monkeypatch):
    import fcnseg.data.download as download

    root = tmp_path / "data"
    root.mkdir()
    (root / VOC2012_FILENAME).write_bytes(voc_tar.read_bytes())
    monkeypatch.setattr(download, "VOC2012_URLS", ())
    monkeypatch.setattr(download, "VOC2012_MD5", md5sum(voc_tar))
    assert len(VOCSegmentation(root, "val", download=True)) == 1


def test_hand_placed_archive_with_wrong_checksum_is_kept_and_reported(tmp_path, voc_tar):
    (tmp_path / VOC2012_FILENAME).write_bytes(voc_tar.read_bytes()[:-512])
    with pytest.raises(DataError, match="has MD5 .* expected 0123.*Delete it"):
        download_voc2012(tmp_path, urls=[], md5="0123" + "0" * 28, progress=False)
    assert (tmp_path / VOC2012_FILENAME).stat().st_size == voc_tar.stat().st_size - 512
