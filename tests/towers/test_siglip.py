"""The SigLIP and SigLIP2 adapters against transformers' own forward passes and hand-written formulas."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import build_tiny_model, tiny_vision_inputs
from PIL import Image
from transformers import Siglip2ImageProcessor, SiglipModel

from clip_prune.core.deploy.saving import cut_pruned_model
from clip_prune.data.coco import CaptionCollator, text_length_limit
from clip_prune.data.tokenizer import build_word_tokenizer
from clip_prune.towers import FAMILIES, supported_model_types, tower_class, tower_of
from clip_prune.towers.siglip import SiglipTower
from clip_prune.towers.siglip2 import Siglip2Tower


def test_every_family_is_found_by_its_dense_and_pruned_model_types() -> None:
    assert {family.family for family in FAMILIES} == {"clip", "siglip", "siglip2"}
    assert {"siglip", "siglip_vision_model", "siglip2", "siglip2_vision_model"} <= set(supported_model_types())
    for family in (SiglipTower, Siglip2Tower):
        for pruned in family.pruned_classes.values():
            assert tower_class(pruned.config_class()) is family
    assert SiglipTower.pooled_tokens is None and SiglipTower.text_padding == "max_length"
    assert Siglip2Tower.input_names == ("pixel_values", "pixel_attention_mask", "spatial_shapes")


def test_sigmoid_loss_and_logits_match_the_formula_and_transformers() -> None:
    model = build_tiny_model("siglip")
    with torch.no_grad():
        model.logit_scale.fill_(math.log(3.0))
        model.logit_bias.fill_(-1.5)
    tower = tower_of(model)
    generator = torch.Generator().manual_seed(0)
    images, texts = torch.randn(5, 32, generator=generator), torch.randn(5, 32, generator=generator)
    by_hand = 0.0
    logits = tower.logits(images, texts).detach()
    for i in range(5):
        for j in range(5):
            cosine = float(images[i] @ texts[j] / (images[i].norm() * texts[j].norm()))
            logit = 3.0 * cosine - 1.5
            assert float(logits[i, j]) == pytest.approx(logit, abs=1e-5)
            sign = 1.0 if i == j else -1.0
            by_hand -= math.log(1 / (1 + math.exp(-sign * logit)))
    # The paper's normalisation: the sum over all N² pairs divided by the batch size N.
    assert float(tower.loss(images, texts).detach()) == pytest.approx(by_hand / 5, rel=1e-5)

    pixels = tiny_vision_inputs(model, batch=4)["pixel_values"]
    input_ids = torch.randint(4, 17, (4, 16), generator=generator)
    with torch.no_grad():
        output = SiglipModel.forward(model, input_ids=input_ids, pixel_values=pixels, return_loss=True)
        image_embeds = tower.image_embeds({"pixel_values": pixels})
        text_embeds = tower.text_embeds(input_ids, None)
        torch.testing.assert_close(tower.loss(image_embeds, text_embeds), output.loss)
        torch.testing.assert_close(tower.logits(image_embeds, text_embeds), output.logits_per_image)
    assert tower.embed_dim == image_embeds.shape[1] == 32


@pytest.mark.parametrize("family", ["siglip", "siglip2"])
def test_text_embeds_ignore_the_attention_mask_as_siglip_was_trained(family: str) -> None:
    model = build_tiny_model(family)
    input_ids = torch.randint(4, 17, (3, 16), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(input_ids)
    mask[:, 10:] = 0  # what a tokenizer that makes a mask would say of max_length padding
    with torch.no_grad():
        unmasked = model.get_text_features(input_ids=input_ids).pooler_output
        masked = model.get_text_features(input_ids=input_ids, attention_mask=mask).pooler_output
        assert not torch.allclose(masked, unmasked)  # so passing the mask would change the embeddings
        torch.testing.assert_close(tower_of(model).text_embeds(input_ids, mask), unmasked)


def test_captions_fit_the_text_tower_when_the_tokenizer_sets_no_length() -> None:
    tokenizer = build_word_tokenizer(["a", "red", "square"], max_length=16)
    tokenizer.model_max_length = int(1e30)  # as SigLIP2's Gemma tokenizer: no length of its own
    tokenizer.model_input_names = ["input_ids"]  # and no attention mask
    config = build_tiny_model("siglip").config
    limit = text_length_limit(tokenizer, config)
    assert limit == config.text_config.max_position_embeddings < 77
    assert text_length_limit(tokenizer) == 77
    batch = CaptionCollator(tokenizer, limit, "max_length")(
        [{"pixel_values": torch.zeros(3, 4, 4), "index": i, "caption": "a red square"} for i in range(2)])
    assert batch["input_ids"].shape == (2, limit) and "attention_mask" not in batch


@pytest.mark.parametrize("family", ["siglip", "siglip_vision", "siglip2", "siglip2_vision"])
def test_embed_and_layer_mask_are_what_the_encoder_receives(family: str) -> None:
    model = build_tiny_model(family)
    tower = tower_of(model)
    inputs = tiny_vision_inputs(model, batch=3)
    seen = {}

    def record(module, args, kwargs):
        seen["hidden"] = args[0] if args else kwargs["hidden_states"]
        seen["mask"] = args[1] if len(args) > 1 else kwargs.get("attention_mask")

    handle = tower.layers[0].register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            tower.image_embeds(inputs)
    finally:
        handle.remove()
    torch.testing.assert_close(tower.embed(inputs), seen["hidden"], rtol=0, atol=0)
    assert tower.embed(inputs).shape[1] == tower.num_tokens(tower.config)
    expected_mask = tower.layer_attention_mask(inputs)
    assert (seen["mask"] is None) == (expected_mask is None)
    if expected_mask is not None:
        assert torch.equal(seen["mask"], expected_mask)
        assert torch.equal(tower.token_mask(inputs), inputs["pixel_attention_mask"].bool())


@pytest.mark.parametrize("pruned", [False, True], ids=["dense", "pruned"])
def test_siglip2_padding_changes_nothing_for_the_real_patches(pruned: bool) -> None:
    """A processed image padded to the patch budget embeds as the same image with its real patches alone."""
    model = build_tiny_model("siglip2")
    if pruned:
        head_mask, neuron_mask = torch.ones(3, 4), torch.ones(3, 37)
        head_mask[0, 1:], neuron_mask[1, ::2] = 0, 0
        model = cut_pruned_model(model, head_mask, neuron_mask)
    processor = Siglip2ImageProcessor(patch_size=16, max_num_patches=256)
    wide = Image.new("RGB", (70, 20), (200, 40, 40))  # 8 x 28 patches of the 256
    wide.paste((20, 40, 200), (30, 0, 50, 20))
    inputs = dict(processor(images=[wide], return_tensors="pt"))
    real = int(inputs["pixel_attention_mask"].sum())
    assert real < 256 and int(inputs["spatial_shapes"].prod()) == real  # the processor padded the image
    alone = {"pixel_values": inputs["pixel_values"][:, :real], "spatial_shapes": inputs["spatial_shapes"],
             "pixel_attention_mask": inputs["pixel_attention_mask"][:, :real]}
    tower = tower_of(model)
    with torch.no_grad():
        torch.testing.assert_close(tower.image_embeds(inputs), tower.image_embeds(alone), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="not an image size"):
        tower.example_inputs(1, image_size=224)
