"""SigLIP models whose vision encoder layers keep their own numbers of heads and neurons.

The layer surgery is shared by every family (`pruned_layers.py`); the attention-pooling head keeps its dense
sizes. Part of the remote code of a pruned directory (see `clip_prune/hub/__init__.py`): imports no clip_prune.
"""

from transformers import SiglipModel, SiglipVisionModel

from .configuration_siglip_pruned import PrunedSiglipConfig, PrunedSiglipVisionConfig
from .pruned_layers import PrunedFullModel, PrunedVisionModel


class PrunedSiglipVisionModel(PrunedVisionModel, SiglipVisionModel):
    """A SiglipVisionModel whose layers have the widths of `config.heads_per_layer` and `neurons_per_layer`."""

    config: PrunedSiglipVisionConfig


class PrunedSiglipModel(PrunedFullModel, SiglipModel):
    """A SiglipModel whose vision tower is a `PrunedSiglipVisionModel`; the text tower is SigLIP's own."""

    config: PrunedSiglipConfig
    pruned_vision_class = PrunedSiglipVisionModel
