"""`fcnseg predict` at scale: engine options, torchrun sharding, and resuming after a real kill -9."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fcnseg import fcn_resnet18
from fcnseg.cli import main
from fcnseg.inference import backends
from fcnseg.inference.segmenter import Segmenter
from fcnseg.models.checkpoint import make_checkpoint, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[2]
ENGINE_CALLS: list[tuple[bool, tuple[int, ...]]] = []


def counting_engine(request: backends.EngineRequest):
    """A test engine: the model itself, noting whether it was asked to compile and each batch shape."""
    def run(image: torch.Tensor) -> torch.Tensor:
        ENGINE_CALLS.append((request.compile, tuple(image.shape)))
        return request.model(image)
    return run


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = fcn_resnet18(variant="32s", num_classes=2, weights_backbone=None)
    return save_checkpoint(make_checkpoint(model, classes=["bg", "fg"], colors=[(0, 0, 0), (255, 0, 0)]),
                           tmp_path_factory.mktemp("ck") / "m.pt")


def _photos(folder: Path, count: int, size: tuple[int, int] = (24, 40)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = [folder / f"img{i}.png" for i in range(count)]
    for p in paths:
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(p)
    return paths


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def test_backend_and_compile_reach_the_engine(checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(backends._FACTORIES, "counting", "tests.cli.test_predict_bulk:counting_engine")
    _photos(tmp_path / "in", 5)
    ENGINE_CALLS.clear()
    argv = ["predict", str(checkpoint), str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--device", "cpu",
            "--no-progress", "--backend", "counting", "--compile", "--batch-size", "2"]
    assert main(argv) == 0, capsys.readouterr()
    assert [c for c, _ in ENGINE_CALLS] == [True] * 3 and [s[0] for _, s in ENGINE_CALLS] == [2, 2, 1]
    with pytest.raises(SystemExit) as exited:
        main(["predict", str(checkpoint), str(tmp_path / "in"), "--out", str(tmp_path / "o2"), "--backend", "nonesuch"])
    assert exited.value.code == 2 and "invalid choice: 'nonesuch'" in capsys.readouterr().err


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    return env


def test_torchrun_two_processes_predict_each_image_once(checkpoint, tmp_path):
    photos = _photos(tmp_path / "in", 6)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "fcnseg", "predict", str(checkpoint), str(tmp_path / "in"), "--out", str(out),
               "--device", "cpu", "--progress", "--batch-size", "2"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=170, env=_env(), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    # Each rank counted its own share: 3 inputs each, never all 6.
    assert done.stderr.count("3/3") == 2 and "6/6" not in done.stderr, done.stderr[-3000:]
    assert done.stdout.count("6 ok, 0 failed") == 1  # one summary, from rank 0
    records = _records(out)
    assert sorted(r["input"] for r in records) == sorted(str(p.resolve()) for p in photos)
    assert all(r["status"] == "ok" for r in records)
    assert not list(out.glob("manifest.rank-*.jsonl"))  # merged into manifest.jsonl
    segmenter = Segmenter.from_checkpoint(checkpoint, device="cpu")
    for p in photos:
        with Image.open(out / f"{p.stem}.png") as written:
            np.testing.assert_array_equal(np.asarray(written), segmenter.predict(p))


@pytest.mark.slow  # two fresh processes (about 20 s); the same protocol is tested in-process in test_bulk.py
def test_kill_9_mid_run_loses_only_the_images_in_flight(checkpoint, tmp_path):
    photos = _photos(tmp_path / "in", 40, size=(64, 96))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "fcnseg", "predict", str(checkpoint), str(tmp_path / "in"), "--out", str(out),
               "--device", "cpu", "--no-progress", "--batch-size", "1", "--amp", "none"]
    process = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        manifest = out / "manifest.jsonl"
        if manifest.is_file() and manifest.read_text().count('"status": "ok"') >= 3:
            break
        time.sleep(0.05)
    if process.poll() is not None:
        pytest.skip("the run finished before it could be killed")
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = sum(r["status"] == "ok" for r in _records(out))  # the last record of each input counts
    latest = {r["input"]: r for r in _records(out)}
    assert 3 <= sum(r["status"] == "ok" for r in latest.values()) < 40
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=170, env=_env())
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"{40 - finished} ok, 0 failed, {finished} already done" in rerun.stdout
    records = _records(out)
    assert len(records) == 40 and all(r["status"] == "ok" for r in records)
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    for p in photos:
        with Image.open(out / f"{p.stem}_overlay.png") as overlay_png:
            overlay_png.load()  # every file whole
