"""`clip-prune sensitivity` on tiny models: one more single-head layer per round, early stop, apply."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli_subprocess, save_tiny_clip, tiny_vision_inputs
from transformers import CLIPModel

from clip_prune.core.deploy.saving import load_pruned
from clip_prune.core.pruning.masks import VisionMasks
from clip_prune.core.pruning.sensitivity import choose_head, keep_single_head
from clip_prune.lightning.cli import main
from clip_prune.towers import load_model, tower_of

CONFIG = Path(__file__).parents[3] / "configs" / "tiny_sensitivity.yaml"


def run_sensitivity(model_dir: Path, data_root: Path, output_dir: Path, *extra: str) -> dict:
    main(["sensitivity", "--config", str(CONFIG), "--model.pretrained", str(model_dir), "--data.root",
          str(data_root), "--output_dir", str(output_dir), *extra])
    return json.loads((output_dir / "report.json").read_text())


def test_choose_head_skips_reduced_layers() -> None:
    scores = torch.tensor([[1.0, 9.0, 2.0], [3.0, 4.0, 8.0], [0.5, 0.1, 0.2]])
    assert choose_head(scores, set()) == (0, 1)
    assert choose_head(scores, {0}) == (1, 2)
    assert choose_head(scores, {0, 1}) == (2, 0)
    reduced = keep_single_head(torch.ones(3, 3), 1, 2)
    assert reduced.tolist() == [[1, 1, 1], [0, 0, 1], [1, 1, 1]]
    with pytest.raises(ValueError, match="already reduced"):
        choose_head(scores, {0, 1, 2})


@pytest.fixture(scope="module")
def dominant_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny CLIP in which layer 1, head 2 carries the signal: every other head's out_proj columns shrink 20x."""
    path = save_tiny_clip(tmp_path_factory.mktemp("dominant"), seed=3)
    model = CLIPModel.from_pretrained(path)
    for index, layer in enumerate(model.vision_model.encoder.layers):
        attention = layer.self_attn
        for head in range(attention.num_heads):
            if (index, head) != (1, 2):
                with torch.no_grad():
                    attention.out_proj.weight[:, head * attention.head_dim:(head + 1) * attention.head_dim] /= 20
    model.save_pretrained(path)
    return path


def test_rounds_reduce_one_more_layer_each_and_start_with_the_dominant_head(dominant_clip, tiny_coco_root,
                                                                             tmp_path) -> None:
    out = tmp_path / "sens"
    report = run_sensitivity(dominant_clip, tiny_coco_root, out, "--stop_ratio", "0")
    rounds = report["rounds"]
    assert len(rounds) == 3 and not any("stopped" in entry for entry in rounds)
    assert (rounds[0]["layer"], rounds[0]["head"]) == (1, 2)
    assert sorted(entry["layer"] for entry in rounds) == [0, 1, 2]
    for index, entry in enumerate(rounds):
        mask = torch.load(out / f"head_mask_{index}.pt", weights_only=True)
        single = [layer for layer in range(3) if mask[layer].sum() == 1]
        assert sorted(single) == sorted(e["layer"] for e in rounds[: index + 1])
        assert all(mask[layer].tolist() == [1, 1, 1, 1] for layer in range(3) if layer not in single)
        assert mask[entry["layer"], entry["head"]] == 1
        assert entry["macs_ratio"] < 1
    assert torch.load(out / "neuron_mask.pt", weights_only=True).eq(1).all()


