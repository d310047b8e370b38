"""`clip_prune.prune`, the Python entry point: the CLI's loop on batches in memory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import CLIPModel

import clip_prune
from clip_prune.core.pruning.options import PruningOptions
from clip_prune.lightning.cli import main
from clip_prune.lightning.data import CocoDataModule

CONFIG = Path(__file__).parents[1] / "configs" / "tiny.yaml"


def test_the_function_and_the_cli_give_the_same_masks_and_weights(tiny_clip_dir, tiny_coco_root, tmp_path,
                                                                  monkeypatch) -> None:
    """Same model, same calibration batches, same options (two steps, weight refit): the same masks, refit columns
    and saved weights from `clip_prune.prune` in this process as from `clip-prune prune`."""
    monkeypatch.chdir(tmp_path)
    main(["prune", "--config", str(CONFIG), "--model.pretrained", str(tiny_clip_dir), "--data.root",
          str(tiny_coco_root), "--output_dir", str(tmp_path / "cli"), "--trainer.logger", "false"])
    data = CocoDataModule(str(tiny_coco_root), str(tiny_clip_dir), num_samples=10, seed=1, batch_size=4,
                          num_workers=0)
    data.setup("validate")
    batches = list(data.val_dataloader())
    model = CLIPModel.from_pretrained(tiny_clip_dir).eval()

    result = clip_prune.prune(model, batches, 0.6, PruningOptions(reconstruct_samples=8), progress=False)
    assert len(result.steps) == 2  # 0.6 at a step keep of 0.75: a Fisher pass on the pruned model between
    for name, mask in (("head_mask", result.head_mask), ("neuron_mask", result.neuron_mask)):
        assert torch.equal(mask, torch.load(tmp_path / "cli" / f"{name}.pt", weights_only=True))
    cli_refit = load_file(tmp_path / "cli" / "refit.safetensors")
    assert cli_refit.keys() == result.refit.keys() and cli_refit
    for key, value in result.refit.items():
        torch.testing.assert_close(value, cli_refit[key], rtol=1e-6, atol=1e-7)

    saved = result.save(tmp_path / "api")
    api_weights = load_file(saved / "pruned" / "model.safetensors")
    cli_weights = load_file(tmp_path / "cli" / "pruned" / "model.safetensors")
    assert api_weights.keys() == cli_weights.keys()
    for key, value in api_weights.items():
        torch.testing.assert_close(value, cli_weights[key], rtol=1e-6, atol=1e-7)
    report, cli_report = (json.loads((root / "report.json").read_text()) for root in (saved, tmp_path / "cli"))
    assert report["kept"] == cli_report["kept"] and report["macs"] == cli_report["macs"]
    assert sorted(p.name for p in saved.iterdir() if not p.name.startswith(".")) == [
        "fisher.safetensors", "head_mask.pt", "neuron_mask.pt", "plan.json", "pruned", "refit.safetensors",
        "report.json"]
    assert torch.equal(load_file(saved / "fisher.safetensors")["head_fisher"],
                       load_file(tmp_path / "cli" / "fisher.safetensors")["head_fisher"])


def test_the_function_refuses_what_it_cannot_do(tiny_vision_dir) -> None:
    from transformers import CLIPVisionModel

    model = CLIPVisionModel.from_pretrained(tiny_vision_dir).eval()
    pixels = {"pixel_values": torch.randn(4, 3, 30, 30)}
    with pytest.raises(ValueError, match=r"--constraint must be in \(0, 1\]"):
        clip_prune.prune(model, [pixels], 1.5)
    with pytest.raises(ValueError, match="at least one calibration batch"):
        clip_prune.prune(model, [], 0.5)
    with pytest.raises(ValueError, match="loss='distill'"):
        clip_prune.prune(model, [pixels], 0.5, loss="contrastive")
    result = clip_prune.prune(model, [pixels], 0.7, progress=False)  # a vision tower alone: the label-free loss
    assert result.report().pruning.macs_kept().ratio <= 0.7
