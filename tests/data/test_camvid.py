"""CamVid reader: SegNet list files (absolute or relative paths), void 11 -> 255, and the real data."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fcnseg.data import CAMVID_CLASSES, CAMVID_COLORS, CamVid, build_dataset
from fcnseg.errors import DataError


def make_camvid(root, names=("0001TP_006690", "0001TP_006720"), split="train", absolute=True, size=(6, 8)):
    rng = np.random.default_rng(0)
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / f"{split}annot").mkdir(exist_ok=True)
    lines = []
    for name in names:
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / split / f"{name}.png")
        Image.fromarray(rng.integers(0, 12, size, dtype=np.uint8), "L").save(root / f"{split}annot" / f"{name}.png")
        prefix = "/SegNet/CamVid/" if absolute else ""
        lines.append(f"{prefix}{split}/{name}.png {prefix}{split}annot/{name}.png")
    (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def test_classes_and_palette():
    assert CAMVID_CLASSES == ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
                              "Pedestrian", "Bicyclist"]
    assert len(CAMVID_COLORS) == 11 and len(set(CAMVID_COLORS)) == 11


@pytest.mark.parametrize("absolute", [True, False])
def test_segnet_lists_resolve_under_root(tmp_path, absolute):
    make_camvid(tmp_path, absolute=absolute)
    ds = CamVid(tmp_path, "train")
    assert ds.image_paths == [tmp_path / "train" / "0001TP_006690.png", tmp_path / "train" / "0001TP_006720.png"]
    assert ds.mask_paths[1] == tmp_path / "trainannot" / "0001TP_006720.png"


def test_void_11_reads_as_255(tmp_path):
    make_camvid(tmp_path)
    ds = CamVid(tmp_path, "train")
    raw = np.asarray(Image.open(ds.mask_paths[0])).astype(np.int64)
    assert (raw == 11).any()
    expected = torch.from_numpy(np.where(raw == 11, 255, raw))
    image, target = ds[0]
    assert torch.equal(target, expected) and image.shape == (3, 6, 8) and ds.ignore_index == 255


def test_root_may_be_the_parent_of_CamVid(tmp_path):
    make_camvid(tmp_path / "CamVid")
    assert len(CamVid(tmp_path, "train")) == 2


def test_bad_lists(tmp_path):
    with pytest.raises(DataError, match="split file not found: .*test.txt"):
        CamVid(tmp_path, "test")
    with pytest.raises(DataError, match="split must be one of"):
        CamVid(tmp_path, "trainval")
    make_camvid(tmp_path)
    (tmp_path / "train.txt").write_text("train/0001TP_006690.png\n")
    with pytest.raises(DataError, match="entry 1: expected 'image_path mask_path'"):
        CamVid(tmp_path, "train")
    (tmp_path / "train.txt").write_text("train/gone.png trainannot/gone.png\n")
    with pytest.raises(DataError, match="do not exist, first .*train/gone.png"):
        CamVid(tmp_path, "train")
    (tmp_path / "train.txt").write_text("")
    with pytest.raises(DataError, match="train.txt is empty"):
        CamVid(tmp_path, "train")


def test_label_12_is_an_error_naming_the_mask(tmp_path):
    make_camvid(tmp_path)
    Image.fromarray(np.full((6, 8), 12, dtype=np.uint8), "L").save(tmp_path / "trainannot" / "0001TP_006690.png")
    with pytest.raises(DataError, match="0001TP_006690.png: label values 12 are outside 0..10"):
        CamVid(tmp_path, "train")[0]


def test_real_camvid(camvid_root):
    train, val = build_dataset("camvid", camvid_root, "train"), build_dataset("camvid", camvid_root, "val")
    assert (len(train), len(val)) == (367, 101)
    for ds in (train, val):
        image, target = ds[0]
        assert image.shape == (3, 360, 480) and image.dtype == torch.uint8
        assert target.shape == (360, 480) and target.dtype == torch.int64
        values = set(target.unique().tolist())
        assert values <= set(range(11)) | {255} and 11 not in values
        assert ds.image_paths[0].parent.name == ds.split and ds.mask_paths[0].parent.name == f"{ds.split}annot"


def test_drop_smaller_than(tmp_path):
    make_camvid(tmp_path, size=(6, 8))
    assert len(CamVid(tmp_path, "train", drop_smaller_than=(6, 8))) == 2
    with pytest.raises(DataError, match="smaller than 7x8"):
        CamVid(tmp_path, "train", drop_smaller_than=(7, 8))
