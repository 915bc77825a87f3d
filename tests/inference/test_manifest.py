"""manifest.jsonl: the last record wins, rank parts of a killed torchrun job fold in, done means whole files."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fcnseg.inference.bulk import predict_files
from fcnseg.inference.manifest import Manifest, make_record, part_name
from fcnseg.inference.segmenter import Segmenter
from tests.conftest import tiny_fcn

pytestmark = pytest.mark.usefixtures("one_thread")


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_done_needs_an_ok_record_and_every_file_at_its_recorded_size(tmp_path):
    (tmp_path / "a.png").write_bytes(b"12345")
    (tmp_path / "manifest.jsonl").write_text(
        json.dumps(make_record("/x/a.jpg", ["a.png"], (2, 3), None, folder=tmp_path)) + "\n"
        + json.dumps(make_record("/x/b.jpg", ["b.png"], None, None, status="pending")) + "\n"
        + json.dumps({"input": "/x/c.jpg", "outputs": ["a.png"], "status": "ok"}) + "\n")  # an older record: no bytes
    manifest = Manifest(tmp_path)
    assert manifest.done("/x/a.jpg") and not manifest.done("/x/b.jpg") and manifest.done("/x/c.jpg")
    (tmp_path / "a.png").write_bytes(b"123")  # cut short
    assert not Manifest(tmp_path).done("/x/a.jpg")
    assert manifest.owner("b.png") == "/x/b.jpg"  # a pending input owns the files a kill left


def test_parts_of_a_killed_multi_process_run_are_resumed_and_merged(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)).save(tmp_path / f"p{i}.png")
    segmenter = Segmenter(tiny_fcn("8s"), ["a", "b", "c"], [(0, 0, 0), (9, 9, 9), (99, 99, 99)], device="cpu",
                          amp="none")
    out = tmp_path / "out"
    predict_files(segmenter, [tmp_path / "p*.png"], out)
    finished = _lines(out / "manifest.jsonl")
    # What a two-process job killed midway leaves: rank 0's pending records, and each rank's part
    # with the one input it finished (p0 by rank 0, p1 by rank 1).
    (out / "manifest.jsonl").write_text("".join(
        json.dumps({**r, "status": "pending", "bytes": None, "size": None}) + "\n" for r in finished))
    (out / part_name(0)).write_text(json.dumps(finished[0]) + "\n")
    (out / part_name(1)).write_text(json.dumps(finished[1]) + "\n" + '{"input": "/cut')
    (out / "p2.png").write_bytes((out / "p2.png").read_bytes()[:10])  # a file of an unfinished input

    result = predict_files(segmenter, [tmp_path / "p*.png"], out)
    assert (result.ok, result.skipped) == (2, 2)
    assert not list(out.glob("manifest.rank-*"))
    records = _lines(out / "manifest.jsonl")
    assert [Path(r["input"]).name for r in records] == ["p0.png", "p1.png", "p2.png", "p3.png"]
    assert records == finished  # the same files, byte for byte, as the uninterrupted run
