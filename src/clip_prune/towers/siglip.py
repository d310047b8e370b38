"""SigLIP (Zhai et al., arXiv 2303.15343): `SiglipModel` and `SiglipVisionModel`.

The vision tower has no CLS token (T = patches) and no `pre_layrnorm`; an attention-pooling head (a learned probe
attending over all tokens, then layernorm and MLP) pools the last layer, and its output is the image embedding
(no projection). Trained with the sigmoid loss over all in-batch pairs, whose text tower pools the last token of
captions padded to the maximum length.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from transformers import PretrainedConfig, SiglipModel, SiglipProcessor, SiglipVisionModel

from clip_prune.hub.modeling_siglip_pruned import PrunedSiglipModel, PrunedSiglipVisionModel
from clip_prune.towers.base import VisionInputs, VisionTower


def sigmoid_loss(logits: torch.Tensor) -> torch.Tensor:
    """SigLIP's loss on the pair logits [N, N] (exp(logit_scale)·cos + logit_bias): −Σ_ij log σ(z_ij · logit_ij) / N,
    z = +1 on the diagonal, −1 elsewhere; summed over the N×N pairs and divided by the batch size N, as in the
    paper (its Algorithm 1)."""
    signs = 2 * torch.eye(len(logits), device=logits.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(signs * logits).sum() / len(logits)


class SiglipTower(VisionTower):
    family = "siglip"
    vision_model_type = "siglip_vision_model"
    model_classes: ClassVar = {"siglip": SiglipModel, "siglip_vision_model": SiglipVisionModel}
    pruned_classes: ClassVar = {"siglip": PrunedSiglipModel, "siglip_vision_model": PrunedSiglipVisionModel}
    processor_class = SiglipProcessor
    text_padding = "max_length"

    @classmethod
    def num_tokens(cls, config: PretrainedConfig) -> int:
        return (config.image_size // config.patch_size) ** 2

    def embed(self, inputs: VisionInputs) -> torch.Tensor:
        return self.vision.embeddings(inputs["pixel_values"])

    def image_embeds(self, inputs: VisionInputs) -> torch.Tensor:
        if not self.config.vision_use_head:
            raise ValueError("this SigLIP vision tower has no pooling head (vision_use_head is false), so it gives no "
                             "image embedding; clip-prune needs a checkpoint with its head")
        return self.vision(**self.model_inputs(inputs)).pooler_output

    def text_embeds(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Without the attention mask: SigLIP's text tower was trained on captions padded to `max_length` with no mask
        and pools the last position (its tokenizers make no mask)."""
        return self.model.get_text_features(input_ids=input_ids).pooler_output

    @property
    def embed_dim(self) -> int:
        return self.config.hidden_size

    def logits(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        scale = self.model.logit_scale.float().exp().to(image_embeds)
        bias = self.model.logit_bias.float().to(image_embeds)
        return scale * F.normalize(image_embeds, dim=-1) @ F.normalize(text_embeds, dim=-1).T + bias

    def loss(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        return sigmoid_loss(self.logits(image_embeds, text_embeds))
