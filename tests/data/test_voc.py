"""VOC2012 reader: tiny trees written here, and the five genuine pairs in the shared data."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from fcnseg.data import VOC_CLASSES, VOC_COLORMAP, VOCSegmentation, build_dataset
from fcnseg.data.voc import VOC_VOID_COLOR
from fcnseg.errors import DataError


def test_class_names_and_colour_map():
    assert len(VOC_CLASSES) == len(VOC_COLORMAP) == 21
    assert VOC_CLASSES[0] == "background" and VOC_CLASSES[-1] == "tvmonitor"
    assert len(set(VOC_COLORMAP)) == 21


def test_reads_pairs_with_palette_indices(tmp_path, make_voc_tree):
    base = make_voc_tree(tmp_path)
    ds = VOCSegmentation(tmp_path, "train")
    assert len(ds) == 2 and ds.ignore_index == 255 and ds.classes == VOC_CLASSES
    assert [p.name for p in ds.image_paths] == ["a.jpg", "b.jpg"]
    image, target = ds[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 24, 32)
    assert target.dtype == torch.int64 and target.shape == (24, 32)
    expected = np.asarray(Image.open(base / "SegmentationClass" / "a.png"))  # indices, independently
    assert torch.equal(target, torch.from_numpy(expected.astype(np.int64)))
    assert torch.equal(ds.read_pair(0)[1], target)


@pytest.mark.parametrize("sub", ["", "VOCdevkit", "VOCdevkit/VOC2012"])
def test_root_may_point_at_any_level(tmp_path, make_voc_tree, sub):
    make_voc_tree(tmp_path)
    assert len(VOCSegmentation(tmp_path / sub, "val")) == 1


def test_border_as_background(tmp_path, make_voc_tree):
    make_voc_tree(tmp_path)
    assert (VOCSegmentation(tmp_path, "train")[0][1][0] == 255).all()
    target = VOCSegmentation(tmp_path, "train", border_as_background=True)[0][1]
    assert (target[0] == 0).all() and 255 not in target


def test_rgb_colour_masks_are_converted(tmp_path, make_voc_tree):
    base = make_voc_tree(tmp_path)
    mask_path = base / "SegmentationClass" / "a.png"
    ids = np.asarray(Image.open(mask_path)).astype(np.int64)
    table = np.array(VOC_COLORMAP + [VOC_VOID_COLOR], dtype=np.uint8)
    Image.fromarray(table[np.where(ids == 255, 21, ids)]).save(mask_path)  # the d2l-style RGB mask
    assert torch.equal(VOCSegmentation(tmp_path, "train").read_pair(0)[1], torch.from_numpy(ids))
    rgb = table[np.where(ids == 255, 21, ids)]
    rgb[3, 4] = (1, 2, 3)
    Image.fromarray(rgb).save(mask_path)
    with pytest.raises(DataError, match=r"a.png: colour \(1, 2, 3\) at row 3, column 4"):
        VOCSegmentation(tmp_path, "train")[0]


def test_drop_smaller_than(tmp_path, make_voc_tree):
    base = make_voc_tree(tmp_path, {"train": ["big", "small"], "val": ["small"]}, size=(30, 40))
    Image.new("RGB", (40, 20)).save(base / "JPEGImages" / "small.jpg")  # 20 high: one side too small
    ds = VOCSegmentation(tmp_path, "train", drop_smaller_than=(25, 40))
    assert [p.stem for p in ds.image_paths] == ["big"] and ds.dropped == ["small"]
    with pytest.raises(DataError, match="smaller than 25x40"):
        VOCSegmentation(tmp_path, "val", drop_smaller_than=(25, 40))


def test_bad_trees(tmp_path, make_voc_tree):
    with pytest.raises(DataError, match="no VOC2012 dataset.*fcnseg download voc2012"):
        VOCSegmentation(tmp_path, "train")
    base = make_voc_tree(tmp_path)
    with pytest.raises(DataError, match="split must be one of"):
        VOCSegmentation(tmp_path, "test")
    (base / "ImageSets" / "Segmentation" / "val.txt").write_text("\n\n")
    with pytest.raises(DataError, match="val.txt is empty"):
        VOCSegmentation(tmp_path, "val")
    (base / "ImageSets" / "Segmentation" / "val.txt").write_text("c\nghost\n")
    with pytest.raises(DataError, match=r"names 1 image\(s\) that do not exist, first .*ghost.jpg"):
        VOCSegmentation(tmp_path, "val")
    (base / "SegmentationClass" / "b.png").unlink()
    with pytest.raises(DataError, match=r"mask\(s\).*b.png"):
        VOCSegmentation(tmp_path, "train")


def test_mask_of_other_size_fails_when_read(tmp_path, make_voc_tree, write_palette_png):
    base = make_voc_tree(tmp_path)
    write_palette_png(base / "SegmentationClass" / "c.png", np.zeros((10, 10), dtype=np.uint8))
    ds = VOCSegmentation(tmp_path, "val")  # construction does not decode
    with pytest.raises(DataError, match="c.png: mask is 10x10"):
        ds[0]


def test_picklable_for_workers(tmp_path, make_voc_tree):
    make_voc_tree(tmp_path)
    ds = pickle.loads(pickle.dumps(build_dataset("voc2012", tmp_path, "train")))
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1)
    images, targets = next(iter(loader))
    assert images.shape == (2, 3, 24, 32) and targets.shape == (2, 24, 32)


def test_genuine_voc_sample(voc_sample):
    train, val = VOCSegmentation(voc_sample, "train"), VOCSegmentation(voc_sample, "val")
    assert (len(train), len(val)) == (4, 1)
    for ds in (train, val):
        for i in range(len(ds)):
            image, target = ds[i]
            assert image.shape[1:] == target.shape and image.dtype == torch.uint8
            values = set(target.unique().tolist())
            assert 0 in values and 255 in values and values <= set(range(21)) | {255}
    # The palette stored in the real PNGs is the colour map we use, entry for entry.
    palette = Image.open(train.mask_paths[0]).getpalette()
    assert [tuple(palette[3 * i: 3 * i + 3]) for i in range(21)] == VOC_COLORMAP
    assert tuple(palette[3 * 255: 3 * 256]) == VOC_VOID_COLOR


def test_genuine_voc_sample_d2l_filter(voc_sample):
    # The chapter's filter keeps an image only if it is at least 320 high and 480 wide; checked
    # here against the headers read independently.
    ds = VOCSegmentation(voc_sample, "trainval", drop_smaller_than=(320, 480))
    kept = {p.stem for p in ds.image_paths}
    assert ds.dropped == ["2007_000129"]  # 500 high but only 334 wide
    for stem in kept | set(ds.dropped):
        with Image.open(voc_sample / "VOCdevkit" / "VOC2012" / "JPEGImages" / f"{stem}.jpg") as im:
            assert (stem in kept) == (im.height >= 320 and im.width >= 480)
