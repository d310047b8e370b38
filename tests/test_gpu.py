"""CUDA placement and bf16 on a GPU (skipped without one): the same CLI runs as the CPU tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from clip_prune.lightning.cli import main

CONFIGS = Path(__file__).parents[1] / "configs"
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_prune_on_gpu(precision, tiny_clip_dir, tiny_coco_root, tmp_path) -> None:
    main(["prune", "--config", str(CONFIGS / "tiny.yaml"), "--model.pretrained", str(tiny_clip_dir),
          "--data.root", str(tiny_coco_root), "--output_dir", str(tmp_path / "run"),
          "--trainer.accelerator", "gpu", "--trainer.precision", precision])
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["macs"]["ratio"] <= 0.6 and report["latency_s"]["device"].startswith("cuda")


def test_sensitivity_on_gpu(tiny_clip_dir, tiny_coco_root, tmp_path) -> None:
    main(["sensitivity", "--config", str(CONFIGS / "tiny_sensitivity.yaml"), "--model.pretrained",
          str(tiny_clip_dir), "--data.root", str(tiny_coco_root), "--output_dir", str(tmp_path / "sens"),
          "--trainer.accelerator", "gpu", "--stop_ratio", "0"])
    assert len(json.loads((tmp_path / "sens" / "report.json").read_text())["rounds"]) == 3
