"""Contrastive training of a small CLIP (`clip_prune.lightning.training`) and the shipped demo checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoTokenizer, CLIPConfig, CLIPModel

from clip_prune.core.run.metrics import retrieval_recall
from clip_prune.data.coco import read_coco_captions
from clip_prune.data.synthetic import write_synthetic_coco
from clip_prune.lightning.cli import ClipPruneCLI, main, run_cli
from clip_prune.lightning.training import (
    CocoTrainingDataModule,
    ContrastiveTrainingModule,
    build_clip,
    write_demo_init,
)

REPO = Path(__file__).parents[2]
DEMO_INIT, DEMO_TRAINED = REPO / "demo" / "clip-tiny-init", REPO / "demo" / "clip-tiny-synthetic"
TRAIN_CONFIG = REPO / "configs" / "demo_train.yaml"
# Odd sizes on purpose (STYLE.md "Tests"): 32 px, patch 8 (T = 17), D = 24, H = 2, F = 37.
TINY_VISION = dict(image_size=32, patch_size=8, hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
                   intermediate_size=37)
TINY_TEXT = dict(hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37)


@pytest.fixture(scope="module")
def tiny_init(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_init(tmp_path_factory.mktemp("init"), vision=TINY_VISION, text=TINY_TEXT, projection_dim=16)


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_coco(tmp_path_factory.mktemp("shapes"), num_train=16, num_val=4, image_size=32)


def _config_fields(config: CLIPConfig) -> dict[str, object]:
    """The architecture: every config field except bookkeeping that save_pretrained may add."""
    volatile = {"transformers_version", "_name_or_path", "dtype", "torch_dtype", "architectures"}
    fields = {k: v for k, v in config.to_dict().items() if k not in volatile}
    for tower in ("vision_config", "text_config"):
        fields[tower] = {k: v for k, v in fields[tower].items() if k not in volatile}
    return fields


def test_write_demo_init_has_no_weights_and_builds_from_scratch(tiny_init: Path) -> None:
    assert not list(tiny_init.glob("*.safetensors")) and not list(tiny_init.glob("*.bin"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_init)
    model = build_clip(str(tiny_init))
    config = model.config
    assert config.text_config.vocab_size == len(tokenizer)
    assert (config.text_config.eos_token_id, config.text_config.pad_token_id) == (3, 0)
    assert config.vision_config.hidden_size == 24 and config.projection_dim == 16
    batch = tokenizer(["a red circle on the left", "two shapes"], padding=True, return_tensors="pt")
    assert int(batch["input_ids"][0, 0]) == tokenizer.bos_token_id and tokenizer.unk_token_id not in batch["input_ids"]
    assert AutoImageProcessor.from_pretrained(tiny_init).crop_size == {"height": 32, "width": 32}


def test_loss_decreases_on_a_fixed_batch(tiny_init: Path, shapes_root: Path) -> None:
    torch.manual_seed(0)
    module = ContrastiveTrainingModule(str(tiny_init), save_dir="unused", learning_rate=3e-3, warmup_steps=1)
    data = CocoTrainingDataModule(str(shapes_root), str(tiny_init), batch_size=8)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch["pixel_values"].shape == (8, 3, 32, 32)
    optimizer = torch.optim.AdamW(module.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        loss = module._loss(batch)[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


def test_fit_saves_a_trained_model(tiny_init: Path, shapes_root: Path, tmp_path: Path) -> None:
    saved = tmp_path / "trained"
    main(["fit", "--config", str(TRAIN_CONFIG), "--model.pretrained", str(tiny_init),  # the demo training classes
          "--model.save_dir", str(saved), "--model.warmup_steps", "1", "--data.root", str(shapes_root),
          "--data.batch_size", "8", "--trainer.max_steps", "2", "--trainer.check_val_every_n_epoch", "1",
          "--trainer.log_every_n_steps", "1", "--trainer.default_root_dir", str(tmp_path)])
    # seed_everything(0) before the model is built: the same seed rebuilds the untrained weights.
    torch.manual_seed(0)
    untrained = build_clip(str(tiny_init)).state_dict()
    trained = load_file(saved / "model.safetensors")
    assert set(trained) <= set(untrained) and all(v.isfinite().all() for v in trained.values())
    changed = [name for name, value in trained.items() if not torch.equal(value, untrained[name])]
    assert "vision_model.encoder.layers.0.mlp.fc1.weight" in changed and "text_projection.weight" in changed
    assert _config_fields(CLIPModel.from_pretrained(saved).config) == _config_fields(
        CLIPConfig.from_pretrained(tiny_init)
    )
    assert AutoTokenizer.from_pretrained(saved).get_vocab() == AutoTokenizer.from_pretrained(tiny_init).get_vocab()
    assert AutoImageProcessor.from_pretrained(saved).crop_size == {"height": 32, "width": 32}


class _Parsed(Exception):
    def __init__(self, cli: ClipPruneCLI) -> None:
        self.cli = cli


class _ParseOnly(ClipPruneCLI):
    """Stops before training, with the instantiated classes (LightningCLI's `before_fit` hook)."""

    def before_fit(self) -> None:
        raise _Parsed(self)


def test_demo_train_config_parses_and_links_the_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # the YAML's paths are relative to the repository root
    with pytest.raises(_Parsed) as parsed:
        run_cli(["fit", "--config", str(TRAIN_CONFIG), "--trainer.default_root_dir", str(tmp_path)],
                cli_class=_ParseOnly)
    cli = parsed.value.cli
    assert isinstance(cli.model, ContrastiveTrainingModule) and isinstance(cli.datamodule, CocoTrainingDataModule)
    assert cli.datamodule.hparams.pretrained == cli.model.hparams.pretrained == "demo/clip-tiny-init"
    assert cli.model.hparams.save_dir == "outputs/clip-tiny-synthetic"  # never over the shipped checkpoint


def test_demo_init_is_what_write_demo_init_writes(tmp_path: Path) -> None:
    written = write_demo_init(tmp_path / "init")
    assert _config_fields(CLIPConfig.from_pretrained(written)) == _config_fields(CLIPConfig.from_pretrained(DEMO_INIT))
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        assert json.loads((written / name).read_text()) == json.loads((DEMO_INIT / name).read_text()), name


def test_shipped_demo_model_matches_its_init_and_retrieves(tmp_path: Path) -> None:
    model = CLIPModel.from_pretrained(DEMO_TRAINED).eval()
    assert _config_fields(model.config) == _config_fields(CLIPConfig.from_pretrained(DEMO_INIT))
    assert (DEMO_TRAINED / "model.safetensors").stat().st_size < 6_000_000
    tokenizer, processor = AutoTokenizer.from_pretrained(DEMO_TRAINED), AutoImageProcessor.from_pretrained(DEMO_TRAINED)
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(DEMO_INIT).get_vocab()
    # Fresh images of the demo distribution (seed 7, not the training seed): far above chance (5% at R@1).
    root = write_synthetic_coco(tmp_path / "shapes", num_train=0, num_val=20, seed=7)
    images = read_coco_captions(root, "val2017", "annotations/captions_val2017.json")
    captions = [caption for image in images for caption in image.captions]
    with torch.inference_mode():
        pixels = processor(images=[Image.open(image.path).convert("RGB") for image in images], return_tensors="pt")
        image_embeds = model.get_image_features(pixel_values=pixels["pixel_values"]).pooler_output
        text_embeds = model.get_text_features(**tokenizer(captions, padding=True, return_tensors="pt")).pooler_output
    recall = retrieval_recall(image_embeds, text_embeds, torch.arange(len(images)).repeat_interleave(5))
    assert recall["i2t_R@1"] >= 75 and recall["t2i_R@1"] >= 75, recall  # measured 95 and 94
