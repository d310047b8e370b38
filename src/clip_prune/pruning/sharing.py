"""What a saved pruned directory needs to load anywhere: its own modeling code, `auto_map`, and the processor.

transformers loads a model whose config names code in `auto_map` from the directory itself when
asked with `trust_remote_code=True` (the "custom models" mechanism of the Hub), so a pruned
directory carries `clip_prune/hub`'s two files, copied verbatim, and loads without clip-prune.
Where clip-prune is imported its registered classes win, and no remote code is needed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from transformers import AutoImageProcessor, AutoTokenizer, CLIPProcessor

from clip_prune.hub import (
    PrunedCLIPConfig,
    PrunedCLIPModel,
    PrunedCLIPVisionConfig,
    PrunedCLIPVisionModel,
    configuration_clip_pruned,
    modeling_clip_pruned,
)

REMOTE_CODE_MODULES = (configuration_clip_pruned, modeling_clip_pruned)
"""Modules copied into every saved directory; they import nothing from clip_prune."""


def auto_map(model: PrunedCLIPModel | PrunedCLIPVisionModel) -> dict[str, str]:
    """config.json's `auto_map`: which class of the copied files each transformers auto class loads."""
    configuration, modeling = (module.__name__.rpartition(".")[2] for module in REMOTE_CODE_MODULES)
    if isinstance(model, PrunedCLIPModel):
        classes = {"AutoConfig": PrunedCLIPConfig, "AutoModel": PrunedCLIPModel,
                   # what pipeline("zero-shot-image-classification") loads, as for a dense CLIPModel
                   "AutoModelForZeroShotImageClassification": PrunedCLIPModel}
    else:
        classes = {"AutoConfig": PrunedCLIPVisionConfig, "AutoModel": PrunedCLIPVisionModel}
    return {auto: f"{configuration if auto == 'AutoConfig' else modeling}.{cls.__name__}"
            for auto, cls in classes.items()}


def write_remote_code(directory: Path, model: PrunedCLIPModel | PrunedCLIPVisionModel) -> None:
    """Copy the modeling and configuration files into `directory` and name them in its config.json."""
    for module in REMOTE_CODE_MODULES:
        shutil.copyfile(module.__file__, directory / Path(module.__file__).name)
    config_file = directory / "config.json"
    config = json.loads(config_file.read_text())
    config["auto_map"] = auto_map(model)
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def read_processor(pretrained: str) -> Any:
    """The checkpoint's image processor, combined with its tokenizer into a CLIPProcessor when it has one.

    Saved as one processor, `AutoProcessor.from_pretrained(DIR)` returns it whole; saved apart, it
    returned the tokenizer alone, which gives no `pixel_values`.
    """
    image_processor = AutoImageProcessor.from_pretrained(pretrained)
    try:
        tokenizer = AutoTokenizer.from_pretrained(pretrained)
    except (OSError, ValueError):
        return image_processor  # a vision-only checkpoint has no tokenizer
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
