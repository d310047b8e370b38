"""Shared fixtures: tiny CLIP checkpoints saved with save_pretrained and tiny COCO-format data sets."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPVisionConfig, CLIPVisionModel

from clip_prune.data.tokenizer import build_word_tokenizer

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}
SHAPES = ("square", "circle")
WORDS = ["a", "small", "large", *COLOURS, *SHAPES, "on", "the", "left", "right"]
IMAGE_SIZE = 30


def tiny_vision_config(**overrides: object) -> CLIPVisionConfig:
    """Odd sizes on purpose: 30 px images, patch 6 (T = 26), width 32, 4 heads, 37 neurons."""
    values = dict(image_size=IMAGE_SIZE, patch_size=6, hidden_size=32, num_hidden_layers=3,
                  num_attention_heads=4, intermediate_size=37, projection_dim=24)
    values.update(overrides)
    return CLIPVisionConfig(**values)


def save_tiny_clip(path: Path, vision_only: bool = False, seed: int = 0) -> Path:
    """A random tiny CLIP with its word tokenizer and image processor, saved like a Hub checkpoint."""
    torch.manual_seed(seed)
    tokenizer = build_word_tokenizer(WORDS, max_length=16)
    vision = tiny_vision_config()
    if vision_only:
        model = CLIPVisionModel(vision)
    else:
        text = dict(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=37, max_position_embeddings=16, projection_dim=24,
                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                    bos_token_id=tokenizer.bos_token_id)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision.to_dict(), projection_dim=24))
    model.save_pretrained(path)
    if not vision_only:  # a vision tower ships without a tokenizer
        tokenizer.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                       crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(path)
    return path


def write_tiny_coco(root: Path, num_images: int = 12, seed: int = 0, split: str = "train2017") -> Path:
    """A COCO-captions split of PIL-drawn shapes, two captions per image."""
    rng = random.Random(seed)
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        colour, shape, size = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(["small", "large"])
        side = "left" if rng.random() < 0.5 else "right"
        image = Image.new("RGB", (40, 40), (245, 245, 245))
        extent = 8 if size == "small" else 16
        x0 = 2 if side == "left" else 38 - extent
        box = (x0, 12, x0 + extent, 12 + extent)
        draw = ImageDraw.Draw(image)
        (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=COLOURS[colour])
        name = f"{image_id:012d}.jpg"
        image.save(root / split / name, quality=90)
        images.append({"id": image_id, "file_name": name, "width": 40, "height": 40})
        for caption in (f"a {size} {colour} {shape} on the {side}", f"{colour} {shape} on the {side}"):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "caption": caption})
    captions = {"info": {}, "licenses": [], "images": images, "annotations": annotations}
    (root / "annotations" / f"captions_{split}.json").write_text(json.dumps(captions))
    return root


def run_cli_subprocess(args: list[str], cwd: Path) -> None:
    """`python -m clip_prune ARGS` in a fresh process (DDP launches need their own), failing with its stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "clip_prune", *args], capture_output=True, text=True,
                            timeout=300, cwd=cwd, env=env)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(autouse=True)
def _raise_user_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    """`main` raises user errors instead of exiting with status 2, so tests can match their type and message."""
    monkeypatch.setenv("CLIP_PRUNE_DEBUG", "1")


@pytest.fixture(autouse=True)
def _run_in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Lightning writes lightning_logs/ into the working directory: keep it out of the checkout."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="session")
def tiny_vision_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip-vision"), vision_only=True)


@pytest.fixture(scope="session")
def tiny_coco_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny-coco")
    write_tiny_coco(root, num_images=12, split="train2017")
    return write_tiny_coco(root, num_images=6, seed=1, split="val2017")
