"""COCO-captions data for calibration (Fisher, rescaling) and evaluation (retrieval).

The layout is MS-COCO's: `root/train2017/*.jpg` with `root/annotations/captions_train2017.json`,
and the same for `val2017`. The calibration split feeds Lightning's *validation* loop (where
the Fisher information is gathered, DESIGN.md "Shape"); the evaluation split, every image with
all its captions, feeds `clip_prune.evaluation`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, default_collate
from transformers import AutoImageProcessor, AutoTokenizer

from clip_prune.data.images import check_image_files, describe_bad_images
from clip_prune.data.pixels import PixelLoader
from clip_prune.data.sampling import PADDING, GlobalBatchSampler


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


def load_pixels(path: Path, image_processor: Any) -> torch.Tensor:
    """One image file as CLIP pixels [3, S, S] (converted to RGB, resized and normalised as the processor does)."""
    return PixelLoader(image_processor)(path)


class ImageItems(Dataset):
    """Image files, each with one extra field: `{"pixel_values": [3, S, S], "index": i, field: value}`.

    Index `PADDING` (−1) is a DDP padding item (`clip_prune.data.sampling`): a copy of the last item with index −1.

    The calibration pairs carry their `caption`; the evaluation images their `label` (the image
    index for retrieval, the class for zero-shot).
    """

    def __init__(self, items: list[tuple[Path, Any]], field: str, image_processor: Any) -> None:
        self.items = items
        self.field = field
        self.image_processor = image_processor
        self.load = PixelLoader(image_processor)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, value = self.items[-1 if index == PADDING else index]
        return {"pixel_values": self.load(path), "index": index, self.field: value}


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
    """Stacks images and tokenizes captions, padded to the longest in the batch (images only without a tokenizer)."""

    def __init__(self, tokenizer: Any | None, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = {
            # default_collate stacks straight into shared memory inside a worker: no extra copy of the batch
            "pixel_values": default_collate([item["pixel_values"] for item in items]),
            "index": torch.tensor([item["index"] for item in items]),
        }
        if self.tokenizer is not None:
            text = self.tokenizer(
                [item["caption"] for item in items], padding="longest", truncation=True,
                max_length=self.max_length, return_tensors="pt",
            )
            batch |= {"input_ids": text["input_ids"], "attention_mask": text["attention_mask"]}
        return batch


class CocoDataModule(L.LightningDataModule):
    """COCO-captions calibration samples (the validation loop) and evaluation split (retrieval metrics).

    Args:
        root: folder holding the image folders and `annotations/`; only `apply` runs without it
            (it then verifies the pruned model on synthetic images).
        pretrained: checkpoint whose image processor and tokenizer prepare the data (linked
            from `--model.pretrained` by the CLI).
        num_samples: image–caption pairs drawn for calibration, one caption per image, without
            replacement.
        seed: seed of that draw (and of the caption chosen per image).
        batch_size: images per batch.
        num_workers: data-loading worker processes (and threads of the up-front image check); None
            uses the CPU cores this process may run on.
        train_images: calibration image folder, relative to `root`.
        train_captions: calibration captions file, relative to `root`.
        val_images: evaluation image folder, relative to `root`.
        val_captions: evaluation captions file, relative to `root`.
        eval_samples: evaluation images (all captions of each); None uses the whole split.
        zero_shot_root: an ImageFolder tree (one folder per class, named by the class) for
            zero-shot accuracy; None skips it.
        zero_shot_templates: prompt templates with `{}` for the class name; None uses ["a photo of a {}."].
        skip_bad_images: leave out images that cannot be decoded (and say how many) instead of
            stopping with their list.
    """

    def __init__(
        self,
        root: str | None = None,
        pretrained: str | None = None,
        num_samples: int = 8192,
        seed: int = 1,
        batch_size: int = 32,
        num_workers: int | None = None,
        train_images: str = "train2017",
        train_captions: str = "annotations/captions_train2017.json",
        val_images: str = "val2017",
        val_captions: str = "annotations/captions_val2017.json",
        eval_samples: int | None = None,
        zero_shot_root: str | None = None,
        zero_shot_templates: list[str] | None = None,
        skip_bad_images: bool = False,
    ) -> None:
        super().__init__()
        if num_samples < 1:
            raise ValueError(f"--data.num_samples must be at least 1, got {num_samples}")
        if pretrained is None:  # the CLI links it from --model.pretrained; optional only so root can come first
            raise ValueError("CocoDataModule needs pretrained, the checkpoint whose processor prepares the images")
        if batch_size < 1:
            raise ValueError(f"--data.batch_size must be at least 1, got {batch_size}")
        if num_workers is not None and num_workers < 0:
            raise ValueError(f"--data.num_workers must be >= 0 (or null for one per CPU core), got {num_workers}")
        self.save_hyperparameters()
        self.num_workers = available_cores() if num_workers is None else num_workers
        self.calibration: ImageItems | None = None
        self.calibration_digest: str | None = None
        """sha256 over the sampled pairs (caption and image bytes, in order): which data the statistics saw."""
        self._read: dict[str, Any] = {}  # processor, tokenizer and evaluation splits, each read once

    def setup(self, stage: str | None = None) -> None:
        """Read, sample and check the calibration split and the evaluation data (before any model work)."""
        if self.calibration is None:
            self.calibration = self._calibration_pairs(self.hparams.num_samples)
            self.retrieval_split()
            self.zero_shot_split()

    def _calibration_pairs(self, count: int) -> ImageItems:
        """`count` image–caption pairs of the calibration split, drawn with the seed and checked."""
        hp = self.hparams
        if hp.root is None:
            raise ValueError(
                "--data.root is not set: calibration needs COCO-format image-caption data (a folder with "
                f"{hp.train_images}/ and {hp.train_captions}); `clip-prune make-demo-data` writes a small one"
            )
        images = read_coco_captions(Path(hp.root), hp.train_images, hp.train_captions)
        if not images:
            raise ValueError(f"{Path(hp.root) / hp.train_captions} lists no image with a caption")
        if count > len(images):
            warnings.warn(
                f"--data.num_samples={count} is larger than the {len(images)} captioned images in "
                f"{Path(hp.root) / hp.train_captions}: using all {len(images)}.",
                stacklevel=2,
            )
        rng = random.Random(hp.seed)
        sampled = rng.sample(images, min(count, len(images)))
        captions = {image.path: rng.choice(image.captions) for image in sampled}
        readable, digests = check_images(sampled, self.num_workers, hp.skip_bad_images)
        if not readable:
            raise FileNotFoundError(f"none of the {len(sampled)} sampled images can be read; restore the files")
        pairs = [(image.path, captions[image.path]) for image in readable]
        content = hashlib.sha256()
        for path, caption in pairs:
            content.update(f"{digests[path]}\t{caption}\n".encode())
        self.calibration_digest = content.hexdigest()
        return ImageItems(pairs, "caption", self.image_processor())

    def sample_pixels(self, count: int) -> torch.Tensor:
        """Up to `count` processed calibration images [B, 3, S, S], without reading the whole sample."""
        pairs = self.calibration if self.calibration is not None else self._calibration_pairs(count)
        return torch.stack([pairs[i]["pixel_values"] for i in range(min(count, len(pairs)))])

    def val_dataloader(self) -> DataLoader:
        """Calibration batches; under DDP step k of every rank holds its share of the same W·B samples
        (`GlobalBatchSampler`), so the ranks together see one process's batches of W·B."""
        assert self.calibration is not None, "call setup() first"
        sampler = None
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:
            sampler = GlobalBatchSampler(self.calibration, self.hparams.batch_size, trainer.world_size,
                                         trainer.global_rank)
        return DataLoader(
            self.calibration, batch_size=self.hparams.batch_size, shuffle=False, sampler=sampler,
            num_workers=self.num_workers, collate_fn=self.collator(),
            persistent_workers=False, pin_memory=trainer is not None and trainer.strategy.root_device.type == "cuda",
        )

    def _once(self, key: str, read: Callable[[], Any]) -> Any:
        """`read()` the first time `key` is asked for; the stored value afterwards."""
        if key not in self._read:
            self._read[key] = read()
        return self._read[key]

    def image_processor(self) -> Any:
        """The checkpoint's image processor (read once)."""
        return self._once("image_processor", lambda: AutoImageProcessor.from_pretrained(self.hparams.pretrained))

    def tokenizer(self) -> Any | None:
        """The checkpoint's tokenizer (read once), or None for a vision-only checkpoint saved without one."""
        return self._once("tokenizer", self._read_tokenizer)

    def _read_tokenizer(self) -> Any | None:
        try:
            return AutoTokenizer.from_pretrained(self.hparams.pretrained)
        except (OSError, ValueError):
            return None

    def has_evaluation_data(self) -> bool:
        """Whether the evaluation split (or a zero-shot tree) is there to measure what pruning costs."""
        hp = self.hparams
        return self._has_retrieval_split() or hp.zero_shot_root is not None

    def _has_retrieval_split(self) -> bool:
        hp = self.hparams
        return hp.root is not None and (Path(hp.root) / hp.val_captions).is_file()

    def retrieval_split(self) -> RetrievalSplit | None:
        """The evaluation split's images and all their captions, checked; None when it is absent."""
        return self._once("retrieval", self._read_retrieval_split)

    def _read_retrieval_split(self) -> RetrievalSplit | None:
        hp = self.hparams
        if not self._has_retrieval_split():
            return None
        images = read_coco_captions(Path(hp.root), hp.val_images, hp.val_captions)
        if hp.eval_samples is not None:
            images = random.Random(hp.seed).sample(images, min(hp.eval_samples, len(images)))
        if not images:
            raise ValueError(
                f"the evaluation split {Path(hp.root) / hp.val_captions} has no captioned image"
                + (" (--data.eval_samples is 0)" if hp.eval_samples == 0 else "")
            )
        images, _ = check_images(images, self.num_workers, hp.skip_bad_images, what="evaluation")
        captions = [caption for image in images for caption in image.captions]
        owners = [index for index, image in enumerate(images) for _ in image.captions]
        items = [(image.path, index) for index, image in enumerate(images)]
        return RetrievalSplit(ImageItems(items, "label", self.image_processor()), captions, torch.tensor(owners))

    def zero_shot_split(self) -> ZeroShotSplit | None:
        """Labelled images of `zero_shot_root` (class = folder name, underscores read as spaces)."""
        return self._once("zero_shot", self._read_zero_shot_split)

    def _read_zero_shot_split(self) -> ZeroShotSplit | None:
        hp = self.hparams
        if hp.zero_shot_root is None:
            return None
        root = Path(hp.zero_shot_root)
        classes = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        if not classes:
            raise FileNotFoundError(
                f"--data.zero_shot_root={root} must be a folder with one sub-folder of images per class"
            )
        suffixes = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
        items = [(path, label) for label, folder in enumerate(classes)
                 for path in sorted(folder.iterdir()) if path.suffix.lower() in suffixes]
        if not items:
            raise FileNotFoundError(
                f"--data.zero_shot_root={root} has class folders but no .jpg/.png/.bmp/.webp images in them"
            )
        readable, _ = check_images([CaptionedImage(path, ()) for path, _ in items], self.num_workers,
                                   hp.skip_bad_images, what="zero-shot")
        kept = {image.path for image in readable}
        items = [(path, label) for path, label in items if path in kept]
        templates = hp.zero_shot_templates or ["a photo of a {}."]
        names = [folder.name.replace("_", " ") for folder in classes]
        return ZeroShotSplit(ImageItems(items, "label", self.image_processor()), names, templates)

    def collator(self) -> CaptionCollator:
        """Tokenizes captions with the checkpoint's tokenizer, truncated at its text length limit."""
        tokenizer = self.tokenizer()
        return CaptionCollator(tokenizer, text_length_limit(tokenizer) if tokenizer is not None else 0)


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the platform has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def text_length_limit(tokenizer: Any) -> int:
    """The tokenizer's maximum length, or CLIP's 77 when the tokenizer leaves it unset."""
    return tokenizer.model_max_length if tokenizer.model_max_length < 100_000 else 77
