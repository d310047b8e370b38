"""What `import clip_prune` does: lets `AutoConfig`, `AutoModel` and transformers' zero-shot pipeline open pruned
directories of every family without `trust_remote_code`.

A model class of transformers imports `transformers.modeling_utils`, which costs more than `import torch,
transformers` together (`benchmarks/bench_import.py`). So the Auto registry first holds a stand-in for each pruned
model class, which imports the real class (`clip_prune.hub`) when a model is loaded or built and then puts it in its
own place. The config classes are registered as they are: they import no modeling code.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from transformers import AutoConfig, AutoModel, AutoModelForZeroShotImageClassification, PretrainedConfig

from clip_prune.hub.configuration_clip_pruned import PrunedCLIPConfig, PrunedCLIPVisionConfig
from clip_prune.hub.configuration_siglip_pruned import (
    PrunedSiglip2Config,
    PrunedSiglip2VisionConfig,
    PrunedSiglipConfig,
    PrunedSiglipVisionConfig,
)


@dataclass(frozen=True)
class PrunedClass:
    """Where a pruned model class lives, named without importing it, and the config class that selects it."""

    config_class: type[PretrainedConfig]
    module: str
    name: str
    has_text: bool
    """A full image-text model: also what `pipeline("zero-shot-image-classification")` loads."""

    def load(self) -> type:
        """The model class itself (this imports its modeling module)."""
        return getattr(importlib.import_module(self.module), self.name)


PRUNED_CLASSES = (
    PrunedClass(PrunedCLIPConfig, "clip_prune.hub.modeling_clip_pruned", "PrunedCLIPModel", True),
    PrunedClass(PrunedCLIPVisionConfig, "clip_prune.hub.modeling_clip_pruned", "PrunedCLIPVisionModel", False),
    PrunedClass(PrunedSiglipConfig, "clip_prune.hub.modeling_siglip_pruned", "PrunedSiglipModel", True),
    PrunedClass(PrunedSiglipVisionConfig, "clip_prune.hub.modeling_siglip_pruned", "PrunedSiglipVisionModel", False),
    PrunedClass(PrunedSiglip2Config, "clip_prune.hub.modeling_siglip_pruned", "PrunedSiglip2Model", True),
    PrunedClass(PrunedSiglip2VisionConfig, "clip_prune.hub.modeling_siglip_pruned", "PrunedSiglip2VisionModel",
                False),
)
"""Every family's pruned classes (`clip_prune.towers` holds the same classes, imported; a test checks they agree)."""


def _auto_classes(pruned: PrunedClass) -> tuple[Any, ...]:
    return (AutoModel, AutoModelForZeroShotImageClassification) if pruned.has_text else (AutoModel,)


class _StandIn:
    """Holds a pruned model class's place in the Auto registry until a model is loaded or built.

    transformers reads a registered class's `__name__`, `__module__` and `config_class` (to pick it and to match a
    pipeline's model) and calls `from_pretrained` or `_from_config` on it; the stand-in answers those and
    hands the calls to the real class.
    """

    pruned: PrunedClass

    @classmethod
    def _real(cls) -> type:
        real = cls.pruned.load()
        for auto_class in _auto_classes(cls.pruned):
            auto_class.register(cls.pruned.config_class, real, exist_ok=True)
        return real

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        return cls._real().from_pretrained(*args, **kwargs)

    @classmethod
    def _from_config(cls, *args: Any, **kwargs: Any) -> Any:
        return cls._real()._from_config(*args, **kwargs)


def _stand_in(pruned: PrunedClass) -> type:
    return type(pruned.name, (_StandIn,), {"__module__": pruned.module, "__qualname__": pruned.name,
                                            "pruned": pruned, "config_class": pruned.config_class})


def register_pruned_models() -> None:
    """Register every pruned config, and a stand-in for its model class, with transformers' Auto classes."""
    for pruned in PRUNED_CLASSES:
        AutoConfig.register(pruned.config_class.model_type, pruned.config_class, exist_ok=True)
        stand_in = _stand_in(pruned)
        for auto_class in _auto_classes(pruned):
            auto_class.register(pruned.config_class, stand_in, exist_ok=True)
