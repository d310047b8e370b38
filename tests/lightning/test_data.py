"""`CocoDataModule`'s calibration batches carry what each family's towers take."""

from __future__ import annotations

import json

import torch

from clip_prune.lightning.data import CocoDataModule, keeps_float32_inputs
from clip_prune.towers import inputs_to, load_model, tower_of


def test_calibration_batches_carry_the_towers_inputs_and_captions_padded_as_the_family_wants(
        tiny_model_dir, tiny_coco_root) -> None:
    data = CocoDataModule(root=str(tiny_coco_root), pretrained=str(tiny_model_dir), num_samples=5, batch_size=3,
                          num_workers=0)
    data.setup("validate")
    batch = next(iter(data.val_dataloader()))
    tower = tower_of(load_model(str(tiny_model_dir)))
    assert set(tower.input_names) <= set(batch) and len(batch["pixel_values"]) == 3
    with torch.no_grad():
        assert tower.image_embeds(inputs_to(tower.vision_inputs(batch), "cpu")).shape == (3, tower.embed_dim)
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


def test_uint8_pixels_unless_a_precision_plugin_would_round_their_normalisation(tiny_clip_dir, tiny_coco_root) -> None:
    """Under `bf16-true` the batch's float tensors are cast to bf16 before the transfer: pixel_mean and pixel_std
    would be rounded, so such runs normalise in the workers (float pixels, as before); the others get uint8."""
    from lightning.pytorch.plugins.precision import DoublePrecision, HalfPrecision, MixedPrecision, Precision

    assert keeps_float32_inputs(Precision()) and keeps_float32_inputs(MixedPrecision("bf16-mixed", "cpu"))
    assert keeps_float32_inputs(DoublePrecision()) and not keeps_float32_inputs(HalfPrecision("bf16-true"))
    data = CocoDataModule(root=str(tiny_coco_root), pretrained=str(tiny_clip_dir), num_samples=4, batch_size=2,
                          num_workers=0)
    data.setup("validate")

    class Trainer:
        world_size, global_rank = 1, 0
        strategy = type("Strategy", (), {"root_device": torch.device("cpu")})()

    for plugin, dtype in ((Precision(), torch.uint8), (HalfPrecision("bf16-true"), torch.float32)):
        trainer = Trainer()
        trainer.precision_plugin = plugin
        data.trainer = trainer
        batch = next(iter(data.val_dataloader()))
        assert batch["pixel_values"].dtype == dtype and ("pixel_mean" in batch) == (dtype == torch.uint8)
