"""`fcnseg serve` as a user starts it: a process on 127.0.0.1 answering the API; usage errors before it listens."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from PIL import Image

from fcnseg.cli import main
from tests.serving.conftest import CLASSES, save_tiny_checkpoint
from tests.serving.helpers import ServerThread, free_port, get, photo, png_bytes, post_file


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ck") / "fcn8s.pt")


@pytest.fixture(scope="module")
def served(checkpoint, tmp_path_factory):
    gallery = tmp_path_factory.mktemp("photos")
    Image.fromarray(photo(3, (40, 56))).save(gallery / "one.png")
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "fcnseg", "serve", str(checkpoint), "--port", str(port), "--device", "cpu",
         "--images", str(gallery), "--max-upload-mb", "0.05"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            if get(url + "/api/info").status == 200:
                break
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"fcnseg serve did not start: {process.communicate()}")
        time.sleep(0.2)
    yield process, url, port
    if process.poll() is None:
        process.kill()
        process.wait()


def test_serves_on_loopback_by_default_and_stops_on_ctrl_c(served):
    process, url, port = served
    info = json.loads(get(url + "/api/info").body)
    assert info["classes"] == CLASSES and info["images"] == ["one.png"]
    assert info["max_upload_bytes"] == int(0.05 * 2**20)
    assert post_file(url + "/api/predict", png_bytes(photo(4, (40, 56))), "x.png").status == 200
    assert post_file(url + "/api/predict", b"0" * 60_000, "big.jpg").status == 413
    assert get(url + "/api/info").status == 200
    # Bound to 127.0.0.1 only: listening there, and the port is free on the machine's other addresses.
    other = socket.gethostbyname(socket.gethostname())
    if not other.startswith("127."):
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((other, port))
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert f"open http://127.0.0.1:{port}/" in out
    assert "Traceback" not in err


def test_usage_errors_before_listening(checkpoint, tmp_path, capsys):
    assert main(["serve", str(tmp_path / "missing.pt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert main(["serve", str(checkpoint), "--images", str(tmp_path / "nowhere")]) == 2
    assert "--images" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(checkpoint), "--port", str(port), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "--port" in err and len(err.strip().splitlines()) == 1


def test_options_reach_the_app_and_an_open_host_is_warned_about(checkpoint, monkeypatch, capsys):
    import fcnseg.serving.server as server

    served = {}
    monkeypatch.setattr(server, "run_server", lambda app, host, port: served.update(app=app, host=host, port=port))
    port = free_port()
    assert main(["serve", str(checkpoint), "--host", "0.0.0.0", "--port", str(port), "--mode", "sliding", "--flip",
                 "--max-upload-mb", "1", "--max-pixels", "5000", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert served["host"] == "0.0.0.0" and served["port"] == port
    assert "other machines can reach this server" in captured.err
    with ServerThread(served["app"]) as url:  # the app the command built, served here
        info = json.loads(get(url + "/api/info").body)
        refused = post_file(url + "/api/predict", png_bytes(photo(0, (80, 80))), "p.png")
    assert (info["mode"], info["flip"], info["window"]) == ("sliding", True, [32, 48])  # the checkpoint's crop
    assert (info["max_upload_bytes"], info["max_pixels"]) == (2**20, 5000)
    assert refused.status == 413 and "6,400 pixels" in json.loads(refused.body)["error"]
