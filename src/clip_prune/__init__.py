"""clip-prune: structured pruning of CLIP's vision tower without retraining."""

from clip_prune.startup import STARTUP  # noqa: F401 - first, so that its clock starts before the heavy imports

# isort: split
from clip_prune.core.deploy.saving import load_pruned, register_pruned_models

# Lets transformers.AutoConfig / AutoModel.from_pretrained open pruned model directories.
register_pruned_models()

__all__ = ["load_pruned", "register_pruned_models"]