def test_early_stop_fires_only_when_the_metric_drops_below_the_ratio(tiny_clip_dir, tiny_coco_root, tmp_path,
                                                                    capsys) -> None:
    # With 6 evaluation images, R@10 is 100% for any model: a ratio above 1 must stop at once, 0.8 never.
    failing = run_sensitivity(tiny_clip_dir, tiny_coco_root, tmp_path / "fail", "--stop_ratio", "1.2",
                              "--stop_metric", "retrieval/i2t_R@10")
    assert len(failing["rounds"]) == 1 and "stopped" in failing["rounds"][0]
    assert not (tmp_path / "fail" / "head_mask_1.pt").exists()
    printed = capsys.readouterr().out
    assert "clip-prune sensitivity: stopped after round 0: retrieval/i2t_R@10 100.00 < 1.2 x dense 100.00" in printed
    passing = run_sensitivity(tiny_clip_dir, tiny_coco_root, tmp_path / "pass", "--stop_ratio", "0.8",
                              "--stop_metric", "retrieval/i2t_R@10")
    assert len(passing["rounds"]) == 3 and passing["dense_metric"] == 100.0
    assert ("all 3 layers reduced to one head; retrieval/i2t_R@10 stayed above 0.8 x dense 100.00"
            in capsys.readouterr().out)


def test_sensitivity_mask_applies_to_an_equivalent_model(tiny_model_dir, tiny_coco_root, tmp_path) -> None:
    """For every family: the rounds' head masks apply to a model equal to the hook-masked dense one."""
    vision_only = json.loads((tiny_model_dir / "config.json").read_text())["model_type"].endswith("_vision_model")
    out = tmp_path / "sens"
    run_sensitivity(tiny_model_dir, tiny_coco_root, out, "--stop_ratio", "0",
                    *(("--model.loss", "distill") if vision_only else ()))
    main(["apply", "--model.pretrained", str(tiny_model_dir), "--data.root", str(tiny_coco_root),
          "--data.num_workers", "0", "--masks", str(out / "head_mask_1.pt"), "--output_dir", str(tmp_path / "pruned"),
          "--latency_repeats", "1"])
    pruned = load_pruned(tmp_path / "pruned").eval()
    assert sorted(tower_of(pruned).config.heads_per_layer) == [1, 1, 4]
    dense = load_model(str(tiny_model_dir)).eval()
    VisionMasks(dense, head_mask=torch.load(out / "head_mask_1.pt", weights_only=True))
    inputs = tiny_vision_inputs(dense, batch=3)
    with torch.no_grad():
        torch.testing.assert_close(tower_of(pruned).image_embeds(inputs), tower_of(dense).image_embeds(inputs),
                                   atol=1e-5, rtol=0)


def test_vision_only_model_runs_all_rounds_without_early_stop(tiny_vision_dir, tiny_coco_root, tmp_path,
                                                              capsys) -> None:
    report = run_sensitivity(tiny_vision_dir, tiny_coco_root, tmp_path / "vision", "--model.loss", "distill")
    assert len(report["rounds"]) == 3 and report["dense_metric"] is None
    assert "no early stop" in capsys.readouterr().err  # a status line, not a result


def test_sensitivity_defaults_to_128_samples(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["sensitivity", "--model.pretrained", "m", "--data.root", "d", "--print_config"])
    assert "num_samples: 128" in capsys.readouterr().out


def test_early_stop_under_two_ddp_processes(tiny_clip_dir, tiny_coco_root, tmp_path) -> None:
    """Rank zero measures and decides; the other rank learns the decision and stops with it."""
    run_cli_subprocess(["sensitivity", "--config", str(CONFIG), "--model.pretrained", str(tiny_clip_dir),
                        "--data.root", str(tiny_coco_root), "--output_dir", str(tmp_path / "ddp"),
                        "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.logger", "false",
                        "--stop_ratio", "1.2", "--stop_metric", "retrieval/i2t_R@10"], cwd=tmp_path)
    rounds = json.loads((tmp_path / "ddp" / "report.json").read_text())["rounds"]
    assert len(rounds) == 1 and "stopped" in rounds[0]


def test_unknown_stop_metric_is_refused_before_work(tiny_clip_dir, tiny_coco_root, tmp_path) -> None:
    with pytest.raises(ValueError, match="not a metric clip-prune measures"):
        run_sensitivity(tiny_clip_dir, tiny_coco_root, tmp_path / "s", "--stop_metric", "retrieval/R@1")
    assert not (tmp_path / "s").exists()
