"""Shared fixtures: tiny checkpoints of every family saved with save_pretrained and tiny COCO-format data sets."""

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
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    PretrainedConfig,
    PreTrainedModel,
    Siglip2Config,
    Siglip2ImageProcessor,
    Siglip2Model,
    Siglip2VisionConfig,
    Siglip2VisionModel,
    SiglipConfig,
    SiglipImageProcessor,
    SiglipModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from clip_prune.core.pruning.latency_table import LatencyTable, neuron_grid, table_key
from clip_prune.data.tokenizer import build_word_tokenizer
from clip_prune.towers import tower_of

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


FAMILIES = ("clip", "clip_vision", "siglip", "siglip_vision", "siglip2")
"""The tiny checkpoints `save_tiny_model` writes: each family, full or vision-only."""

_VISION = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37)
SIGLIP2_PATCHES = 256
"""SigLIP2's patch budget: a 16 × 16 grid of 16-px patches. `Siglip2Processor` passes its class defaults (256
patches of 16 px) over the image processor's own settings, so a saved directory's `AutoProcessor` makes inputs
of another size unless the checkpoint uses these."""


MODEL_CLASSES = {CLIPConfig: CLIPModel, CLIPVisionConfig: CLIPVisionModel, SiglipConfig: SiglipModel,
                 SiglipVisionConfig: SiglipVisionModel, Siglip2Config: Siglip2Model,
                 Siglip2VisionConfig: Siglip2VisionModel}


def save_tiny_clip(path: Path, vision_only: bool = False, seed: int = 0) -> Path:
    """A random tiny CLIP with its word tokenizer and image processor, saved like a Hub checkpoint."""
    return save_tiny_model(path, "clip_vision" if vision_only else "clip", seed)


