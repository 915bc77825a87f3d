"""Checkpoints: a round trip rebuilds the same model; writes are atomic; foreign, truncated, newer or
code-carrying files are refused with `CheckpointError` (and their code never runs)."""
from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from fcnseg.errors import CheckpointError
from fcnseg.models import build_model
from fcnseg.models.checkpoint import (
    FORMAT,
    FORMAT_VERSION,
    load_checkpoint,
    make_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)

CLASSES = ["background", "thing", "stuff"]
COLORS = [(0, 0, 0), (200, 30, 30), (30, 200, 30)]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    model = build_model("fcn_mobilenet_v2", variant="8s", num_classes=3, weights_backbone=None)
    with torch.no_grad():  # random BatchNorm statistics, so a load that skipped buffers would show
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory) -> Path:
    checkpoint = make_checkpoint(model, classes=CLASSES, colors=COLORS)
    return save_checkpoint(checkpoint, tmp_path_factory.mktemp("ck") / "model.pt")


def _leftovers(folder: Path, keep: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != keep)


# --- make / save / load ----------------------------------------------------------------------------


def test_round_trip_rebuilds_the_same_model(model, tmp_path):
    optimizer_state = {"state": {}, "param_groups": [{"lr": 0.01, "params": [0, 1]}]}
    checkpoint = make_checkpoint(model, classes=CLASSES, colors=COLORS, ignore_index=11, mean=(0.5, 0.4, 0.3),
                                 std=(0.2, 0.3, 0.4), epoch=3, iteration=120, optimizer=optimizer_state,
                                 metrics={"miou": 0.25})
    path = save_checkpoint(checkpoint, tmp_path / "sub" / "ck.pt")
    assert path == tmp_path / "sub" / "ck.pt" and path.is_file()
    assert _leftovers(path.parent, "ck.pt") == []

    loaded = load_checkpoint(path)
    assert (loaded["format"], loaded["version"]) == (FORMAT, FORMAT_VERSION)
    assert loaded["model_name"] == "fcn_mobilenet_v2"
    assert loaded["model_kwargs"]["num_classes"] == 3 and loaded["model_kwargs"]["variant"] == "8s"
    assert loaded["model_kwargs"]["weights_backbone"] is None
    assert loaded["classes"] == CLASSES and loaded["colors"] == [list(c) for c in COLORS]
    assert loaded["ignore_index"] == 11
    assert loaded["mean"] == pytest.approx([0.5, 0.4, 0.3]) and loaded["std"] == pytest.approx([0.2, 0.3, 0.4])
    assert (loaded["epoch"], loaded["iteration"], loaded["metrics"]) == (3, 120, {"miou": 0.25})
    assert loaded["optimizer"] == optimizer_state

    expected = model.state_dict()
    assert loaded["state_dict"].keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(loaded["state_dict"][key], value), key

    for source in (loaded, path, str(path)):
        rebuilt = model_from_checkpoint(source)
        assert not rebuilt.training
        for key, value in expected.items():
            assert torch.equal(rebuilt.state_dict()[key], value), key
    image = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(image), model(image), rtol=0, atol=0)


