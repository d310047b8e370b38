"""What pruning costs: retrieval recall@k and zero-shot accuracy of a (masked or pruned) CLIP.

Pruning touches only the vision tower, so caption and class-prompt embeddings are computed
once per run and reused for the dense, masked and pruned models.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import CLIPModel

from clip_prune.data.coco import CocoDataModule, ImageItems, text_length_limit
from clip_prune.metrics import retrieval_recall, zero_shot_accuracy
from clip_prune.model.module import image_embeddings


class Evaluator:
    """Scores CLIP models on the evaluation data of a `CocoDataModule`.

    Args:
        datamodule: supplies the evaluation split, the zero-shot tree, tokenizer and processor.
        device: where the models run.
        progress: show progress bars.
    """

    def __init__(self, datamodule: CocoDataModule, device: torch.device, progress: bool = True) -> None:
        self.retrieval = datamodule.retrieval_split()
        self.zero_shot = datamodule.zero_shot_split()
        self.tokenizer = datamodule.tokenizer()
        self.batch_size = datamodule.hparams.batch_size
        self.num_workers = datamodule.hparams.num_workers
        self.device = device
        self.progress = progress
        self._texts: dict[str, torch.Tensor] = {}

    def __call__(self, model: CLIPModel, name: str) -> dict[str, Any]:
        """Metrics of `model` (in percent); `name` labels the progress bars."""
        if not isinstance(model, CLIPModel):
            return {}
        if self.tokenizer is None:
            raise ValueError("the checkpoint has no tokenizer, so captions and prompts cannot be embedded; "
                             "save the tokenizer beside the model to evaluate it")
        results: dict[str, Any] = {}
        if self.retrieval is not None:
            images, _ = self._encode_images(model, self.retrieval.images, f"{name}: retrieval images")
            texts = self._encode_texts_once(model, "captions", self.retrieval.captions)
            results["retrieval"] = retrieval_recall(images, texts, self.retrieval.text_to_image.to(images.device))
        if self.zero_shot is not None:
            images, labels = self._encode_images(model, self.zero_shot.images, f"{name}: zero-shot images")
            prompts = [template.format(c) for c in self.zero_shot.class_names for template in self.zero_shot.templates]
            classes = len(self.zero_shot.class_names)
            texts = self._encode_texts_once(model, "prompts", prompts).view(classes, -1, images.shape[-1])
            results["zero_shot"] = zero_shot_accuracy(images, texts, labels)
        return results

    @torch.no_grad()
    def _encode_images(self, model: CLIPModel, images: ImageItems, desc: str) -> tuple[torch.Tensor, torch.Tensor]:
        loader = DataLoader(images, batch_size=self.batch_size, num_workers=self.num_workers)
        embeds, labels = [], []
        for batch in tqdm(loader, desc=desc, disable=not self.progress, leave=False):
            pixels = batch["pixel_values"].to(self.device, dtype=model.dtype)
            embeds.append(F.normalize(image_embeddings(model, pixels).float(), dim=-1))
            labels.append(batch["label"].to(self.device))
        return torch.cat(embeds), torch.cat(labels)

    @torch.no_grad()
    def _encode_texts_once(self, model: CLIPModel, key: str, texts: list[str]) -> torch.Tensor:
        if key not in self._texts:
            limit = text_length_limit(self.tokenizer)
            chunks = []
            for start in range(0, len(texts), self.batch_size * 4):
                tokens = self.tokenizer(texts[start : start + self.batch_size * 4], padding="longest",
                                        truncation=True, max_length=limit, return_tensors="pt").to(self.device)
                embeds = model.get_text_features(input_ids=tokens["input_ids"],
                                                 attention_mask=tokens["attention_mask"]).pooler_output
                chunks.append(F.normalize(embeds.float(), dim=-1))
            self._texts[key] = torch.cat(chunks)
        return self._texts[key]
