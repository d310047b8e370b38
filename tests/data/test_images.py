"""Every sampled image is decoded in full before any model work, and images of any PIL mode become the right RGB."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clip_prune.data.images import check_image_files, read_rgb, to_rgb
from clip_prune.lightning.data import CocoDataModule


def truncate(path: Path) -> None:
    """Keep the JPEG's header and the first part of its data: `Image.verify()` still accepts it."""
    data = path.read_bytes()
    scan = data.index(b"\xff\xda")  # start of scan: the entropy-coded image data follows
    path.write_bytes(data[: scan + (len(data) - scan) // 2])
    with Image.open(path) as image:
        image.verify()


@pytest.fixture
def coco_copy(tiny_coco_root: Path, tmp_path: Path) -> Path:
    root = tmp_path / "coco"
    shutil.copytree(tiny_coco_root, root)
    return root


def datamodule(root: Path, model_dir: Path, **options: object) -> CocoDataModule:
    return CocoDataModule(str(root), str(model_dir), num_samples=12, num_workers=2, **options)


def test_truncated_jpeg_is_named_before_the_fisher_pass(coco_copy, tiny_clip_dir) -> None:
    broken = sorted((coco_copy / "train2017").iterdir())[:2]
    for path in broken:
        truncate(path)
    with pytest.raises(FileNotFoundError) as caught:
        datamodule(coco_copy, tiny_clip_dir).setup("validate")
    message = str(caught.value)
    assert message.startswith("2 sampled image(s) cannot be read")
    assert all(f"{path} (cannot be decoded: image file is truncated" in message for path in broken)
    assert "--data.skip_bad_images true" in message


def test_skip_bad_images_leaves_them_out_and_says_how_many(coco_copy, tiny_clip_dir) -> None:
    truncate(sorted((coco_copy / "train2017").iterdir())[0])
    (sorted((coco_copy / "train2017").iterdir())[1]).unlink()
    data = datamodule(coco_copy, tiny_clip_dir, skip_bad_images=True)
    with pytest.warns(UserWarning, match=r"skipped 2 of 12 sampled images that cannot be read"):
        data.setup("validate")
    assert len(data.calibration) == 10
    assert len({data.calibration.items[i][0] for i in range(10)}) == 10


def test_check_reports_every_problem_and_hashes_the_bytes(tmp_path) -> None:
    good = tmp_path / "good.png"
    Image.new("RGB", (5, 5), (1, 2, 3)).save(good)
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"not an image")
    check = check_image_files([good, garbage, tmp_path / "missing.png"], workers=2)
    assert list(check.digests) == [good] and len(check.digests[good]) == 64
    assert check.problems[tmp_path / "missing.png"] == "missing"
    assert check.problems[garbage].startswith("cannot be decoded")


def test_16_bit_png_keeps_its_grey_levels(tmp_path) -> None:
    levels = np.array([[0, 16384, 32768, 65535]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(levels).save(path)
    with Image.open(path) as image:
        assert image.mode in ("I;16", "I")  # Pillow's convert("RGB") would clip all but 0 to 255
    rgb = np.asarray(read_rgb(path))
    assert rgb.shape == (1, 4, 3)
    assert rgb[0, :, 0].tolist() == [0, 64, 128, 255] and (rgb[..., 0] == rgb[..., 2]).all()


def test_palette_cmyk_and_alpha_images_convert_to_their_colours() -> None:
    red = (200, 30, 40)
    palette = Image.new("P", (2, 1), 1)
    palette.putpalette([0, 0, 0, *red])
    palette.putpixel((0, 0), 0)
    assert np.asarray(to_rgb(palette)).tolist() == [[[0, 0, 0], list(red)]]
    palette.info["transparency"] = 0  # colour 0 is transparent: white, not black
    assert np.asarray(to_rgb(palette)).tolist() == [[[255, 255, 255], list(red)]]
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # pure red in CMYK
    assert np.asarray(to_rgb(cmyk))[0, 0].tolist() == [255, 0, 0]
    transparent = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    transparent.putpixel((1, 0), (10, 20, 30, 255))
    assert np.asarray(to_rgb(transparent)).tolist() == [[[255, 255, 255], [10, 20, 30]]]  # composited on white
    grey_alpha = Image.new("LA", (1, 1), (100, 128))
    assert np.asarray(to_rgb(grey_alpha))[0, 0].tolist() == [177, 177, 177]  # 100 half-way to white
    assert to_rgb(Image.new("1", (2, 2), 1)).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("F", (1, 1), 0.5)).getpixel((0, 0)) == (128, 128, 128)