def test_make_checkpoint_unwraps_a_ddp_style_wrapper_and_checks_its_arguments(model):
    class Wrapper(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    wrapped = make_checkpoint(Wrapper(model), classes=CLASSES, colors=COLORS)
    plain = make_checkpoint(model, classes=CLASSES, colors=COLORS)
    assert wrapped["state_dict"].keys() == plain["state_dict"].keys()  # no "module." prefix
    assert wrapped["model_name"] == plain["model_name"]
    with pytest.raises(ValueError, match="model_name"):
        make_checkpoint(nn.Conv2d(3, 3, 1), classes=CLASSES, colors=COLORS)
    with pytest.raises(ValueError, match="3 class names but 2 colours"):
        make_checkpoint(model, classes=CLASSES, colors=COLORS[:2])


# --- atomic write ----------------------------------------------------------------------------------


def test_a_write_failing_midway_leaves_the_previous_file_intact(model, tmp_path, monkeypatch):
    path = save_checkpoint(make_checkpoint(model, classes=CLASSES, colors=COLORS, epoch=1), tmp_path / "ck.pt")
    before = path.read_bytes()

    def half_then_crash(obj, f, *args, **kwargs):
        f.write(before[: len(before) // 2])  # half a checkpoint reaches the disk, then the "crash"
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", half_then_crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(make_checkpoint(model, classes=CLASSES, colors=COLORS, epoch=2), path)
    monkeypatch.undo()

    assert path.read_bytes() == before
    assert load_checkpoint(path)["epoch"] == 1
    assert _leftovers(tmp_path, "ck.pt") == []  # no temporary file left behind


def test_an_unpicklable_value_leaves_the_previous_file_intact(model, tmp_path):
    path = save_checkpoint(make_checkpoint(model, classes=CLASSES, colors=COLORS, epoch=1), tmp_path / "ck.pt")
    before = path.read_bytes()
    with pytest.raises(Exception):  # noqa: B017  (pickle's error type is not part of the contract)
        save_checkpoint(make_checkpoint(model, classes=CLASSES, colors=COLORS, hook=lambda: None), path)
    assert path.read_bytes() == before
    assert _leftovers(tmp_path, "ck.pt") == []


# --- refusals --------------------------------------------------------------------------------------


class _RunsCode:
    """Unpickling calls ``os.mkdir(marker)``: the kind of object a malicious checkpoint carries."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_a_pickle_that_would_run_code_is_refused_without_running_it(model, tmp_path):
    marker = tmp_path / "code-ran"
    checkpoint = make_checkpoint(model, classes=CLASSES, colors=COLORS)
    checkpoint["payload"] = _RunsCode(marker)
    path = tmp_path / "evil.pt"
    torch.save(checkpoint, path)

    with pytest.raises(CheckpointError, match="evil.pt.*not loaded"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError):
        model_from_checkpoint(path)
    assert not marker.exists()

    # The control: an unsafe load of the same file does run the code, so the refusal above mattered.
    torch.load(path, weights_only=False)
    assert marker.is_dir()


@pytest.mark.parametrize("how", ["torch.save", "pickle protocol 2"])
def test_a_code_pickle_is_described_in_fcnseg_words_never_with_torch_advice(model, tmp_path, how):
    """torch's message advises loading with weights_only=False, which would run the code: never repeated."""
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    if how == "torch.save":
        torch.save({**make_checkpoint(model, classes=CLASSES, colors=COLORS), "payload": _RunsCode(marker)}, path)
    else:  # a bare pickle whose REDUCE calls os.mkdir (what a hand-made malicious file looks like)
        path.write_bytes(pickle.dumps({"format": FORMAT, "payload": _RunsCode(marker)}, protocol=2))
    with pytest.raises(CheckpointError) as raised:
        load_checkpoint(path)
    message = str(raised.value)
    assert re.search(r"evil.pt: it holds pickled objects other than tensors and plain data \(it names \w*\.?mkdir\)", message)
    assert "it was not loaded, and nothing in it ran" in message and "sources you trust" in message
    for advice in ("weights_only", "can still be loaded", "trusted source", "add_safe_globals", "\x1b"):
        assert advice not in message
    assert not marker.exists()


def test_a_pickle_the_safe_loader_cannot_parse_gets_no_torch_advice(tmp_path):
    path = tmp_path / "odd.pt"
    path.write_bytes(b"xx")  # torch's own words for this one: "Re-running torch.load with weights_only set to False..."
    with pytest.raises(CheckpointError, match="odd.pt: not a pickle of tensors and plain data that can be read safely") as raised:
        load_checkpoint(path)
    assert "weights_only" not in str(raised.value)


def test_a_truncated_file_is_refused(saved, tmp_path):
    data = saved.read_bytes()
    for cut in (len(data) // 2, 100, 0):
        path = tmp_path / f"cut{cut}.pt"
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=f"cut{cut}.pt"):
            load_checkpoint(path)
    (tmp_path / "noise.pt").write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(tmp_path / "noise.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_foreign_files_are_refused(model, saved, tmp_path):
    foreign = {
        "state_dict.pt": model.state_dict(),  # a bare state dict
        "other_program.pt": {"model": model.state_dict(), "epoch": 3},
        "wrong_format.pt": {**load_checkpoint(saved), "format": "someone-else"},
        "a_list.pt": [torch.zeros(3)],
    }
    for name, value in foreign.items():
        torch.save(value, tmp_path / name)
        with pytest.raises(CheckpointError, match="not an fcnseg checkpoint"):
            load_checkpoint(tmp_path / name)

    incomplete = load_checkpoint(saved)
    del incomplete["classes"], incomplete["std"]
    torch.save(incomplete, tmp_path / "incomplete.pt")
    with pytest.raises(CheckpointError, match="lacks classes, std"):
        load_checkpoint(tmp_path / "incomplete.pt")


def test_a_newer_format_version_is_refused(saved, tmp_path):
    newer = load_checkpoint(saved)
    newer["version"] = FORMAT_VERSION + 1
    path = save_checkpoint(newer, tmp_path / "newer.pt")
    with pytest.raises(CheckpointError, match=f"version {FORMAT_VERSION + 1}.*up to {FORMAT_VERSION}"):
        load_checkpoint(path)
    same = load_checkpoint(saved)
    same["version"] = FORMAT_VERSION
    assert load_checkpoint(save_checkpoint(same, tmp_path / "same.pt"))["version"] == FORMAT_VERSION


def test_model_from_checkpoint_refuses_weights_that_do_not_match(saved):
    good = load_checkpoint(saved)
    missing = {**good, "state_dict": dict(good["state_dict"])}
    missing["state_dict"].pop(next(iter(missing["state_dict"])))
    extra = {**good, "state_dict": {**good["state_dict"], "surplus.weight": torch.zeros(1)}}
    other_classes = {**good, "model_kwargs": {**good["model_kwargs"], "num_classes": 5}}
    other_variant = {**good, "model_kwargs": {**good["model_kwargs"], "variant": "32s"}}
    for checkpoint in (missing, extra, other_classes, other_variant):
        with pytest.raises(CheckpointError, match="do not match fcn_mobilenet_v2"):
            model_from_checkpoint(checkpoint)
    with pytest.raises(CheckpointError, match="cannot build"):
        model_from_checkpoint({**good, "model_name": "fcn_vgg99"})
    with pytest.raises(CheckpointError, match="cannot build"):
        model_from_checkpoint({**good, "model_kwargs": {**good["model_kwargs"], "depth": 3}})


def test_fcn4s_checkpoint_round_trip_rebuilds_the_same_model(tmp_path):
    torch.manual_seed(0)
    model = build_model("fcn_mobilenet_v2", variant="4s", num_classes=3, weights_backbone=None)
    with torch.no_grad():  # the new skip starts at zero; a load that dropped it would not show otherwise
        model.score4.weight.normal_(std=0.1)
        model.upsample8to4.weight.add_(0.01 * torch.randn_like(model.upsample8to4.weight))
    model.eval()
    path = save_checkpoint(make_checkpoint(model, classes=CLASSES, colors=COLORS), tmp_path / "fcn4s.pt")
    loaded = load_checkpoint(path)
    assert loaded["model_kwargs"]["variant"] == "4s"
    assert {"score4.weight", "upsample8to4.weight"} <= set(loaded["state_dict"])
    rebuilt = model_from_checkpoint(loaded)
    assert (rebuilt.variant, rebuilt.upsample_final.stride) == ("4s", 4)
    image = torch.randn(1, 3, 37, 45)
    with torch.no_grad():
        assert torch.equal(rebuilt(image), model(image))
