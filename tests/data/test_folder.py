"""Folder datasets: the class-list format, pairing by stem, splits, and per-file problems."""
from __future__ import annotations

import os
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from fcnseg.constants import MAX_IMAGE_PIXELS_ENV
from fcnseg.data import VOC_COLORMAP, FolderDataset, build_dataset, default_palette, read_class_file
from fcnseg.data.samplers import image_sizes
from fcnseg.errors import DataError
from tests.data.helpers import header_only_png

RNG = np.random.default_rng(0)


def make_folder(root, stems=("a", "b", "c"), classes="classes: [bg, cat, dog]\n", size=(5, 6), num_classes=3):
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    for stem in stems:
        Image.fromarray(RNG.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / "images" / f"{stem}.jpg")
        Image.fromarray(RNG.integers(0, num_classes, size, dtype=np.uint8), "L").save(root / "masks" / f"{stem}.png")
    if classes is not None:
        (root / "classes.yaml").write_text(classes)
    return root


def test_default_palette_extends_the_voc_colour_map():
    assert default_palette(21) == VOC_COLORMAP
    assert len(set(default_palette(255))) == 255


def test_reads_index_masks_with_yaml_classes(tmp_path):
    make_folder(tmp_path, classes="classes: [bg, cat, dog]\ncolors: [[0, 0, 0], [1, 2, 3], [4, 5, 6]]\n")
    ds = FolderDataset(tmp_path, "all")
    assert ds.classes == ["bg", "cat", "dog"] and ds.colors == [(0, 0, 0), (1, 2, 3), (4, 5, 6)]
    assert [p.name for p in ds.image_paths] == ["a.jpg", "b.jpg", "c.jpg"]
    assert [p.name for p in ds.mask_paths] == ["a.png", "b.png", "c.png"]
    image, target = ds[1]
    assert image.shape == (3, 5, 6) and image.dtype == torch.uint8
    assert torch.equal(target, torch.from_numpy(np.asarray(Image.open(tmp_path / "masks" / "b.png")).astype(np.int64)))


def test_classes_txt_forms(tmp_path):
    (tmp_path / "classes.txt").write_text("# names in id order\nbackground\npotted plant  # a comment\n\n")
    spec = read_class_file(tmp_path)
    assert spec.classes == ["background", "potted plant"] and spec.colors is None and spec.ignore_index == 255
    (tmp_path / "classes.txt").write_text("background 0 0 0\npotted plant 0 255 0\n")
    assert read_class_file(tmp_path).colors == [(0, 0, 0), (0, 255, 0)]
    (tmp_path / "classes.txt").write_text("background 0 0 0\nplant\n")
    with pytest.raises(DataError, match="on every line or on none"):
        read_class_file(tmp_path)


@pytest.mark.parametrize("text, message", [
    ("names: [a, b]\n", "expected a mapping with a 'classes' list"),
    ("classes: [a, b]\ncolours: [[0, 0, 0], [1, 1, 1]]\n", "unknown key.*colours"),
    ("classes: [a, a]\n", "listed twice: a"),
    ("classes: [a, b]\ncolors: [[0, 0, 0]]\n", "2 classes but 1 colours"),
    ("classes: [a, b]\ncolors: [[0, 0, 0], [0, 0, 0]]\n", "share a colour"),
    ("classes: [a, b]\ncolors: [[0, 0, 0], [0, 0, 300]]\n", "colour of class 1 must be three integers"),
    ("classes: [a, b]\nignore_index: 1\n", "ignore_index 1 is a class id"),
    ("classes: []\n", "class list is empty"),
    ("classes: [a, b\n", "cannot read"),
])
def test_bad_class_files(tmp_path, text, message):
    (tmp_path / "classes.yaml").write_text(text)
    with pytest.raises(DataError, match=message):
        read_class_file(tmp_path)


def test_too_many_or_missing_or_duplicate_class_files(tmp_path):
    with pytest.raises(DataError, match="no class list"):
        read_class_file(tmp_path)
    (tmp_path / "classes.txt").write_text("\n".join(f"c{i}" for i in range(256)))
    with pytest.raises(DataError, match="256 classes; at most 255"):
        read_class_file(tmp_path)
    (tmp_path / "classes.yaml").write_text("classes: [a]\n")
    with pytest.raises(DataError, match="both classes.yaml and classes.txt"):
        read_class_file(tmp_path)


