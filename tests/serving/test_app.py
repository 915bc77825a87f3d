"""The web app over real HTTP (uvicorn on a free port, the standard library's client): the API's
answers against `fcnseg predict` and the checkpoint, refusals as 4xx, one model call at a time."""
from __future__ import annotations

import io
import json
import re
import threading
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

from fcnseg.cli import main
from fcnseg.serving.app import create_app
from fcnseg.serving.predictor import Predictor
from tests.serving.conftest import CLASSES, COLORS
from tests.serving.helpers import ServerThread, get, photo, png_bytes, post_file, send

pytestmark = pytest.mark.usefixtures("one_thread")

UPLOAD_CAP = 200_000
PIXEL_CAP = 500_000


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gallery")
    Image.fromarray(photo(5, (48, 80))).save(folder / "a.png")
    Image.fromarray(photo(6, (50, 70))).save(folder / "b.jpg")
    (folder / "notes.txt").write_text("not listed")
    return folder


@pytest.fixture(scope="module")
def server(segmenter, gallery):
    predictor = Predictor(segmenter, max_upload_bytes=UPLOAD_CAP, max_pixels=PIXEL_CAP)
    with ServerThread(create_app(predictor, images=gallery)) as url:
        yield url


def test_info_gives_the_checkpoints_classes_and_colours(server):
    answer = get(server + "/api/info")
    info = json.loads(answer.body)
    assert answer.status == 200
    assert info["classes"] == CLASSES and info["colors"] == [list(c) for c in COLORS]
    assert info["max_upload_bytes"] == UPLOAD_CAP and info["max_pixels"] == PIXEL_CAP
    assert info["images"] == ["a.png", "b.jpg"]


def test_predict_returns_the_mask_fcnseg_predict_writes(server, checkpoint, tmp_path):
    path = tmp_path / "street.png"
    Image.fromarray(photo(7, (67, 93))).save(path)
    assert main(["predict", str(checkpoint), str(path), "--out", str(tmp_path / "out"), "--device", "cpu",
                 "--no-progress"]) == 0
    answer = post_file(server + "/api/predict", path.read_bytes(), "street.png", content_type="image/png")
    assert answer.status == 200 and answer.headers["content-type"] == "image/png"
    assert answer.body == (tmp_path / "out" / "street.png").read_bytes()
    ids = np.asarray(Image.open(io.BytesIO(answer.body)))
    assert json.loads(answer.headers["x-fcnseg-counts"]) == [int((ids == k).sum()) for k in range(3)]
    assert answer.headers["x-fcnseg-size"] == "67x93"


def test_bad_uploads_get_4xx_with_a_message_and_the_server_keeps_serving(server):
    url = server + "/api/predict"
    cases = [
        (post_file(url, b"%PDF-1.4 not an image", "paper.jpg"), 400, "paper.jpg"),
        (post_file(url, png_bytes(photo(0))[:80], "cut.png"), 400, "cut.png"),
        (post_file(url, b"x" * (UPLOAD_CAP + 1), "huge.jpg"), 413, "above the upload cap"),
        (post_file(url, b"x" * (UPLOAD_CAP * 3), "huger.jpg"), 413, "above the upload cap"),  # over the form's margin
        # 1000 x 600 pixels of one colour: a few kilobytes of PNG, refused from its header.
        (post_file(url, png_bytes(np.zeros((600, 1000, 3), np.uint8)), "wide.png"), 413, "600,000 pixels"),
        (post_file(url, png_bytes(photo(0)), "a.png", field="photo"), 400, "field 'image'"),
        # Refused after the body is read, however large (under the cap): the client gets the answer.
        (post_file(url + "?mode=diagonal", b"x" * (UPLOAD_CAP - 10), "a.png"), 400, "whole or sliding"),
        (post_file(url + "?flip=maybe", png_bytes(photo(0)), "a.png"), 400, "flip"),
    ]
    plain = urllib.request.Request(url, data=b"y" * (UPLOAD_CAP - 10), headers={"Content-Type": "text/plain"})
    cases.append((send(plain), 400, "multipart/form-data"))
    for answer, status, words in cases:
        assert answer.status == status, answer.body
        assert words in json.loads(answer.body)["error"]
    assert get(server + "/api/predict").status == 405
    assert get(server + "/api/info").status == 200
    assert post_file(url, png_bytes(photo(1)), "fine.png").status == 200


def test_the_page_is_served_self_contained(server):
    answer = get(server + "/")
    page = answer.body.decode()
    assert answer.status == 200 and answer.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in answer.headers["content-security-policy"]
    assert not re.search(r"(src|href)=\"(https?:)?//", page)  # nothing fetched from elsewhere
    for element in ('id="file"', 'id="opacity"', 'id="sliding"', 'id="flip"', 'id="download"', 'id="legend"'):
        assert element in page


def test_gallery_serves_listed_images_only(server, gallery):
    assert get(server + "/api/images/a.png").body == (gallery / "a.png").read_bytes()
    for name in ("notes.txt", "..%2Fa.png", "missing.png"):
        assert get(server + f"/api/images/{name}").status == 404
    assert json.loads(get(server + "/api/images").body) == ["a.png", "b.jpg"]


def test_model_calls_run_one_at_a_time_while_the_page_keeps_answering(segmenter):
    predictor = Predictor(segmenter)
    active, most, lock = [0], [0], threading.Lock()
    original = segmenter.predict

    def slow_predict(image):
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        time.sleep(0.3)
        try:
            return original(image)
        finally:
            with lock:
                active[0] -= 1

    segmenter.predict = slow_predict
    try:
        with ServerThread(create_app(predictor)) as url:
            answers = []
            threads = [threading.Thread(target=lambda i=i: answers.append(
                post_file(url + "/api/predict", png_bytes(photo(i)), f"{i}.png"))) for i in range(3)]
            for t in threads:
                t.start()
            time.sleep(0.15)
            started = time.perf_counter()
            assert get(url + "/api/info").status == 200
            info_seconds = time.perf_counter() - started
            for t in threads:
                t.join()
    finally:
        del segmenter.predict
    assert [a.status for a in answers] == [200, 200, 200]
    assert most[0] == 1
    assert info_seconds < 0.3  # answered while the three predictions (0.9 s at least) queued
