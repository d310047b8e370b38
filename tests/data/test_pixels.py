"""The fast image path against the image processors of transformers (torchvision and PIL backends)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, JpegImagePlugin
from transformers import AutoImageProcessor, Siglip2ImageProcessor, SiglipImageProcessor

from clip_prune.data.coco import CaptionCollator, ImageItems
from clip_prune.data.pixels import PixelLoader
from clip_prune.data.tokenizer import build_word_tokenizer
from clip_prune.towers import inputs_to, normalize_pixels


def _processors(model_dir):
    return (AutoImageProcessor.from_pretrained(model_dir),
            AutoImageProcessor.from_pretrained(model_dir, backend="pil"))


def _reference(processor, path) -> torch.Tensor:
    with Image.open(path) as image:
        return processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"][0]


def test_tiny_data_equals_both_processor_backends(tiny_clip_dir, tiny_coco_root) -> None:
    fast, slow = _processors(tiny_clip_dir)
    paths = sorted((tiny_coco_root / "train2017").glob("*.jpg"))
    items = ImageItems([(path, None) for path in paths], "label", fast)
    assert items.load.direct and not PixelLoader(slow).direct
    for index, path in enumerate(paths):
        item = items[index]
        assert item["pixel_values"].shape == (3, 30, 30) and item["pixel_values"].dtype == torch.uint8
        pixels = normalize_pixels({name: item[name][None] for name in ("pixel_values", "pixel_mean", "pixel_std")})
        assert pixels.keys() == {"pixel_values"}
        pixels = pixels["pixel_values"][0]
        assert pixels.dtype == torch.float32
        torch.testing.assert_close(pixels, PixelLoader(fast)(path), rtol=0, atol=0)
        torch.testing.assert_close(pixels, _reference(fast, path), rtol=0, atol=1e-6)
        # The PIL backend resizes in PIL's uint8 arithmetic: at most two grey levels apart (2/255/std <= 0.031).
        slow_pixels = _reference(slow, path)
        torch.testing.assert_close(pixels, slow_pixels, rtol=0, atol=0.031)
        assert (pixels - slow_pixels).abs().mean() < 0.002
        torch.testing.assert_close(PixelLoader(slow)(path), _reference(slow, path), rtol=0, atol=0)


def _photo(size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(0)
    width, height = size
    ramp = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    base = ramp * np.array([1.0, 0.6, 0.3], dtype=np.float32) + rng.normal(0, 8, (height, width, 3))
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    ImageDraw.Draw(image).ellipse((width // 4, height // 4, width // 2, height // 2), fill=(20, 200, 90))
    return image


@pytest.mark.parametrize("size", [(240, 180), (170, 250)])
def test_large_jpeg_is_drafted_and_stays_close(size, tiny_clip_dir, tmp_path, monkeypatch) -> None:
    fast, _ = _processors(tiny_clip_dir)
    _photo(size).save(tmp_path / "photo.jpg", quality=90)
    _photo(size).save(tmp_path / "photo.png")
    drafted = []
    real_draft = JpegImagePlugin.JpegImageFile.draft

    def spy(image, mode, requested):
        result = real_draft(image, mode, requested)
        drafted.append((image.format, requested, image.size))
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    loader = PixelLoader(fast)
    pixels = loader(tmp_path / "photo.jpg")
    # The processor's resize target (short side 30 px, long side rounded down) is requested from the
    # decoder, which hands over at least that, here at 1/4 scale.
    short, long = sorted(size)
    assert [(fmt, tuple(sorted(requested))) for fmt, requested, _ in drafted] == [("JPEG", (30, 30 * long // short))]
    assert drafted[0][2] == tuple(-(-side // 4) for side in size)
    reference = _reference(fast, tmp_path / "photo.jpg")
    difference = (pixels - reference).abs()
    assert pixels.shape == reference.shape == (3, 30, 30)
    # DCT-domain downscaling is another good low-pass filter: about one grey level (0.015) on average.
    assert difference.mean() < 0.03 and difference.flatten().quantile(0.99) < 0.25
    # A PNG is never drafted: the same pixels as the processor, exactly.
    torch.testing.assert_close(loader(tmp_path / "photo.png"), _reference(fast, tmp_path / "photo.png"),
                               rtol=0, atol=1e-6)
    assert len(drafted) == 1


def test_draft_can_be_turned_off(tiny_clip_dir, tmp_path) -> None:
    fast, _ = _processors(tiny_clip_dir)
    _photo((240, 180)).save(tmp_path / "photo.jpg", quality=90)
    exact = PixelLoader(fast, jpeg_draft=False)(tmp_path / "photo.jpg")
    torch.testing.assert_close(exact, _reference(fast, tmp_path / "photo.jpg"), rtol=0, atol=1e-6)


def test_siglip_pixels_are_resized_to_the_square_without_a_crop(tmp_path) -> None:
    """SigLIP's processor squashes the whole image to its size (no crop): the fast path does the same."""
    processor = SiglipImageProcessor(size={"height": 30, "width": 30})
    _photo((48, 30)).save(tmp_path / "wide.png")
    loader = PixelLoader(processor)
    assert loader.direct and loader.resize_target((48, 30)) == (30, 30)
    torch.testing.assert_close(loader(tmp_path / "wide.png"), _reference(processor, tmp_path / "wide.png"),
                               rtol=0, atol=1e-6)


