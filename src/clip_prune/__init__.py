"""clip-prune: structured pruning of CLIP's vision tower without retraining."""

from clip_prune.startup import STARTUP  # noqa: F401 - first, so that its clock starts before the heavy imports

# isort: split
from clip_prune.registration import register_pruned_models

# Lets transformers.AutoConfig / AutoModel.from_pretrained open pruned model directories.
register_pruned_models()

__all__ = ["PruningOptions", "PruningResult", "load_pruned", "prune", "register_pruned_models"]

_ON_FIRST_USE = {"prune": "clip_prune.api", "PruningResult": "clip_prune.api",
                 "PruningOptions": "clip_prune.core.pruning.options", "load_pruned": "clip_prune.core.deploy.saving"}
"""Imported on first use: registering the pruned classes needs neither the pruning code (nor torchmetrics) nor
the modeling code (`clip_prune/registration.py`)."""


def __getattr__(name: str) -> object:
    if name not in _ON_FIRST_USE:
        raise AttributeError(f"module 'clip_prune' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_ON_FIRST_USE[name]), name)
