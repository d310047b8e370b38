"""What a saved pruned directory needs to load anywhere: its own modeling code, `auto_map`, and the processor.

transformers loads a model whose config names code in `auto_map` from the directory itself when
asked with `trust_remote_code=True` (the "custom models" mechanism of the Hub), so a pruned
directory carries its family's two files from `clip_prune/hub` and the `pruned_layers.py` they share, copied
verbatim, and loads without clip-prune.
Where clip-prune is imported its registered classes win, and no remote code is needed.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, PreTrainedModel

from clip_prune.hub import pruned_layers
from clip_prune.towers import tower_class, tower_of


def remote_code_modules(model: PreTrainedModel) -> list[ModuleType]:
    """The configuration and modeling modules of `model`'s pruned class, and the layers they share (imported
    relatively): they import nothing from clip_prune."""
    return [sys.modules[type(model).config_class.__module__], sys.modules[type(model).__module__], pruned_layers]


def auto_map(model: PreTrainedModel) -> dict[str, str]:
    """config.json's `auto_map`: which class of the copied files each transformers auto class loads."""
    configuration, modeling = (module.__name__.rpartition(".")[2] for module in remote_code_modules(model)[:2])
    classes = {"AutoConfig": f"{configuration}.{type(model).config_class.__name__}",
               "AutoModel": f"{modeling}.{type(model).__name__}"}
    if tower_of(model).has_text:  # what pipeline("zero-shot-image-classification") loads, as for the dense model
        classes["AutoModelForZeroShotImageClassification"] = classes["AutoModel"]
    return classes


def write_remote_code(directory: Path, model: PreTrainedModel) -> None:
    """Copy the modeling and configuration files into `directory` and name them in its config.json."""
    for module in remote_code_modules(model):
        shutil.copyfile(module.__file__, directory / Path(module.__file__).name)
    config_file = directory / "config.json"
    config = json.loads(config_file.read_text())
    config["auto_map"] = auto_map(model)
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def read_processor(pretrained: str) -> Any:
    """The checkpoint's image processor, combined with its tokenizer into the family's processor when it has one.

    Saved as one processor, `AutoProcessor.from_pretrained(DIR)` returns it whole; saved apart, it
    returned the tokenizer alone, which gives no `pixel_values`.
    """
    image_processor = AutoImageProcessor.from_pretrained(pretrained)
    try:
        tokenizer = AutoTokenizer.from_pretrained(pretrained)
    except (OSError, ValueError):
        return image_processor  # a vision-only checkpoint has no tokenizer
    processor_class = tower_class(AutoConfig.from_pretrained(pretrained)).processor_class
    return processor_class(image_processor=image_processor, tokenizer=tokenizer)
