"""clip-prune: structured pruning of CLIP's vision tower without retraining."""

from clip_prune.startup import STARTUP  # noqa: F401 - first, so that its clock starts before the heavy imports

# isort: split
from clip_prune.core.deploy.saving import load_pruned, register_pruned_models

# Lets transformers.AutoConfig / AutoModel.from_pretrained open pruned model directories.
register_pruned_models()

__all__ = ["PruningOptions", "PruningResult", "load_pruned", "prune", "register_pruned_models"]

_PRUNING = {"prune": "clip_prune.api", "PruningResult": "clip_prune.api",
            "PruningOptions": "clip_prune.core.pruning.options"}
"""Imported on first use: loading a pruned model needs none of the pruning code (nor torchmetrics)."""


def __getattr__(name: str) -> object:
    if name not in _PRUNING:
        raise AttributeError(f"module 'clip_prune' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_PRUNING[name]), name)
