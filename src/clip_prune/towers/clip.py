"""CLIP (Radford et al., arXiv 2103.00020): `CLIPModel` and `CLIPVisionModel`.

The vision tower prepends a CLS token, normalises the embeddings once more (`pre_layrnorm`) before the first
layer and pools the last layer's CLS token; a full model projects it. Trained with the symmetric InfoNCE
loss over in-batch pairs at a learned temperature.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from transformers import CLIPModel, CLIPProcessor, CLIPVisionModel, PretrainedConfig

from clip_prune.hub.modeling_clip_pruned import PrunedCLIPModel, PrunedCLIPVisionModel
from clip_prune.towers.base import VisionInputs, VisionTower


def info_nce_loss(logits: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over the in-batch pairs of `logits` [N, N] (row i matches column i)."""
    targets = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


class ClipTower(VisionTower):
    family = "clip"
    vision_model_type = "clip_vision_model"
    model_classes: ClassVar = {"clip": CLIPModel, "clip_vision_model": CLIPVisionModel}
    pruned_classes: ClassVar = {"clip": PrunedCLIPModel, "clip_vision_model": PrunedCLIPVisionModel}
    processor_class = CLIPProcessor
    pooled_tokens = slice(0, 1)

    @classmethod
    def num_tokens(cls, config: PretrainedConfig) -> int:
        return (config.image_size // config.patch_size) ** 2 + 1

    def embed(self, inputs: VisionInputs) -> torch.Tensor:
        return self.vision.pre_layrnorm(self.vision.embeddings(inputs["pixel_values"]))

    def image_embeds(self, inputs: VisionInputs) -> torch.Tensor:
        if self.has_text:
            return self.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        return self.vision(pixel_values=inputs["pixel_values"]).pooler_output

    def text_embeds(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output

    @property
    def embed_dim(self) -> int:
        return self.model.config.projection_dim if self.has_text else self.config.hidden_size

    def logits(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        scale = self.model.logit_scale.float().exp().to(image_embeds)
        return scale * F.normalize(image_embeds, dim=-1) @ F.normalize(text_embeds, dim=-1).T

    def loss(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        return info_nce_loss(self.logits(image_embeds, text_embeds))
