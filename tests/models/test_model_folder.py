"""Model folders (Hugging Face convention) read back as checkpoints: round trip, bad folders, the Hub cache."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from fcnseg import fcn_resnet18
from fcnseg.errors import CheckpointError, OptionError, WeightsError
from fcnseg.export.model_folder import export_model_folder
from fcnseg.inference.segmenter import Segmenter
from fcnseg.models.checkpoint import check_checkpoint_path, load_checkpoint, make_checkpoint, model_from_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")
CLASSES = ["bg", "road", "car"]
COLORS = [(0, 0, 0), (128, 64, 128), (64, 0, 128)]


@pytest.fixture(scope="module")
def checkpoint() -> dict:
    torch.manual_seed(0)
    model = fcn_resnet18(variant="16s", num_classes=3, weights_backbone=None, upsampler_bias=True)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # every weight, upsampler and its bias included, matters
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return make_checkpoint(model, classes=CLASSES, colors=COLORS, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3),
                           config={"crop": [32, 48], "dataset": "camvid"}, metrics={"miou": 0.5, "pixel_acc": 0.9})


@pytest.fixture(scope="module")
def folder(checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hf") / "model"
    export_model_folder(checkpoint, out, license="mit")
    return out


def test_round_trip_gives_identical_logits_and_metadata(checkpoint, folder):
    loaded = load_checkpoint(folder)
    assert loaded["model_name"] == "fcn_resnet18" and loaded["model_kwargs"]["variant"] == "16s"
    assert loaded["model_kwargs"]["upsampler_bias"] is True
    assert loaded["classes"] == CLASSES and loaded["colors"] == [list(c) for c in COLORS]
    assert loaded["config"]["crop"] == [32, 48] and loaded["metrics"]["miou"] == 0.5
    assert loaded["state_dict"].keys() == checkpoint["state_dict"].keys()
    image = torch.randn(2, 3, 37, 45)
    with torch.no_grad():
        assert torch.equal(model_from_checkpoint(loaded)(image), model_from_checkpoint(checkpoint)(image))
    ours = Segmenter.from_pretrained(folder, device="cpu", amp="none")
    theirs = Segmenter.from_checkpoint(checkpoint, device="cpu", amp="none")
    batch = theirs.preprocess(torch.rand(3, 40, 56))[None]
    assert torch.equal(ours.logits(batch), theirs.logits(batch))
    assert ours.classes == CLASSES and torch.equal(ours.mean, theirs.mean) and torch.equal(ours.std, theirs.std)


def test_fcn4s_model_folder_round_trip(tmp_path):
    torch.manual_seed(0)
    model = fcn_resnet18(variant="4s", num_classes=3, weights_backbone=None)
    with torch.no_grad():  # the new skip starts at zero; make it count
        model.score4.weight.normal_(std=0.1)
    checkpoint = make_checkpoint(model, classes=CLASSES, colors=COLORS)
    export_model_folder(checkpoint, tmp_path / "m", license="mit")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["variant"] == "4s"
    assert "FCN-4s" in (tmp_path / "m" / "README.md").read_text()
    loaded = load_checkpoint(tmp_path / "m")
    assert loaded["model_kwargs"]["variant"] == "4s" and loaded["state_dict"].keys() == checkpoint["state_dict"].keys()
    image = torch.randn(1, 3, 37, 45)
    with torch.no_grad():
        assert torch.equal(model_from_checkpoint(loaded)(image), model.eval()(image))


def test_config_spells_out_the_model(folder):
    config = json.loads((folder / "config.json").read_text())
    assert (config["body"], config["variant"], config["num_classes"], config["upsampler_bias"]) == (
        "resnet18", "16s", 3, True)
    assert config["mean"] == [0.4, 0.5, 0.6] and config["ignore_index"] == 255 and config["crop"] == [32, 48]


@pytest.mark.parametrize(("present", "missing"), [((), "config.json and no model.safetensors"),
                                                 (("config.json",), "model.safetensors"),
                                                 (("model.safetensors",), "config.json")])
def test_a_folder_that_is_not_a_model_folder_names_the_missing_file(folder, tmp_path, present, missing):
    for name in present:
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    with pytest.raises(CheckpointError, match=f"is not a model folder: it has no {missing}"):
        load_checkpoint(tmp_path)
    with pytest.raises(OptionError, match=f"not a model folder: it has no {missing}"):
        check_checkpoint_path(tmp_path)


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_pickle_posing_as_weights_is_refused_and_never_runs(folder, tmp_path):
    (tmp_path / "config.json").write_bytes((folder / "config.json").read_bytes())
    payload = _Payload()
    payload.marker = str(tmp_path / "ran")
    (tmp_path / "model.safetensors").write_bytes(pickle.dumps({"w": payload}))
    with pytest.raises(CheckpointError, match="cannot read .*model.safetensors"):
        load_checkpoint(tmp_path)
    assert not (tmp_path / "ran").exists()
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:-100])  # cut short
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(tmp_path)


def _hub_cache(folder: Path, cache: Path, repo: str, commit: str) -> None:
    """The Hugging Face hub cache layout: models--owner--name/{refs/main, snapshots/<commit>/files}."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "README.md"):
        (snapshot / name).write_bytes((folder / name).read_bytes())


def test_from_pretrained_reads_a_repository_from_the_offline_hub_cache(checkpoint, folder, tmp_path, monkeypatch):
    constants = pytest.importorskip("huggingface_hub.constants")
    commit = "0123456789abcdef0123456789abcdef01234567"
    _hub_cache(folder, tmp_path / "hub", "someone/tiny-fcn", commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    theirs = Segmenter.from_checkpoint(checkpoint, device="cpu", amp="none")
    batch = theirs.preprocess(torch.rand(3, 33, 40))[None]
    for revision in (None, commit):
        ours = Segmenter.from_pretrained("someone/tiny-fcn", revision, device="cpu", amp="none")
        assert torch.equal(ours.logits(batch), theirs.logits(batch))
    with pytest.raises(WeightsError, match=r"cannot get someone/absent from the Hugging Face Hub.*"
                                           r"huggingface-cli download someone/absent --local-dir DIR"):
        Segmenter.from_pretrained("someone/absent", device="cpu")
    with pytest.raises(CheckpointError, match="no such model folder or checkpoint"):
        Segmenter.from_pretrained(tmp_path / "nowhere" / "model.pt", device="cpu")