def test_unpaired_files_are_skipped_with_one_summary_warning(tmp_path):
    make_folder(tmp_path, stems=("a", "b", "c"))
    (tmp_path / "masks" / "b.png").unlink()
    Image.new("L", (6, 5)).save(tmp_path / "masks" / "orphan.png")
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    (tmp_path / "images" / ".DS_Store").write_bytes(b"")
    with pytest.warns(UserWarning, match=r"skipped 1 image without mask \(b\); 1 mask without image \(orphan\)") as record:
        ds = FolderDataset(tmp_path, "all")
    assert len(record) == 1
    assert [p.stem for p in ds.image_paths] == ["a", "c"]
    assert ds.skipped["image without mask"] == ["b"] and ds.skipped["mask without image"] == ["orphan"]


def test_two_images_with_one_stem_are_skipped(tmp_path):
    make_folder(tmp_path, stems=("a", "b"))
    Image.new("RGB", (6, 5)).save(tmp_path / "images" / "a.png")
    with pytest.warns(UserWarning, match=r"several images with one stem \(a\)"):
        ds = FolderDataset(tmp_path, "all")
    assert [p.stem for p in ds.image_paths] == ["b"]


def test_empty_or_incomplete_folders(tmp_path):
    with pytest.raises(DataError, match="no images/ folder"):
        FolderDataset(tmp_path, "train")
    make_folder(tmp_path, stems=())
    with pytest.raises(DataError, match="no image/mask pairs"):
        FolderDataset(tmp_path, "train")


def test_automatic_split_is_deterministic_and_disjoint(tmp_path):
    stems = [f"s{i}" for i in range(7)]
    make_folder(tmp_path, stems=stems[::-1])  # creation order does not matter
    train, val = FolderDataset(tmp_path, "train"), FolderDataset(tmp_path, "val")
    assert [p.stem for p in val.image_paths] == ["s0", "s5"]
    assert [p.stem for p in train.image_paths] == ["s1", "s2", "s3", "s4", "s6"]
    assert len(FolderDataset(tmp_path, "all")) == 7
    with pytest.raises(DataError, match="only 'train', 'val' and 'all'"):
        FolderDataset(tmp_path, "test")


