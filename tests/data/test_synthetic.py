import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers import CLIPImageProcessor

from clip_prune.data.synthetic import (
    _captions,
    _sample_scene,
    caption_vocabulary,
    synthetic_pixels,
    write_synthetic_coco,
)
from clip_prune.files import MANIFEST

SPLITS = ("train2017", "val2017")


def _hashes(root: Path) -> dict[str, str]:
    assert (root / MANIFEST).is_file()
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }


def test_same_seed_gives_identical_bytes(tmp_path):
    first = write_synthetic_coco(tmp_path / "a", num_train=10, num_val=5, seed=3)
    second = write_synthetic_coco(tmp_path / "b", num_train=10, num_val=5, seed=3)
    other = write_synthetic_coco(tmp_path / "c", num_train=10, num_val=5, seed=4)
    hashes = _hashes(first)
    assert len(hashes) == 10 + 5 + 2  # images and captions; the manifest records this copy's file times, not data
    assert _hashes(second) == hashes
    different = _hashes(other)
    assert different.keys() == hashes.keys()
    assert all(different[name] != digest for name, digest in hashes.items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]  # no staging folder left


def test_coco_layout_and_captions(tmp_path):
    root = write_synthetic_coco(tmp_path / "coco", num_train=10, num_val=5, image_size=48)
    assert sorted(p.name for p in root.iterdir()) == [MANIFEST, "annotations", *SPLITS]
    image_ids, annotation_ids = [], []
    for split, count in zip(SPLITS, (10, 5), strict=True):
        coco = json.loads((root / "annotations" / f"captions_{split}.json").read_text())
        assert coco.keys() == {"info", "licenses", "images", "annotations"}
        assert len(coco["images"]) == count
        for image in coco["images"]:
            assert image["file_name"] == f"{image['id']:012d}.jpg"
            with Image.open(root / split / image["file_name"]) as file:
                assert (file.format, file.mode, file.size) == ("JPEG", "RGB", (48, 48))
            assert (image["width"], image["height"]) == (48, 48)
            captions = [a["caption"] for a in coco["annotations"] if a["image_id"] == image["id"]]
            assert len(captions) == 5
        assert len(coco["annotations"]) == 5 * count
        image_ids += [image["id"] for image in coco["images"]]
        annotation_ids += [annotation["id"] for annotation in coco["annotations"]]
    assert len(set(image_ids)) == 15 and len(set(annotation_ids)) == 75  # unique across splits, as in COCO


def test_captions_use_the_vocabulary():
    vocabulary = caption_vocabulary()
    assert vocabulary == sorted(set(vocabulary))
    used = set()
    for index in range(300):
        rng = np.random.default_rng([0, 0, index])
        captions = _captions(_sample_scene(rng), rng)
        assert len(set(captions)) == 5
        used |= {word for caption in captions for word in caption.split()}
    assert used == set(vocabulary)


def test_refuses_existing_root_unless_overwrite(tmp_path):
    root = tmp_path / "coco"
    root.mkdir()
    write_synthetic_coco(root, num_train=2, num_val=1)  # an empty folder is fine
    (root / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match=r"coco already exists and is not empty.*overwrite=True"):
        write_synthetic_coco(root, num_train=2, num_val=1)
    with pytest.raises(FileExistsError, match=r"coco holds files clip-prune did not write .*\(keep.txt\)"):
        write_synthetic_coco(root, num_train=2, num_val=1, overwrite=True)
    assert (root / "keep.txt").read_text() == "user data"
    (root / "keep.txt").unlink()
    write_synthetic_coco(root, num_train=3, num_val=1, overwrite=True)  # its own data set: replaced
    assert len(list((root / "train2017").iterdir())) == 3


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match=r"num_val=-1 must be >= 0; image_size=8"):
        write_synthetic_coco(tmp_path / "coco", num_val=-1, image_size=8)


def test_zero_shot_tree_is_an_image_folder_per_shape(tmp_path) -> None:
    root = write_synthetic_coco(tmp_path / "demo", num_train=2, num_val=1, image_size=32, zero_shot_per_class=3)
    classes = sorted(path.name for path in (root / "zeroshot").iterdir())
    assert classes == sorted(["circle", "square", "triangle", "star", "cross"])
    assert all(len(list((root / "zeroshot" / name).glob("*.jpg"))) == 3 for name in classes)
    assert set(classes) <= set(caption_vocabulary())


def test_synthetic_pixels_are_deterministic_processed_images_of_the_input_size():
    processor = CLIPImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30})
    pixels = synthetic_pixels(5, 30, processor, seed=2)
    assert pixels.shape == (5, 3, 30, 30)
    assert np.array_equal(pixels.numpy(), synthetic_pixels(5, 30, processor, seed=2).numpy())
    assert not np.array_equal(pixels.numpy(), synthetic_pixels(5, 30, processor, seed=3).numpy())
    assert pixels.std(dim=(1, 2, 3)).min() > 0.1  # drawn scenes, not blank images
