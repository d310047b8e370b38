"""CLIP models whose vision encoder layers keep their own numbers of heads and neurons.

The layer surgery is shared by every family (`pruned_layers.py`). Part of the remote code of a pruned
directory (see `clip_prune/hub/__init__.py`): imports no clip_prune.
"""

from transformers import CLIPModel, CLIPVisionModel

from .configuration_clip_pruned import PrunedCLIPConfig, PrunedCLIPVisionConfig
from .pruned_layers import PrunedFullModel, PrunedVisionModel


class PrunedCLIPVisionModel(PrunedVisionModel, CLIPVisionModel):
    """A CLIPVisionModel whose layers have the widths of `config.heads_per_layer` and `neurons_per_layer`."""

    config: PrunedCLIPVisionConfig


class PrunedCLIPModel(PrunedFullModel, CLIPModel):
    """A CLIPModel whose vision tower is a `PrunedCLIPVisionModel`; the text tower is CLIP's own."""

    config: PrunedCLIPConfig
    pruned_vision_class = PrunedCLIPVisionModel