def test_siglip2_items_carry_the_processors_patches_mask_and_grid_and_stack(tmp_path) -> None:
    processor = Siglip2ImageProcessor(patch_size=8, max_num_patches=16)
    _photo((48, 24)).save(tmp_path / "wide.jpg", quality=90)
    _photo((32, 32)).save(tmp_path / "square.png")
    items = ImageItems([(tmp_path / "wide.jpg", "a wide one"), (tmp_path / "square.png", "a square one")], "caption",
                       processor)
    assert not items.load.direct
    for index, name in enumerate(("wide.jpg", "square.png")):
        with Image.open(tmp_path / name) as image:
            expected = processor(images=image.convert("RGB"), return_tensors="pt")
        item = items[index]
        assert set(item) == {"pixel_values", "pixel_attention_mask", "spatial_shapes", "index", "caption"}
        for key in ("pixel_values", "pixel_attention_mask", "spatial_shapes"):
            torch.testing.assert_close(item[key], expected[key][0], rtol=0, atol=0)
    assert items[0]["pixel_attention_mask"].sum() < 16 == items[1]["pixel_attention_mask"].sum()
    batch = CaptionCollator(build_word_tokenizer(["a", "wide", "square", "one"], 8), 8, padding="max_length")(
        [items[0], items[1]])
    assert batch["pixel_values"].shape == (2, 16, 3 * 8 * 8) and batch["spatial_shapes"].shape == (2, 2)
    assert batch["pixel_attention_mask"].shape == (2, 16) and batch["input_ids"].shape == (2, 8)


@pytest.mark.parametrize("size", [(240, 180), (32, 32)])
def test_uint8_batches_normalised_on_the_device_equal_the_float_pixels(size, tiny_clip_dir, tmp_path) -> None:
    """The workers' uint8 pixels, collated and normalised by `inputs_to`, are the float path's pixels (drafted too)."""
    fast, _ = _processors(tiny_clip_dir)
    paths = []
    for index, name in enumerate(("a.jpg", "b.png", "c.jpg")):
        _photo((size[0] + index, size[1])).save(tmp_path / name, quality=90)
        paths.append(tmp_path / name)
    items = ImageItems([(path, "a caption") for path in paths], "caption", fast)
    batch = CaptionCollator(None, 0)([items[index] for index in range(len(paths))])
    assert batch["pixel_values"].dtype == torch.uint8
    assert batch["pixel_mean"].shape == batch["pixel_std"].shape == (3, 3)
    expected = torch.stack([PixelLoader(fast)(path) for path in paths])
    inputs = inputs_to({name: batch[name] for name in ("pixel_values", "pixel_mean", "pixel_std")}, "cpu")
    assert inputs.keys() == {"pixel_values"}
    torch.testing.assert_close(inputs["pixel_values"], expected, rtol=0, atol=0)
    halves = inputs_to({name: batch[name] for name in ("pixel_values", "pixel_mean", "pixel_std")}, "cpu",
                       torch.bfloat16)
    torch.testing.assert_close(halves["pixel_values"], expected.to(torch.bfloat16), rtol=0, atol=0)


def test_float_pixels_pass_through_and_uint8_pixels_need_their_normalisation() -> None:
    pixels = torch.randn(2, 3, 4, 4)
    assert normalize_pixels({"pixel_values": pixels})["pixel_values"] is pixels
    assert torch.equal(inputs_to({"pixel_values": pixels}, "cpu", torch.float64)["pixel_values"], pixels.double())
    with pytest.raises(ValueError, match="pixel_mean and pixel_std"):
        normalize_pixels({"pixel_values": torch.zeros(2, 3, 4, 4, dtype=torch.uint8)})


def test_processors_that_do_not_rescale_and_normalise_keep_float_items(tiny_clip_dir, tmp_path) -> None:
    fast = AutoImageProcessor.from_pretrained(tiny_clip_dir, do_normalize=False)
    _photo((40, 32)).save(tmp_path / "photo.png")
    item = ImageItems([(tmp_path / "photo.png", 0)], "label", fast)[0]
    assert item["pixel_values"].dtype == torch.float32 and "pixel_mean" not in item
    torch.testing.assert_close(item["pixel_values"], _reference(fast, tmp_path / "photo.png"), rtol=0, atol=1e-6)
