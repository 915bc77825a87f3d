"""Synthetic scenes: a valid folder dataset, byte-identical for a seed, and not trivially easy."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
from PIL import Image

from fcnseg.data import FolderDataset
from fcnseg.data.synthetic import MAX_CLASSES, draw_scene, make_synthetic, synthetic_classes
from fcnseg.errors import DataError


def digest(root):
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("syn") / "data", num_classes=4, n=10, size=(32, 40), seed=0,
                          progress=False)


def test_writes_a_folder_dataset_with_an_80_20_split(scenes):
    train, val = FolderDataset(scenes, "train"), FolderDataset(scenes, "val")
    assert (len(train), len(val)) == (8, 2)
    assert {p.stem for p in val.image_paths} == {"00004", "00009"}
    assert train.classes == ["background", "striped disc", "checkered rectangle", "dotted triangle"]
    image, target = train[0]
    assert image.shape == (3, 32, 40) and target.shape == (32, 40)
    assert Image.open(train.mask_paths[0]).mode == "P"  # viewable in colour, read as indices


def test_same_seed_same_bytes_other_seed_other_bytes(scenes, tmp_path):
    again = make_synthetic(tmp_path / "again", num_classes=4, n=10, size=(32, 40), seed=0, progress=False)
    assert digest(again) == digest(scenes)
    other = make_synthetic(tmp_path / "other", num_classes=4, n=10, size=(32, 40), seed=1, progress=False)
    assert digest(other) != digest(scenes)


def test_scene_depends_only_on_seed_and_index(scenes, tmp_path):
    fewer = make_synthetic(tmp_path / "fewer", num_classes=4, n=3, size=(32, 40), seed=0, progress=False)
    for stem in ("00000", "00002"):
        assert (fewer / "masks" / f"{stem}.png").read_bytes() == (scenes / "masks" / f"{stem}.png").read_bytes()


def test_scenes_have_every_ingredient():
    # Over a handful of scenes: every class appears, void outlines exist, and colour alone does
    # not give the class (the same class shows up in clearly different mean colours).
    seen, colours = set(), {c: [] for c in range(1, 6)}
    for i in range(30):
        image, mask = draw_scene(np.random.default_rng([0, i]), 6, 64, 80)
        assert image.dtype == np.uint8 and mask.dtype == np.uint8
        values = set(np.unique(mask).tolist())
        assert values <= set(range(6)) | {255} and 255 in values and 0 in values
        seen |= values
        for c in range(1, 6):
            if (mask == c).sum() > 20:
                colours[c].append(image[mask == c].mean(axis=0))
    assert seen == set(range(6)) | {255}
    spread = [np.ptp(np.array(v), axis=0).max() for v in colours.values() if len(v) > 3]
    assert spread and min(spread) > 60


def test_class_names_stay_unique_up_to_the_limit():
    names = synthetic_classes(MAX_CLASSES)
    assert len(set(names)) == MAX_CLASSES == 41


def test_bad_arguments_and_occupied_folders(tmp_path, scenes):
    with pytest.raises(DataError, match="2 to 41 classes"):
        make_synthetic(tmp_path / "x", num_classes=1, n=1, progress=False)
    with pytest.raises(DataError, match="at least 16x16"):
        make_synthetic(tmp_path / "x", n=1, size=(8, 100), progress=False)
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "thesis.tex").write_text("precious")
    with pytest.raises(DataError, match="occupied is not empty"):
        make_synthetic(tmp_path / "occupied", n=1, progress=False)
    # An earlier synthetic dataset is replaced, stale scenes included.
    target = make_synthetic(tmp_path / "redo", n=6, size=(16, 16), progress=False)
    make_synthetic(target, n=2, size=(16, 16), progress=False)
    assert sorted(p.name for p in (target / "images").iterdir()) == ["00000.png", "00001.png"]
    assert len(FolderDataset(target, "train")) == len(FolderDataset(target, "val")) == 1
