"""Deterministic synthetic COCO-captions data set of coloured shapes for the built-in demo."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from clip_prune.files import atomic_directory

_SHAPES = ("circle", "square", "triangle", "star", "cross")
_COLOURS = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 30),
    "green": (40, 170, 50),
    "cyan": (40, 200, 220),
    "blue": (30, 60, 220),
    "purple": (140, 40, 180),
    "pink": (250, 120, 190),
}
_SIZES = {"small": ("small", "little"), "large": ("large", "big")}
_RADIUS = {"small": 0.09, "large": 0.15}  # fraction of the image side
# Grid cell (column, row) of each position: drives both the drawing and "above"/"left of".
_CELLS = {"left": (0, 1), "right": (2, 1), "top": (1, 0), "bottom": (1, 2), "center": (1, 1)}
_PLACES = {
    "left": ("on the left",),
    "right": ("on the right",),
    "top": ("at the top",),
    "bottom": ("at the bottom",),
    "center": ("in the center", "in the middle"),
}
_TONES = {"dark": (60, 90), "light": (170, 210)}  # grey-level range of the background
_TEXTURES = ("plain", "grainy", "striped")
_COUNTS = ("one", "two", "three")
_FILLER = "a an and above below to the of there is are picture with shape shapes on background"
_JPEG = {"quality": 90, "subsampling": 0, "optimize": False}  # fixed settings: byte-deterministic
_SUPERSAMPLE = 4  # draw at 4x and downsample, so small shapes keep smooth edges
_SPLITS = ("train2017", "val2017")


@dataclass(frozen=True)
class _Shape:
    kind: str
    colour: str
    size: str
    position: str


@dataclass(frozen=True)
class _Scene:
    shapes: tuple[_Shape, ...]
    tone: str
    texture: str


def caption_vocabulary() -> list[str]:
    """Return every word the synthetic captions can use, sorted.

    Returns:
        The closed word list of the caption templates (lower case, no punctuation).
    """
    words = set(_FILLER.split()) | set(_SHAPES) | set(_COLOURS) | set(_TONES) | set(_TEXTURES)
    words |= set(_COUNTS) | {w for names in _SIZES.values() for w in names}
    words |= {w for phrases in _PLACES.values() for p in phrases for w in p.split()}
    return sorted(words)


def _sample_scene(rng: np.random.Generator) -> _Scene:
    count = int(rng.integers(1, 4))
    positions = rng.choice(list(_CELLS), size=count, replace=False)
    pairs = [(kind, colour) for kind in _SHAPES for colour in _COLOURS]
    picked = rng.choice(len(pairs), size=count, replace=False)  # distinct (shape, colour) per image
    shapes = tuple(
        _Shape(*pairs[p], size=str(rng.choice(list(_SIZES))), position=str(pos))
        for p, pos in zip(picked, positions, strict=True)
    )
    return _Scene(shapes, tone=str(rng.choice(list(_TONES))), texture=str(rng.choice(_TEXTURES)))


def _polygon(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if kind == "triangle":
        return [(cx, cy - r), (cx - 0.87 * r, cy + 0.5 * r), (cx + 0.87 * r, cy + 0.5 * r)]
    if kind == "star":
        angles = np.pi * (np.arange(10) / 5 - 0.5)
        radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
        return [(cx + a * np.cos(t), cy + a * np.sin(t)) for a, t in zip(radii, angles, strict=True)]
    w = 0.32 * r  # cross: half-width of each arm
    return [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w),
            (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w),
            (cx - r, cy - w), (cx - w, cy - w)]  # fmt: skip


def _draw_scene(scene: _Scene, image_size: int, rng: np.random.Generator) -> Image.Image:
    side = image_size * _SUPERSAMPLE
    grey = int(rng.integers(*_TONES[scene.tone]))
    canvas = Image.new("RGB", (side, side), (grey,) * 3)
    draw = ImageDraw.Draw(canvas)
    if scene.texture == "striped":
        step = side // int(rng.integers(6, 11))
        shade = (grey + 18,) * 3 if scene.tone == "dark" else (grey - 18,) * 3
        for x in range(-side, side, step):  # diagonal stripes
            draw.line([(x, 0), (x + side, side)], fill=shade, width=max(1, step // 3))
    for shape in sorted(scene.shapes, key=lambda s: s.size != "large"):  # small shapes on top
        col, row = _CELLS[shape.position]
        cx, cy = ((np.array([col, row]) * 0.29 + 0.21 + rng.uniform(-0.03, 0.03, 2)) * side).tolist()
        r = _RADIUS[shape.size] * side
        fill = _COLOURS[shape.colour]
        if shape.kind == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif shape.kind == "square":
            draw.rectangle([cx - 0.85 * r, cy - 0.85 * r, cx + 0.85 * r, cy + 0.85 * r], fill=fill)
        else:
            draw.polygon(_polygon(shape.kind, cx, cy, r), fill=fill)
    image = canvas.resize((image_size, image_size), Image.Resampling.BOX)
    if scene.texture == "grainy":
        pixels = np.asarray(image, dtype=np.int16) + rng.integers(-12, 13, (image_size, image_size, 1))
        image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    return image


def synthetic_pixels(count: int, image_size: int, processor: Any, seed: int = 0) -> torch.Tensor:
    """`count` demo scenes drawn at `image_size` px and run through `processor`: [count, 3, S, S] pixel values.

    Identical for a seed, for checks that need some images but no data set (`clip-prune apply`
    without `--data.root`).
    """
    return synthetic_inputs(count, image_size, processor, seed)["pixel_values"]


def synthetic_inputs(count: int, image_size: int, processor: Any, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every model input `processor` makes of `synthetic_pixels`' scenes (SigLIP2's patch mask and grid too)."""
    rng = np.random.default_rng(seed)
    images = [_draw_scene(_sample_scene(rng), image_size, rng) for _ in range(count)]
    processed = processor(images=images, return_tensors="pt")
    names = getattr(processor, "model_input_names", None) or ["pixel_values"]
    return {name: processed[name] for name in names if name in processed}


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _noun(rng: np.random.Generator, shape: _Shape, size: bool, place: bool) -> str:
    words = [str(rng.choice(_SIZES[shape.size]))] if size else []
    text = _article(" ".join([*words, shape.colour, shape.kind]))
    return f"{text} {rng.choice(_PLACES[shape.position])}" if place else text


