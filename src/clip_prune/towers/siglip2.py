"""SigLIP2 (Tschannen et al., arXiv 2502.14786): `Siglip2Model` and `Siglip2VisionModel`, as SigLIP's adapter.

What differs is the input: the image processor patchifies each image at its own aspect ratio into at most
`max_num_patches` patches (B, N, C·p·p), pads them to N, and says which are real (`pixel_attention_mask`, B × N)
and on which grid they lie (`spatial_shapes`, B × 2), by which the position embeddings are resized. The encoder
layers attend to the real patches only, and the pooling head reads them only.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from transformers import PretrainedConfig, Siglip2Model, Siglip2Processor, Siglip2VisionModel
from transformers.masking_utils import create_bidirectional_mask

from clip_prune.hub.modeling_siglip_pruned import PrunedSiglip2Model, PrunedSiglip2VisionModel
from clip_prune.towers.base import VisionInputs
from clip_prune.towers.siglip import SiglipTower


class Siglip2Tower(SiglipTower):
    family = "siglip2"
    vision_model_type = "siglip2_vision_model"
    model_classes: ClassVar = {"siglip2": Siglip2Model, "siglip2_vision_model": Siglip2VisionModel}
    pruned_classes: ClassVar = {"siglip2": PrunedSiglip2Model, "siglip2_vision_model": PrunedSiglip2VisionModel}
    processor_class = Siglip2Processor
    input_names = ("pixel_values", "pixel_attention_mask", "spatial_shapes")

    @classmethod
    def num_tokens(cls, config: PretrainedConfig) -> int:
        """The config's `num_patches`, the patches of the position-embedding grid (padded inputs have as many)."""
        return config.num_patches

    def embed(self, inputs: VisionInputs) -> torch.Tensor:
        return self.vision.embeddings(inputs["pixel_values"], inputs["spatial_shapes"])

    def layer_attention_mask(self, inputs: VisionInputs) -> torch.Tensor | None:
        """The mask `Siglip2VisionModel.forward` builds from the pixel attention mask for the chosen attention."""
        pixels = inputs["pixel_values"]
        like = pixels.new_empty(*pixels.shape[:2], 0).to(self.vision.embeddings.patch_embedding.weight.dtype)
        return create_bidirectional_mask(config=self.config, inputs_embeds=like,
                                         attention_mask=inputs["pixel_attention_mask"])

    def token_mask(self, inputs: VisionInputs) -> torch.Tensor | None:
        return inputs["pixel_attention_mask"].bool()

    def example_inputs(self, batch_size: int, image_size: int | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
        """Random patchified inputs filling the square grid of `num_patches` (no padding)."""
        if image_size is not None:
            raise ValueError(f"SigLIP2 takes up to num_patches={self.config.num_patches} patches, not an image size; "
                             f"got image_size={image_size}")
        config, parameter = self.config, next(self.vision.parameters())
        side = int(config.num_patches ** 0.5)
        generator = torch.Generator().manual_seed(seed)
        pixels = torch.randn(batch_size, side * side, config.num_channels * config.patch_size ** 2,
                             generator=generator)
        return {"pixel_values": pixels.to(parameter.device, parameter.dtype),
                "pixel_attention_mask": torch.ones(batch_size, side * side, dtype=torch.long, device=parameter.device),
                "spatial_shapes": torch.tensor([[side, side]] * batch_size, device=parameter.device)}
