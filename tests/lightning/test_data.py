"""`CocoDataModule`'s calibration batches carry what each family's towers take."""

from __future__ import annotations

import json

import torch

from clip_prune.lightning.data import CocoDataModule
from clip_prune.towers import load_model, tower_of


def test_calibration_batches_carry_the_towers_inputs_and_captions_padded_as_the_family_wants(
        tiny_model_dir, tiny_coco_root) -> None:
    data = CocoDataModule(root=str(tiny_coco_root), pretrained=str(tiny_model_dir), num_samples=5, batch_size=3,
                          num_workers=0)
    data.setup("validate")
    batch = next(iter(data.val_dataloader()))
    tower = tower_of(load_model(str(tiny_model_dir)))
    assert set(tower.input_names) <= set(batch) and len(batch["pixel_values"]) == 3
    with torch.no_grad():
        assert tower.image_embeds(tower.vision_inputs(batch)).shape == (3, tower.embed_dim)
    model_type = json.loads((tiny_model_dir / "config.json").read_text())["model_type"]
    if model_type.endswith("_vision_model"):  # saved without a tokenizer: images only
        assert "input_ids" not in batch
    elif tower.text_padding == "max_length":  # SigLIP's text tower pools the last of the tokenizer's 16 positions
        assert batch["input_ids"].shape == (3, 16)
    else:
        assert batch["input_ids"].shape[1] < 16 and (batch["attention_mask"][:, -1] == 1).any()
    sample = data.sample_inputs(2)
    assert sample.keys() == tower.vision_inputs(batch).keys()
    torch.testing.assert_close(sample["pixel_values"], batch["pixel_values"][:2])