def _join(parts: list[str]) -> str:
    return " and ".join(parts)


def _relation(a: _Shape, b: _Shape, rng: np.random.Generator) -> str:
    (ax, ay), (bx, by) = _CELLS[a.position], _CELLS[b.position]
    tests = {"above": ay < by, "below": ay > by, "to the left of": ax < bx, "to the right of": ax > bx}
    options = [words for words, holds in tests.items() if holds]
    return str(rng.choice(options))


def _captions(scene: _Scene, rng: np.random.Generator) -> list[str]:
    """Five captions, each from a different template, each with its own shape order."""
    n = len(scene.shapes)

    def order() -> list[_Shape]:
        return [scene.shapes[i] for i in rng.permutation(n)]

    def full() -> str:
        return _join([_noun(rng, s, True, True) for s in order()])

    def picture() -> str:
        return "a picture of " + _join([_noun(rng, s, True, False) for s in order()])

    def background() -> str:
        body = _join([_noun(rng, s, False, True) for s in order()])
        return f"{body} on a {scene.tone} {scene.texture} background"

    def there() -> str:
        verb = "there is" if n == 1 else f"there are {_COUNTS[n - 1]} shapes"
        return f"{verb} " + _join([_noun(rng, s, bool(rng.integers(2)), True) for s in order()])

    def place_first() -> str:
        return _join([f"{rng.choice(_PLACES[s.position])} {_noun(rng, s, True, False)}" for s in order()])

    def relative() -> str:
        shapes = order()
        if n == 1:
            return f"{_noun(rng, shapes[0], True, True)} on a {scene.tone} background"
        head = f"{_noun(rng, shapes[0], False, False)} {_relation(*shapes[:2], rng)} " + _noun(
            rng, shapes[1], False, False
        )
        return _join([head] + [_noun(rng, s, True, True) for s in shapes[2:]])

    def count() -> str:
        noun = "shape" if n == 1 else "shapes"
        return f"{_COUNTS[n - 1]} {noun} with " + _join([_noun(rng, s, False, True) for s in order()])

    templates = [full, picture, background, there, place_first, relative, count]
    return [templates[i]() for i in rng.choice(len(templates), size=5, replace=False)]


