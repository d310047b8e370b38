"""Contrastive training of a small CLIP on COCO-format captions (the demo checkpoint, `clip-prune fit`)."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader, Dataset
from transformers import AutoImageProcessor, AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel

from clip_prune.core.run.metrics import retrieval_recall
from clip_prune.data.coco import CaptionedImage, ImageItems, check_images, read_coco_captions
from clip_prune.data.pixels import PixelLoader
from clip_prune.data.synthetic import caption_vocabulary
from clip_prune.data.tokenizer import build_word_tokenizer
from clip_prune.files import atomic_directory, check_free
from clip_prune.lightning.data import CocoDataModule
from clip_prune.towers import normalize_pixels
from clip_prune.towers.clip import ClipTower

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
# The demo architecture: 64 px images, patch 8 (T = 65), L = 4, H = 4, D = 128, F = 512.
_DEMO_VISION = dict(image_size=64, patch_size=8, hidden_size=128, num_hidden_layers=4,
                    num_attention_heads=4, intermediate_size=512)
_DEMO_TEXT = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512)


def write_demo_init(
    path: str | Path,
    vision: dict[str, Any] | None = None,
    text: dict[str, Any] | None = None,
    projection_dim: int = 64,
    max_length: int = 32,
) -> Path:
    """Write an untrained CLIP folder for the synthetic data set: config, word tokenizer, processor, no weights.

    `ContrastiveTrainingModule` builds `CLIPModel(config)` from such a folder and trains it from scratch.

    Args:
        path: folder to write (created if missing; existing files of the same names are replaced).
        vision: `CLIPVisionConfig` fields that override the demo's (64 px, patch 8, L=4, H=4, D=128, F=512).
        text: `CLIPTextConfig` fields that override the demo's (D=128, 2 layers, 4 heads, F=512).
        projection_dim: size E of the shared image-text embedding.
        max_length: caption length limit in tokens, BOS and EOS included (text position embeddings).

    Returns:
        The written folder.
    """
    path = Path(path)
    tokenizer = build_word_tokenizer(caption_vocabulary(), max_length=max_length)
    # The towers' own projection_dim is what CLIP{Vision,Text}ModelWithProjection read: keep it equal to E.
    vision_config = _DEMO_VISION | dict(projection_dim=projection_dim) | (vision or {})
    text_config = _DEMO_TEXT | dict(
        projection_dim=projection_dim, vocab_size=len(tokenizer), max_position_embeddings=max_length,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
    ) | (text or {})
    config = CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=projection_dim)
    path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    side = vision_config["image_size"]
    CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}).save_pretrained(path)
    return path


def build_clip(pretrained: str) -> CLIPModel:
    """Load a CLIPModel, or build a randomly initialised one when `pretrained` is a folder without weights."""
    folder = Path(pretrained)
    if folder.is_dir() and not any((folder / name).exists() for name in _WEIGHT_FILES):
        return CLIPModel(CLIPConfig.from_pretrained(folder))
    return CLIPModel.from_pretrained(pretrained)


class RandomCaptionImages(Dataset):
    """Every image once per epoch with one of its captions drawn at random (torch's RNG, seeded by Lightning)."""

    def __init__(self, images: list[CaptionedImage], image_processor: Any) -> None:
        self.images = images
        self.load = PixelLoader(image_processor)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = self.images[index]
        caption = image.captions[int(torch.randint(len(image.captions), ()))]
        return {"pixel_values": self.load(image.path), "caption": caption, "index": index}


class CocoTrainingDataModule(CocoDataModule):
    """COCO captions for contrastive training: the whole training split, and validation pairs from the val split.

    Args:
        root: folder holding the image folders and `annotations/`.
        pretrained: checkpoint folder whose image processor and tokenizer prepare the data (linked
            from `--model.pretrained` by the CLI).
        num_samples: validation pairs drawn from the val split, one caption per image.
        seed: seed of the validation draw.
        batch_size: image-caption pairs per batch (the in-batch negatives of the loss).
        num_workers: data-loading worker processes.
        train_images: training image folder, relative to `root`.
        train_captions: training captions file, relative to `root`.
        val_images: validation image folder, relative to `root`.
        val_captions: validation captions file, relative to `root`.
    """

    def __init__(
        self,
        root: str,
        pretrained: str,
        num_samples: int = 500,
        seed: int = 1,
        batch_size: int = 128,
        num_workers: int = 0,
        train_images: str = "train2017",
        train_captions: str = "annotations/captions_train2017.json",
        val_images: str = "val2017",
        val_captions: str = "annotations/captions_val2017.json",
    ) -> None:
        super().__init__(root, pretrained, num_samples, seed, batch_size, num_workers, train_images,
                         train_captions, val_images, val_captions)
        self.train_set: RandomCaptionImages | None = None

    def setup(self, stage: str | None = None) -> None:
        """Read and check both splits; the parent's validation loader then serves the val pairs."""
        if self.train_set is not None:
            return
        hp, root = self.hparams, Path(self.hparams.root)
        processor = self.image_processor()
        train = read_coco_captions(root, hp.train_images, hp.train_captions)
        val = read_coco_captions(root, hp.val_images, hp.val_captions)
        if not train or not val:
            empty = hp.train_captions if not train else hp.val_captions
            raise ValueError(f"{root / empty} lists no image with a caption")
        rng = random.Random(hp.seed)
        sampled = rng.sample(val, min(hp.num_samples, len(val)))
        check_images(train + sampled, self.num_workers)
        self.train_set = RandomCaptionImages(train, processor)
        pairs = [(image.path, rng.choice(image.captions)) for image in sampled]
        self.calibration = ImageItems(pairs, "caption", processor)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches; the last incomplete batch is dropped (it would have fewer negatives)."""
        assert self.train_set is not None, "call setup() first"
        return DataLoader(
            self.train_set, batch_size=self.hparams.batch_size, shuffle=True, drop_last=True,
            num_workers=self.num_workers, collate_fn=self.collator(),
            persistent_workers=self.num_workers > 0,
        )


class ContrastiveTrainingModule(L.LightningModule):
    """Trains a whole CLIPModel with the symmetric InfoNCE loss of CLIP (Radford et al., arXiv 2103.00020).

    Args:
        pretrained: folder (or Hub name) of a CLIP checkpoint to fine-tune, or a folder with only a
            config, tokenizer and image processor (see `write_demo_init`) to train from scratch.
        learning_rate: peak AdamW learning rate, reached after the warm-up, then cosine decay to 0.
        weight_decay: AdamW weight decay of the matrices (biases, norms and the logit scale have none).
        warmup_steps: optimizer steps of linear warm-up.
        save_dir: folder where the trained model, tokenizer and processor are saved at the end of `fit`
            (refused before training if it holds files, unless `overwrite`).
        overwrite: replace an existing `save_dir`.
    """

    def __init__(
        self,
        pretrained: str,
        save_dir: str,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.1,
        warmup_steps: int = 100,
        overwrite: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        check_free(save_dir, overwrite)  # before training, not after it
        self.model = build_clip(pretrained)
        self._val_embeds: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tower = ClipTower(self.model)
        image_embeds = tower.image_embeds(normalize_pixels(batch))  # the validation pairs' pixels are uint8
        text_embeds = tower.text_embeds(batch["input_ids"], batch["attention_mask"])
        return tower.loss(image_embeds, text_embeds), image_embeds, text_embeds

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        # CLIP clips the temperature at 100 so that the logits cannot blow up.
        with torch.no_grad():
            self.model.logit_scale.clamp_(max=math.log(100))
        loss, _, _ = self._loss(batch)
        self.log("train_loss", loss, prog_bar=True, batch_size=len(batch["input_ids"]))
        self.log("logit_scale", self.model.logit_scale.exp(), batch_size=len(batch["input_ids"]))
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, image_embeds, text_embeds = self._loss(batch)
        self.log("val_loss", loss, sync_dist=True, batch_size=len(batch["input_ids"]))
        self._val_embeds.append((image_embeds.float().cpu(), text_embeds.float().cpu()))

    def on_validation_epoch_end(self) -> None:
        """Retrieval recall@k over the validation pairs this process saw (all of them on one device)."""
        if not self._val_embeds:
            return
        images, texts = (torch.cat(parts) for parts in zip(*self._val_embeds, strict=True))
        self._val_embeds.clear()
        recall = retrieval_recall(images, texts, torch.arange(len(texts)))
        self.log_dict({f"val_{name}": value for name, value in recall.items()})

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        decay = [p for p in self.model.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.learning_rate,
        )
        total = max(int(self.trainer.estimated_stepping_batches), 1)

        def factor(step: int) -> float:
            if step < hp.warmup_steps:
                return (step + 1) / hp.warmup_steps
            progress = (step - hp.warmup_steps) / max(total - hp.warmup_steps, 1)
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @rank_zero_only
    def on_fit_end(self) -> None:
        """Save the model (safetensors), tokenizer and image processor as a Hugging Face folder, atomically."""
        with atomic_directory(self.hparams.save_dir, self.hparams.overwrite) as staging:
            self.model.save_pretrained(staging)
            AutoTokenizer.from_pretrained(self.hparams.pretrained).save_pretrained(staging)
            AutoImageProcessor.from_pretrained(self.hparams.pretrained).save_pretrained(staging)
