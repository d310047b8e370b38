"""`CocoDataModule`: COCO-captions calibration batches for Lightning's validation loop, and the evaluation data.

The files and splits themselves are read by `clip_prune.data.coco` (no Lightning there).
"""

from __future__ import annotations

import hashlib
import random
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader
from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

from clip_prune.core.run.evaluation import Evaluator
from clip_prune.data.coco import (
    CaptionCollator,
    CaptionedImage,
    ImageItems,
    RetrievalSplit,
    ZeroShotSplit,
    available_cores,
    check_images,
    read_coco_captions,
    text_length_limit,
)
from clip_prune.data.sampling import GlobalBatchSampler
from clip_prune.errors import first_line
from clip_prune.startup import STARTUP
from clip_prune.towers import tower_class


def check_template(template: str) -> None:
    """Refuse a zero-shot prompt template that does not put the class name in (every class would get one prompt)."""
    try:
        named = template.format("cat") != template.format("dog")
    except (IndexError, KeyError, ValueError):
        named = False
    if not named:
        raise ValueError(f"--data.zero_shot_templates: {template!r} has no {{}} where the class name goes; write "
                         "e.g. 'a photo of a {}.'")


def keeps_float32_inputs(precision: Any) -> bool:
    """Whether a Lightning precision plugin leaves float32 batch tensors exact (32-true, the mixed ones, 64-true)."""
    return precision.convert_input(torch.zeros(1)).dtype in (torch.float32, torch.float64)


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
        for template in zero_shot_templates or []:
            check_template(template)
        self.save_hyperparameters()
        self.num_workers = available_cores() if num_workers is None else num_workers
        self.calibration: ImageItems | None = None
        self.calibration_digest: str | None = None
        """sha256 over the sampled pairs (caption and image bytes, in order): which data the statistics saw."""
        self._read: dict[str, Any] = {}  # config, processor, tokenizer and evaluation splits, each read once

    def input_paths(self) -> list[Path]:
        """The local files and folders this data is read from (the data root holds its splits unless they are
        named outside it): outputs must stay clear of them."""
        hp = self.hparams
        paths = [] if hp.root is None else [Path(hp.root) / name for name in (
            "", hp.train_images, hp.train_captions, hp.val_images, hp.val_captions)]
        return paths + ([] if hp.zero_shot_root is None else [Path(hp.zero_shot_root)])

    def setup(self, stage: str | None = None) -> None:
        """Read, sample and check the calibration split and the evaluation data (before any model work)."""
        if self.calibration is None:
            STARTUP.lap("run_setup")
            self.calibration = self._calibration_pairs(self.hparams.num_samples)
            self.retrieval_split()
            self.zero_shot_split()
            STARTUP.lap("data_setup")

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

    def sample_inputs(self, count: int) -> dict[str, torch.Tensor]:
        """Up to `count` processed calibration images (`pixel_values` [B, 3, S, S], and SigLIP2's patch mask and
        grid; uint8 pixels come with `pixel_mean` and `pixel_std`, for `clip_prune.towers.inputs_to`), without
        reading the whole sample."""
        pairs = self.calibration if self.calibration is not None else self._calibration_pairs(count)
        items = [pairs[i] for i in range(min(count, len(pairs)))]
        return {name: torch.stack([item[name] for item in items]) for name, value in items[0].items()
                if isinstance(value, torch.Tensor)}

    def val_dataloader(self) -> DataLoader:
        """Calibration batches; under DDP step k of every rank holds its share of the same W·B samples
        (`GlobalBatchSampler`), so the ranks together see one process's batches of W·B."""
        assert self.calibration is not None, "call setup() first"
        sampler = None
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:
            sampler = GlobalBatchSampler(self.calibration, self.hparams.batch_size, trainer.world_size,
                                         trainer.global_rank)
        # A precision plugin that casts the batch's float tensors to half (`bf16-true`, `16-true`) would round
        # pixel_mean and pixel_std before the device normalises with them: such runs normalise in the workers.
        self.calibration.load.uint8 = trainer is None or keeps_float32_inputs(trainer.precision_plugin)
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
        return self._once("image_processor", self._read_image_processor)

    def _read_image_processor(self) -> Any:
        try:
            return AutoImageProcessor.from_pretrained(self.hparams.pretrained)
        except (OSError, ValueError) as error:
            folder = Path(self.hparams.pretrained)
            unsaved = folder.is_dir() and not (folder / "preprocessor_config.json").exists()
            why = "no preprocessor_config.json" if unsaved else first_line(error, limit=120)
            raise FileNotFoundError(
                f"--model.pretrained {self.hparams.pretrained} has no image processor ({why}); save it beside the "
                "model: AutoImageProcessor.from_pretrained(ORIGINAL).save_pretrained(FOLDER)"
            ) from error

    def tokenizer(self) -> Any | None:
        """The checkpoint's tokenizer (read once), or None for a vision-only checkpoint saved without one."""
        return self._once("tokenizer", self._read_tokenizer)

    def _read_tokenizer(self) -> Any | None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(self.hparams.pretrained)
        except (OSError, ValueError):
            return None
        # For a checkpoint saved without tokenizer files transformers makes up one that knows only its special
        # tokens: every caption would become the same unknown token. That is no tokenizer.
        return tokenizer if len(tokenizer) > len(set(tokenizer.all_special_ids)) else None

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

    def evaluator(self, device: torch.device, progress: bool = True) -> Evaluator:
        """An `Evaluator` over this data's evaluation split and zero-shot tree, on `device`."""
        return Evaluator(self.retrieval_split(), self.zero_shot_split(), self.tokenizer(), self.hparams.batch_size,
                         self.num_workers, device, progress)

    def collator(self) -> CaptionCollator:
        """Tokenizes captions with the checkpoint's tokenizer, truncated at its text length limit and padded as the
        family's text tower wants."""
        tokenizer = self.tokenizer()
        config = self._once("config", lambda: AutoConfig.from_pretrained(self.hparams.pretrained))
        limit = text_length_limit(tokenizer, config) if tokenizer is not None else 0
        return CaptionCollator(tokenizer, limit, tower_class(config).text_padding)
