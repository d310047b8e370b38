"""The shipped demo model, pruned on a few hundred synthetic samples, keeps most of its retrieval recall."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clip_prune.data.synthetic import write_synthetic_coco
from clip_prune.lightning.cli import main

REPO = Path(__file__).parents[1]
MARGIN = 8.0
"""Largest accepted drop of mean recall (the average of i2t/t2i R@1/5/10, in points) at constraint 0.5."""


def mean_recall(metrics: dict) -> float:
    return sum(metrics["retrieval"].values()) / len(metrics["retrieval"])


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_coco(tmp_path_factory.mktemp("demo") / "data", num_train=300, num_val=200, seed=3)


def prune_demo(root: Path, output_dir: Path, *extra: str) -> dict:
    main(["prune", "--config", str(REPO / "configs" / "demo.yaml"),
          "--model.pretrained", str(REPO / "demo" / "clip-tiny-synthetic"), "--data.root", str(root),
          "--data.zero_shot_root", "null", "--data.num_samples", "256", "--data.num_workers", "0",
          "--options.reconstruct_samples", "256", "--constraint", "0.5", "--output_dir", str(output_dir),
          "--trainer.enable_progress_bar", "false", *extra])
    return json.loads((output_dir / "report.json").read_text())


def test_pruned_demo_keeps_recall_and_full_pipeline_beats_search_alone(synthetic_root, tmp_path) -> None:
    full = prune_demo(synthetic_root, tmp_path / "full")
    search_only = prune_demo(synthetic_root, tmp_path / "search", "--options.rearrange", "false",
                             "--options.reconstruct", "none", "--options.steps", "1")
    dense = mean_recall(full["metrics"]["dense"])
    assert dense > 70, "the shipped model must retrieve far above chance (R@1 chance is 0.5% here)"
    assert full["macs"]["ratio"] <= 0.5
    assert mean_recall(full["metrics"]["pruned"]) >= dense - MARGIN
    assert mean_recall(full["metrics"]["pruned"]) >= mean_recall(search_only["metrics"]["pruned"])


@pytest.mark.parametrize("method", ["weights", "scales"])
def test_every_layer_is_reconstructed_down_to_a_tenth_of_the_macs(synthetic_root, tmp_path, method) -> None:
    main(["prune", "--config", str(REPO / "configs" / "demo.yaml"),
          "--model.pretrained", str(REPO / "demo" / "clip-tiny-synthetic"), "--data.root", str(synthetic_root),
          "--data.zero_shot_root", "null", "--data.num_samples", "128", "--data.num_workers", "0",
          "--options.reconstruct", method, "--options.steps", "1", "--options.save", "false",
          "--constraint", "0.1", "--output_dir", str(tmp_path / method), "--trainer.enable_progress_bar", "false"])
    report = json.loads((tmp_path / method / "report.json").read_text())
    assert report["macs"]["ratio"] <= 0.1
    assert report["warnings"] == []
    reconstruction = report["steps"][0]["reconstruction"]
    kept = zip(report["kept"]["heads_per_layer"], report["kept"]["neurons_per_layer"], strict=True)
    for layer, (heads, neurons) in enumerate(kept):
        # Every stage with units left was solved (a finite damping), none kept its incoming weights (a stage
        # without units has only its bias refit, with `weights`).
        assert heads == 0 or reconstruction["damping_heads"][layer] is not None
        assert neurons == 0 or reconstruction["damping_neurons"][layer] is not None
        assert reconstruction["neurons_after"][layer] <= reconstruction["neurons_before"][layer]
