"""Image files to CLIP pixels near the JPEG decode limit: DCT-domain downscaling, then the processor's own steps.

Calling a transformers image processor on one image costs more than decoding it (about 3 ms of
argument handling per call on a 640×480 JPEG, against 2.4 ms to decode it). `PixelLoader` calls
the processor's resize, crop and normalisation directly, and asks libjpeg to decode a JPEG at
1/2, 1/4 or 1/8 scale (`PIL.Image.draft`) when the processor's resize target is that much smaller:
the decoder then skips most of the inverse DCT work, and the resize that follows shrinks by less
than 2×. Processors it does not know step by step (the PIL backend, padding, SigLIP2's patchifying processor,
whose outputs include more than `pixel_values`) are called as usual.

With `uint8=True` (the DataLoader datasets, `clip_prune.data.coco.ImageItems`) the direct path stops
before the float work: an item is the resized, cropped uint8 image [3, S, S] with the processor's
rescale and normalisation as `pixel_mean` and `pixel_std` ([3] float32, in grey levels: mean and
std over the rescale factor, as the processor fuses them). The batch stays uint8 (a quarter of the
bytes) through collation, pinning and the copy to the device, where `clip_prune.towers.inputs_to`
normalises it once per batch (`normalize_pixels`): the same float pixels as the processor's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_backends import TorchvisionBackend
from transformers.image_utils import SizeDict

from clip_prune.data.images import to_rgb


class PixelLoader:
    """One image file as CLIP pixels [3, S, S], equal to `image_processor(images=rgb_image)` up to the draft.

    Without the draft the result equals the processor's exactly; with it (a JPEG at least twice the
    resize target) the decoder's DCT downscaling replaces part of the antialiased resize, which
    changes pixels by 0.005-0.02 on average in normalised units (one grey level is 0.015; up to 0.3-0.5
    at sharp edges): the difference between two good downsampling filters.

    Args:
        image_processor: the checkpoint's image processor (`AutoImageProcessor.from_pretrained`).
        jpeg_draft: decode JPEGs at a reduced scale when the resize target allows it.
        uint8: on the direct path, give `inputs` as uint8 pixels with `pixel_mean` and `pixel_std` to be
            normalised per batch on the device (`clip_prune.towers.inputs_to`); elsewhere, and for processors
            that do not both rescale and normalise, the float pixels as usual.
    """

    def __init__(self, image_processor: Any, jpeg_draft: bool = True, uint8: bool = False) -> None:
        self.processor = image_processor
        self.jpeg_draft = jpeg_draft
        self.input_names = tuple(getattr(image_processor, "model_input_names", None) or ("pixel_values",))
        self.resizes_to_size = self.input_names == ("pixel_values",)  # SigLIP2's resize follows its patch budget
        self.direct = (isinstance(image_processor, TorchvisionBackend) and not getattr(image_processor, "do_pad", False)
                       and self.resizes_to_size)
        self.uint8 = uint8
        self.pixel_mean, self.pixel_std = self._fused_mean_std() if self.direct else (None, None)

    def _fused_mean_std(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The processor's mean and std in grey levels, float32 [3], computed as its fused rescale-and-normalise
        does (so the normalised pixels are bit for bit its own); (None, None) unless it both rescales and normalises."""
        processor = self.processor
        if not (processor.do_rescale and processor.do_normalize):
            return None, None
        scale = 1.0 / processor.rescale_factor
        mean = torch.tensor(processor.image_mean, dtype=torch.float32).expand(3) * scale
        std = torch.tensor(processor.image_std, dtype=torch.float32).expand(3) * scale
        return mean, std

    @property
    def gives_uint8(self) -> bool:
        """Whether `inputs` gives uint8 pixels with `pixel_mean` and `pixel_std` (the direct path, `uint8=True`)."""
        return self.uint8 and self.pixel_mean is not None

    def __call__(self, path: str | Path) -> torch.Tensor:
        """The image's pixel values (for SigLIP2 its patches [N, C·p·p]; uint8 with `uint8=True` on the direct path)."""
        return self.inputs(path)["pixel_values"]

    def inputs(self, path: str | Path) -> dict[str, torch.Tensor]:
        """Every model input the processor makes of one image (for SigLIP2 also its patch mask and grid), unbatched;
        with `gives_uint8` the uint8 pixels, `pixel_mean` and `pixel_std` instead."""
        with Image.open(path) as image:
            target = self.resize_target(image.size) if self.resizes_to_size else None
            if self.jpeg_draft and image.format == "JPEG" and target is not None:
                image.draft("RGB", target)  # keeps at least `target`: the resize below only shrinks
            image.load()  # decoding first, then converting only when needed, saves a copy (1.3 ms at 320x240)
            rgb = image if image.mode == "RGB" else to_rgb(image)
            if not self.direct:
                processed = self.processor(images=rgb, return_tensors="pt")
                return {name: processed[name][0] for name in self.input_names if name in processed}
            pixels = torch.from_numpy(np.array(rgb)).permute(2, 0, 1)
        if self.gives_uint8:
            return {"pixel_values": self.resize_and_crop(pixels, target), "pixel_mean": self.pixel_mean,
                    "pixel_std": self.pixel_std}
        return {"pixel_values": self.process(pixels, target)}

    def resize_and_crop(self, pixels: torch.Tensor, target: tuple[int, int] | None) -> torch.Tensor:
        """Resize [3, h, w] uint8 to `target` (width, height; None: the processor's size) and crop: still uint8.

        The target comes from the full image size: computed again on a drafted image, the rounding
        of its aspect ratio could move the crop by a pixel.
        """
        processor = self.processor
        if processor.do_resize:
            size = processor.size if target is None else SizeDict(width=target[0], height=target[1])
            pixels = processor.resize(pixels, size=size, resample=processor.resample)
        if processor.do_center_crop:
            pixels = processor.center_crop(pixels, processor.crop_size)
        return pixels

    def process(self, pixels: torch.Tensor, target: tuple[int, int] | None) -> torch.Tensor:
        """Resize to `target` (as `resize_and_crop`), crop, rescale and normalise [3, h, w] uint8."""
        processor = self.processor
        pixels = self.resize_and_crop(pixels, target)
        return processor.rescale_and_normalize(pixels, processor.do_rescale, processor.rescale_factor,
                                               processor.do_normalize, processor.image_mean, processor.image_std)

    def resize_target(self, image_size: tuple[int, int]) -> tuple[int, int] | None:
        """The processor's resize output (width, height) for an image of `image_size`; None where it is not plain.

        Shortest-edge sizes round the long side down, as `transformers.image_transforms.get_resize_output_image_size`.
        """
        processor = self.processor
        if not getattr(processor, "do_resize", False):
            return None
        size = processor.size  # a transformers SizeDict, or a plain dict in older processors
        width, height = image_size
        if size.get("shortest_edge") and not size.get("longest_edge"):
            short = size["shortest_edge"]
            if width <= height:
                return short, int(short * height / width)
            return int(short * width / height), short
        if size.get("height") and size.get("width"):
            return size["width"], size["height"]
        return None