def test_split_files(tmp_path):
    make_folder(tmp_path, stems=("a", "b", "c"))
    (tmp_path / "train.txt").write_text("c\na.jpg\n")  # an extension is tolerated
    assert [p.stem for p in FolderDataset(tmp_path, "train").image_paths] == ["c", "a"]
    with pytest.raises(DataError, match="no val.txt, but split files exist \\(train.txt\\)"):
        FolderDataset(tmp_path, "val")
    (tmp_path / "val.txt").write_text("b\nghost\n")
    with pytest.raises(DataError, match="val.txt names 'ghost', which has no image in images/"):
        FolderDataset(tmp_path, "val")
    (tmp_path / "val.txt").write_text("# nothing\n")
    with pytest.raises(DataError, match="val.txt is empty"):
        FolderDataset(tmp_path, "val")
    (tmp_path / "masks" / "b.png").unlink()
    (tmp_path / "val.txt").write_text("b\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the listing warns about b first
        with pytest.raises(DataError, match="val.txt names 'b', which has no mask in masks/"):
            FolderDataset(tmp_path, "val")


def test_empty_automatic_split(tmp_path):
    make_folder(tmp_path, stems=("only",))
    with pytest.raises(DataError, match="split 'train' is empty"):
        FolderDataset(tmp_path, "train")


def test_colour_masks_and_void_colour(tmp_path):
    colors = [(0, 0, 0), (200, 0, 0), (0, 0, 200)]
    make_folder(tmp_path, stems=("a",), classes=(
        "classes: [bg, cat, dog]\ncolors: [[0, 0, 0], [200, 0, 0], [0, 0, 200]]\nignore_color: [255, 255, 255]\n"))
    ids = np.array([[0, 1, 2], [2, 255, 1]])
    table = {**{i: c for i, c in enumerate(colors)}, 255: (255, 255, 255)}
    Image.new("RGB", (3, 2)).save(tmp_path / "images" / "a.jpg")
    Image.fromarray(np.array([[table[i] for i in row] for row in ids], dtype=np.uint8)).save(tmp_path / "masks" / "a.png")
    assert FolderDataset(tmp_path, "all")[0][1].tolist() == ids.tolist()


def test_own_ignore_index_is_read_as_255(tmp_path):
    make_folder(tmp_path, stems=("a",), classes="classes: [bg, cat]\nignore_index: 7\n")
    Image.new("RGB", (3, 1)).save(tmp_path / "images" / "a.jpg")
    Image.fromarray(np.array([[0, 7, 1]], dtype=np.uint8), "L").save(tmp_path / "masks" / "a.png")
    ds = build_dataset("folder", tmp_path, "all")
    assert ds.ignore_index == 255 and ds[0][1].tolist() == [[0, 255, 1]]


def test_per_file_problems_raise_when_read(tmp_path):
    make_folder(tmp_path, stems=("a", "b", "c"))
    (tmp_path / "images" / "b.jpg").write_bytes(b"\xff\xd8\xff garbage")
    Image.fromarray(np.full((5, 6), 9, dtype=np.uint8), "L").save(tmp_path / "masks" / "c.png")
    ds = FolderDataset(tmp_path, "all")  # listing only: nothing decoded yet
    ds[0]
    with pytest.raises(DataError, match="b.jpg: cannot decode image"):
        ds[1]
    with pytest.raises(DataError, match="c.png: label values 9 are outside 0..2"):
        ds[2]


def test_build_dataset_rejects_unknown_names_and_options(tmp_path):
    make_folder(tmp_path)
    with pytest.raises(DataError, match="unknown dataset 'cityscapes'; choose from voc2012, camvid, folder"):
        build_dataset("cityscapes", tmp_path, "train")
    with pytest.raises(DataError, match="no option\\(s\\) border_as_background"):
        build_dataset("folder", tmp_path, "train", border_as_background=True)


def test_drop_smaller_than(tmp_path):
    make_folder(tmp_path, stems=("a", "b"), size=(5, 6))
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "b.jpg")
    ds = FolderDataset(tmp_path, "all", drop_smaller_than=(6, 6))
    assert [p.stem for p in ds.image_paths] == ["b"] and ds.dropped == ["a"]
    with pytest.raises(DataError, match="all 2 images of split 'all' .* are smaller than 9x9"):
        FolderDataset(tmp_path, "all", drop_smaller_than=(9, 9))


@pytest.mark.parametrize("width,height", [(100_000, 100_000), (12_000, 12_000)])
def test_a_header_above_the_pixel_cap_is_a_data_error_when_sizes_are_read(tmp_path, monkeypatch, width, height):
    """--drop-small and the size-grouped validation batches read sizes from headers: a PNG declaring
    10^10 (or 1.44 x 10^8) pixels is refused there with the file named, not a traceback or minutes of CPU."""
    monkeypatch.setenv(MAX_IMAGE_PIXELS_ENV, "")  # empty: the default; and restored afterwards, unlike delenv of an unset name
    make_folder(tmp_path, stems=("a", "b"))
    header_only_png(tmp_path / "images" / "huge.png", width, height)
    Image.new("L", (6, 5)).save(tmp_path / "masks" / "huge.png")
    match = r"huge.png: the image is .* above the cap of 89,478,485 pixels.*--max-pixels"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(DataError, match=match):
            FolderDataset(tmp_path, "all", drop_smaller_than=(2, 2))
        with pytest.raises(DataError, match=match):
            image_sizes(FolderDataset(tmp_path, "all"))


@pytest.mark.skipif(not hasattr(os, "symlink") or sys.platform == "win32", reason="needs symbolic links")
def test_broken_and_looping_links_are_reported_in_one_line_per_folder(tmp_path):
    make_folder(tmp_path, stems=("a", "b"))
    (tmp_path / "images" / "x.jpg").symlink_to(tmp_path / "images" / "gone.jpg")
    (tmp_path / "images" / "y.jpg").symlink_to(tmp_path / "images" / "y.jpg")
    (tmp_path / "masks" / "z.png").symlink_to(tmp_path / "nowhere" / "z.png")
    with pytest.warns(UserWarning) as record:
        ds = FolderDataset(tmp_path, "all")
    assert [p.stem for p in ds.image_paths] == ["a", "b"]
    assert [str(w.message) for w in record] == [
        f"2 broken or looping symbolic links in {tmp_path / 'images'} skipped: x.jpg, y.jpg",
        f"1 broken or looping symbolic link in {tmp_path / 'masks'} skipped: z.png",
    ]
