"""Image files → RGB, and an up-front check that decodes every sampled file before any model work.

`PIL.Image.verify()` reads only the header: a truncated JPEG passes it and fails later, inside
a DataLoader worker, part-way through the Fisher pass. The check here decodes each file fully
(in threads: Pillow releases the GIL while decoding) and hashes its bytes, so a run can also
tell whether an interrupted run saw the same data.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

PROGRESS_FROM = 2000
"""Checks of at least this many images show a progress bar (COCO-scale samples take a while)."""


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as 8-bit RGB, whatever its mode.

    Pillow's own `convert("RGB")` clips 16/32-bit integer images at 255 (a 16-bit PNG turns
    white) and drops alpha, showing whatever colour transparent pixels happen to hold; here
    integer images are rescaled from their bit depth and transparency is composited on white.
    Palette, CMYK, YCbCr, 1-bit and 8-bit grey images convert as Pillow defines.
    """
    if image.mode.startswith("I"):  # I;16, I;16B, I;16L, I;16N and 32-bit I (16-bit PNGs open as either)
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) <= 65535 else values.max()
        return Image.fromarray(np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if image.mode == "F":  # float images: read as [0, 1] intensities
        values = np.asarray(image, dtype=np.float64)
        return Image.fromarray(np.clip(values * 255.0 + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def read_rgb(path: Path) -> Image.Image:
    """The image file at `path`, fully decoded, as 8-bit RGB."""
    with Image.open(path) as image:
        return to_rgb(image)


@dataclass(frozen=True)
class ImageCheck:
    """What decoding every file found: the readable files' content digests and the unreadable ones."""

    digests: dict[Path, str]
    """sha256 of each readable file's bytes."""
    problems: dict[Path, str]
    """Why each unreadable file failed ('missing' or the decoder's error)."""


def _decode(path: Path) -> tuple[str | None, str | None]:
    """(sha256 of the bytes, None) if `path` decodes fully, else (None, the reason)."""
    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            to_rgb(image)
    except FileNotFoundError:
        return None, "missing"
    except Image.DecompressionBombError as error:  # larger than Pillow will decode (MAX_IMAGE_PIXELS)
        return None, f"too large to decode safely: {error}"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        return None, f"cannot be decoded: {error}"
    return hashlib.sha256(data).hexdigest(), None


def check_image_files(paths: Sequence[Path], workers: int = 1, description: str = "checking images") -> ImageCheck:
    """Decode every file of `paths` (in `workers` threads), returning their digests and problems."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(_decode, paths)
        if len(paths) >= PROGRESS_FROM:
            results = tqdm(results, total=len(paths), desc=description, unit="image", leave=False)
        outcomes = list(results)
    digests = {path: digest for path, (digest, _) in zip(paths, outcomes, strict=True) if digest is not None}
    problems = {path: problem for path, (_, problem) in zip(paths, outcomes, strict=True) if problem is not None}
    return ImageCheck(digests, problems)


def describe_bad_images(problems: dict[Path, str], shown: int = 10) -> str:
    """The unreadable files, one per line (the first `shown`, then a count of the others)."""
    lines = [f"{path} ({problem})" for path, problem in list(problems.items())[:shown]]
    if len(problems) > shown:
        lines.append(f"... and {len(problems) - shown} more")
    return "\n  ".join(lines)
