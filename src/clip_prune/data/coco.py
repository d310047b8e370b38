"""COCO-captions data for calibration (Fisher, rescaling) and evaluation (retrieval).

The layout is MS-COCO's: `root/train2017/*.jpg` with `root/annotations/captions_train2017.json`,
and the same for `val2017`. The calibration split feeds Lightning's *validation* loop (where
the Fisher information is gathered, docs/design.md "Shape"); the evaluation split, every image with
all its captions, feeds `clip_prune.core.run.evaluation`.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, default_collate

from clip_prune.data.images import check_image_files, describe_bad_images
from clip_prune.data.pixels import PixelLoader
from clip_prune.data.sampling import PADDING


@dataclass(frozen=True)
class CaptionedImage:
    """One image file and its captions."""

    path: Path
    captions: tuple[str, ...]


def read_coco_captions(root: Path, image_dir: str, captions_file: str) -> list[CaptionedImage]:
    """All images of a COCO-captions split with their captions, checked for the keys COCO defines."""
    images_path, captions_path = root / image_dir, root / captions_file
    missing = [str(p) for p in (root, images_path, captions_path) if not p.exists()]
    if missing:
        raise FileNotFoundError(
            f"COCO data not found: {', '.join(missing)} does not exist. Point --data.root at a folder holding "
            f"'{image_dir}/' and '{captions_file}', or name other ones with --data.train_images / "
            "--data.train_captions (calibration) and --data.val_images / --data.val_captions (evaluation)."
        )
    try:
        content = json.loads(captions_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{captions_path} is not valid JSON ({error}); expected a COCO captions file") from error
    absent = [key for key in ("images", "annotations") if not isinstance(content, dict) or key not in content]
    if absent:
        raise ValueError(
            f"{captions_path} lacks the key(s) {absent}: a COCO captions file has 'images' "
            "(id, file_name) and 'annotations' (image_id, caption)"
        )
    try:
        files = {image["id"]: image["file_name"] for image in content["images"]}
        captions: dict[int, list[str]] = {image_id: [] for image_id in files}
        for annotation in content["annotations"]:
            if annotation["image_id"] not in captions:
                raise ValueError(
                    f"{captions_path}: annotation {annotation.get('id', '?')} refers to image_id "
                    f"{annotation['image_id']}, which 'images' does not list"
                )
            captions[annotation["image_id"]].append(annotation["caption"].strip())
    except (KeyError, TypeError, AttributeError) as error:
        raise ValueError(
            f"{captions_path} has a malformed entry (missing {error}): images need 'id' and 'file_name', "
            "annotations need 'image_id' and 'caption'"
        ) from error
    return [
        CaptionedImage(images_path / files[image_id], tuple(texts))
        for image_id, texts in sorted(captions.items())
        if texts
    ]


def check_images(images: list[CaptionedImage], workers: int = 1, skip_bad: bool = False,
                 what: str = "sampled") -> tuple[list[CaptionedImage], dict[Path, str]]:
    """Decode every image fully; raise naming each one that is missing or broken, or leave them out if `skip_bad`.

    Returns the readable images and the sha256 digest of each one's bytes.
    """
    check = check_image_files([image.path for image in images], workers, description=f"checking {what} images")
    if check.problems and not skip_bad:
        raise FileNotFoundError(
            f"{len(check.problems)} {what} image(s) cannot be read:\n  {describe_bad_images(check.problems)}\n"
            "Restore the files, remove their entries from the captions JSON, or pass --data.skip_bad_images true "
            "to leave them out."
        )
    if check.problems:
        warnings.warn(
            f"skipped {len(check.problems)} of {len(images)} {what} images that cannot be read "
            f"(--data.skip_bad_images):\n  {describe_bad_images(check.problems, shown=3)}",
            stacklevel=3,
        )
    return [image for image in images if image.path in check.digests], check.digests


class ImageItems(Dataset):
    """Image files, each with one extra field: `{"pixel_values": [3, S, S], "index": i, field: value}`.

    The model inputs are what the image processor makes of the image: SigLIP2's also carry `pixel_attention_mask`
    [N] and `spatial_shapes` [2], its `pixel_values` being [N, C·p·p] patches. Where `PixelLoader` takes the
    direct path the pixels are uint8, with the processor's `pixel_mean` and `pixel_std` [3]: batches are
    normalised on the device by `clip_prune.towers.inputs_to` (`uint8=False`: float pixels, normalised here).

    Index `PADDING` (−1) is a DDP padding item (`clip_prune.data.sampling`): a copy of the last item with index −1.

    The calibration pairs carry their `caption`; the evaluation images their `label` (the image
    index for retrieval, the class for zero-shot).
    """

    def __init__(self, items: list[tuple[Path, Any]], field: str, image_processor: Any, uint8: bool = True) -> None:
        self.items = items
        self.field = field
        self.image_processor = image_processor
        self.load = PixelLoader(image_processor, uint8=uint8)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, value = self.items[-1 if index == PADDING else index]
        return {**self.load.inputs(path), "index": index, self.field: value}


@dataclass(frozen=True)
class RetrievalSplit:
    """The evaluation split: every image with all of its captions (COCO 5k protocol)."""

    images: ImageItems
    captions: list[str]
    text_to_image: torch.Tensor
    """[N_txt] index of each caption's image."""


@dataclass(frozen=True)
class ZeroShotSplit:
    """Labelled images of an ImageFolder tree and one prompt per (class, template)."""

    images: ImageItems
    class_names: list[str]
    templates: list[str]


class CaptionCollator:
    """Stacks the image inputs and tokenizes captions, padded as the text tower wants (images only without a tokenizer).

    Args:
        tokenizer: the checkpoint's tokenizer, or None.
        max_length: the longest caption in tokens (longer ones are truncated).
        padding: `longest` (in the batch; CLIP) or `max_length` (SigLIP's text tower pools the last position).
    """

    def __init__(self, tokenizer: Any | None, max_length: int, padding: str = "longest") -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.padding = padding

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        images = [name for name, value in items[0].items() if isinstance(value, torch.Tensor)]
        # default_collate stacks straight into shared memory inside a worker: no extra copy of the batch
        batch = {name: default_collate([item[name] for item in items]) for name in images}
        batch["index"] = torch.tensor([item["index"] for item in items])
        if self.tokenizer is not None:
            text = self.tokenizer(
                [item["caption"] for item in items], padding=self.padding, truncation=True,
                max_length=self.max_length, return_tensors="pt",
            )
            batch["input_ids"] = text["input_ids"]
            if "attention_mask" in text:  # SigLIP's tokenizers make none
                batch["attention_mask"] = text["attention_mask"]
        return batch


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the platform has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def text_length_limit(tokenizer: Any, config: Any = None) -> int:
    """The longest caption in tokens: the tokenizer's maximum length (CLIP's 77 when it leaves it unset), at most
    the positions of the text tower of the model `config` describes (SigLIP2's tokenizer sets no length)."""
    limit = tokenizer.model_max_length if tokenizer.model_max_length < 100_000 else 77
    positions = getattr(getattr(config, "text_config", None), "max_position_embeddings", None)
    return min(limit, positions) if positions else limit