def build_tiny_model(family: str, seed: int = 0, attn: str = "sdpa", **vision: object) -> PreTrainedModel:
    """A random tiny model of `family` (one of `FAMILIES`) in eval mode; `vision` overrides the vision config.

    CLIP and SigLIP: 30 px images, patch 6 (CLIP T = 26, SigLIP T = 25); SigLIP2: at most 256 patches of 16 px.
    Width 32, 3 layers, 4 heads, 37 neurons; the text tower (2 layers, 16 positions) fits the word tokenizer.
    """
    torch.manual_seed(seed)
    text = dict(vocab_size=len(WORDS) + 4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=37, max_position_embeddings=16, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    siglip = dict(image_size=IMAGE_SIZE, patch_size=6, **_VISION) | vision
    siglip2 = dict(num_patches=SIGLIP2_PATCHES, patch_size=16, **_VISION) | vision
    match family:
        case "clip":
            config = CLIPConfig(text_config={**text, "projection_dim": 24},
                                vision_config=tiny_vision_config(**vision).to_dict(), projection_dim=24)
        case "clip_vision":
            config = tiny_vision_config(**vision)
        case "siglip":  # 64 text positions, as transformers' zero-shot pipeline pads SigLIP captions to 64
            config = SiglipConfig(text_config={**text, "max_position_embeddings": 64}, vision_config=siglip)
        case "siglip_vision":
            config = SiglipVisionConfig(**siglip)
        case "siglip2":
            config = Siglip2Config(text_config={**text, "max_position_embeddings": 64}, vision_config=siglip2)
        case "siglip2_vision":
            config = Siglip2VisionConfig(**siglip2)
        case _:
            raise ValueError(f"unknown tiny family {family!r}; choose one of {FAMILIES}")
    return MODEL_CLASSES[type(config)]._from_config(config, attn_implementation=attn).eval()


def tiny_vision_inputs(model: PreTrainedModel, batch: int = 2, seed: int = 1, image_size: int = IMAGE_SIZE
                       ) -> dict[str, torch.Tensor]:
    """Random inputs of `model`'s vision tower: pixels [B, 3, S, S], or for SigLIP2 patches whose last image
    fills only part of the grid (3 × 5 patches of the 256, the rest padding)."""
    generator = torch.Generator().manual_seed(seed)
    tower = tower_of(model)
    if "spatial_shapes" not in tower.input_names:
        return {"pixel_values": torch.randn(batch, 3, image_size, image_size, generator=generator)}
    config = tower.config
    side = int(config.num_patches ** 0.5)
    pixels = torch.randn(batch, side * side, config.num_channels * config.patch_size ** 2, generator=generator)
    mask = torch.ones(batch, side * side, dtype=torch.int32)
    shapes = torch.tensor([[side, side]] * batch)
    shapes[-1] = torch.tensor([3, 5])
    mask[-1, 15:] = 0
    pixels[-1, 15:] = 0  # as the processor pads
    return {"pixel_values": pixels, "pixel_attention_mask": mask, "spatial_shapes": shapes}


def save_tiny_model(path: Path, family: str, seed: int = 0) -> Path:
    """A random tiny model of `family` (`build_tiny_model`) with its tokenizer and image processor, saved like a
    Hub checkpoint.

    SigLIP's SentencePiece tokenizers cannot be downloaded: every family gets the word tokenizer, saved so that
    `AutoTokenizer.from_pretrained(path)` loads it (SigLIP's text tower pools the last position of captions
    padded to its 16 tokens).
    """
    tokenizer = build_word_tokenizer(WORDS, max_length=16)
    assert (len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id) == (len(WORDS) + 4, 0, 3)
    build_tiny_model(family, seed).save_pretrained(path)
    if not family.endswith("_vision"):  # a vision tower ships without a tokenizer
        tokenizer.save_pretrained(path)
    if family.startswith("clip"):
        processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                       crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    elif family.startswith("siglip2"):
        processor = Siglip2ImageProcessor(patch_size=16, max_num_patches=SIGLIP2_PATCHES)
    else:
        processor = SiglipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor.save_pretrained(path)
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


def pytest_configure(config: pytest.Config) -> None:
    """One torch thread in each pytest-xdist worker: the workers share the cores, and torch's default of one thread
    per core in each of them slows all of them down."""
    if "PYTEST_XDIST_WORKER" in os.environ:
        torch.set_num_threads(1)


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


@pytest.fixture(scope="session", params=FAMILIES)
def tiny_model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny checkpoint of each family in turn (`FAMILIES`); the test's id names it."""
    return save_tiny_model(tmp_path_factory.mktemp(f"tiny-{request.param}"), request.param)


@pytest.fixture(scope="session")
def tiny_coco_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny-coco")
    write_tiny_coco(root, num_images=12, split="train2017")
    return write_tiny_coco(root, num_images=6, seed=1, split="val2017")


def linear_latency_table(config: PretrainedConfig, batch_size: int, device: torch.device | str = "cpu",
                         dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa", warmup: int = 2,
                         repeats: int = 5, mlp_points: int = 16, multiple_of: int = 1) -> LatencyTable:
    """A stand-in for `measure_latency_table` whose seconds grow linearly with the kept widths: the same key and
    grid, no timing, so tests of what uses a table do not depend on the machine's load (a busy 2-core runner can
    time the tower's fixed parts above a tight budget)."""
    heads, neurons = config.num_attention_heads, config.intermediate_size
    head_counts, neuron_counts = list(range(heads + 1)), neuron_grid(neurons, mlp_points, multiple_of)
    attention = [0.0] + [1e-3 * (1 + count) for count in head_counts[1:]]
    mlp = [0.0] + [1e-3 * (0.5 + count / neurons) for count in neuron_counts[1:]]
    empty = 2e-3
    dense = empty + config.num_hidden_layers * (attention[-1] + mlp[-1])
    key = table_key(config, batch_size, torch.device(device), dtype, attn_implementation, multiple_of)
    return LatencyTable(key=key, num_layers=config.num_hidden_layers, head_counts=head_counts, attention_s=attention,
                        neuron_counts=neuron_counts, mlp_s=mlp, dense_s=dense, empty_s=empty)
