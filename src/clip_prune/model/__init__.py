"""Model: masks hooked into CLIP's vision encoder and the Lightning modules around a CLIP checkpoint."""

from clip_prune.model.masking import VisionMasks, encoder_layers, mask_shapes, vision_tower
from clip_prune.model.module import MaskedCLIPModule, load_clip

__all__ = ["MaskedCLIPModule", "VisionMasks", "encoder_layers", "load_clip", "mask_shapes", "vision_tower"]