def _write_split(
    split_dir: Path, split_index: int, first_id: int, count: int, image_size: int, seed: int
) -> dict[str, object]:
    split_dir.mkdir(parents=True)
    images, annotations = [], []
    for offset in range(count):
        image_id = first_id + offset
        # One generator per image: an image depends only on (seed, split, index), not on the counts.
        rng = np.random.default_rng([seed, split_index, offset])
        scene = _sample_scene(rng)
        file_name = f"{image_id:012d}.jpg"
        _draw_scene(scene, image_size, rng).save(split_dir / file_name, format="JPEG", **_JPEG)
        images.append(
            {"license": 1, "file_name": file_name, "height": image_size, "width": image_size, "id": image_id}
        )
        for k, caption in enumerate(_captions(scene, rng)):
            annotations.append({"image_id": image_id, "id": 5 * image_id + k, "caption": caption})
    return {
        "info": {
            "description": "clip-prune synthetic shapes captions",
            "version": "1.0",
            "year": 2017,
            "contributor": "clip-prune",
            "date_created": "2017/09/01",  # fixed, not today's date: the files must be byte-deterministic
            "seed": seed,
        },
        "licenses": [
            {"id": 1, "name": "CC0 1.0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}
        ],
        "images": images,
        "annotations": annotations,
    }


def _write_zero_shot(folder: Path, per_class: int, image_size: int, seed: int) -> None:
    """An ImageFolder tree `folder/<shape>/<n>.jpg` of single-shape scenes, labelled by the shape."""
    for label, kind in enumerate(_SHAPES):
        (folder / kind).mkdir(parents=True)
        for offset in range(per_class):
            rng = np.random.default_rng([seed, len(_SPLITS), label, offset])
            shape = _Shape(kind, str(rng.choice(list(_COLOURS))), str(rng.choice(list(_SIZES))),
                           str(rng.choice(list(_CELLS))))
            scene = _Scene((shape,), tone=str(rng.choice(list(_TONES))), texture=str(rng.choice(_TEXTURES)))
            _draw_scene(scene, image_size, rng).save(folder / kind / f"{offset:06d}.jpg", format="JPEG", **_JPEG)


def write_synthetic_coco(
    root: str | Path,
    num_train: int = 2000,
    num_val: int = 500,
    image_size: int = 64,
    seed: int = 0,
    overwrite: bool = False,
    zero_shot_per_class: int = 0,
) -> Path:
    """Write a synthetic data set of coloured shapes in the MS-COCO captions layout.

    Each image shows 1-3 shapes (circle, square, triangle, star, cross) in one of eight colours, two
    sizes and five positions, on a dark or light, plain, grainy or striped background, with five
    captions from different templates. The layout is ``root/{train2017,val2017}/<12-digit id>.jpg``
    and ``root/annotations/captions_{train2017,val2017}.json``; image ids are unique across splits.
    Same arguments give byte-identical images and captions. The set is written to a hidden staging folder beside
    ``root`` and renamed into place when complete (`clip_prune.files.atomic_directory`).

    Args:
        root: Folder to create; must not exist or be empty unless ``overwrite``.
        num_train: Number of training images.
        num_val: Number of validation images.
        image_size: Side of the square images, in pixels.
        seed: Seed of the generator; each image depends only on the seed, its split and its index.
        overwrite: Replace an existing non-empty ``root``.
        zero_shot_per_class: Also write ``root/zeroshot/<shape>/`` with this many single-shape
            images per shape kind, for zero-shot classification (0 writes none).

    Returns:
        The path of the written data set.

    Raises:
        FileExistsError: If ``root`` exists, is not an empty folder, and ``overwrite`` is false.
        ValueError: If a count is negative or ``image_size`` is below 16.
    """
    root = Path(root)
    counts = {"num_train": num_train, "num_val": num_val, "zero_shot_per_class": zero_shot_per_class}
    problems = [f"{name}={value} must be >= 0" for name, value in counts.items() if value < 0]
    if image_size < 16:
        problems.append(f"image_size={image_size} must be >= 16 for the shapes to be legible")
    if problems:
        raise ValueError("write_synthetic_coco: " + "; ".join(problems))
    with atomic_directory(root, overwrite) as staging:
        (staging / "annotations").mkdir()
        first_ids = (1, num_train + 1)
        for index, (split, count) in enumerate(zip(_SPLITS, (num_train, num_val), strict=True)):
            coco = _write_split(staging / split, index, first_ids[index], count, image_size, seed)
            with open(staging / "annotations" / f"captions_{split}.json", "w", encoding="utf-8") as file:
                json.dump(coco, file)
        if zero_shot_per_class > 0:
            _write_zero_shot(staging / "zeroshot", zero_shot_per_class, image_size, seed)
    return root
