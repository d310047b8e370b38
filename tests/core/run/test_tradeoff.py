"""A run over several constraints: one chain of steps through all of them, each point saved as a run of its own,
and the trade-off of them all as a table and a picture."""

from __future__ import annotations

import csv
import json
import math
from itertools import pairwise
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from clip_prune.core.deploy.saving import load_pruned, read_masks
from clip_prune.core.file_names import REFIT_FILE
from clip_prune.core.pruning.options import PruningOptions
from clip_prune.core.pruning.refit import load_refit, refit_applied
from clip_prune.core.run.finish import masked_embeddings
from clip_prune.lightning.cli import main
from clip_prune.towers import load_model, tower_of

CONFIG = Path(__file__).parents[3] / "configs" / "tiny.yaml"


@settings(max_examples=200, deadline=None)
@given(points=st.lists(st.floats(0.01, 1.0), min_size=1, max_size=6), keep=st.floats(0.3, 0.95))
def test_the_chain_passes_through_every_constraint_and_keeps_enough_each_step(points, keep) -> None:
    chain = PruningOptions(step_keep=keep).step_constraints(points)
    assert set(points) <= set(chain)  # exactly, not close to them
    assert chain == sorted(chain, reverse=True) and chain[-1] == min(points)
    previous = 1.0
    for value in chain:
        assert value / previous >= keep * (1 - 1e-9) or value == previous == 1.0
        previous = value
    # As few steps as that allows between two requested points (the largest one from the dense model).
    stretches = [1.0, *sorted(set(points), reverse=True)]
    fewest = sum(max(1, math.ceil(math.log(b / a) / math.log(keep) - 1e-9)) for a, b in pairwise(stretches))
    assert len(chain) == fewest


def test_one_constraint_gives_the_chain_it_always_had() -> None:
    for constraint in (1.0, 0.75, 0.5, 0.2, 0.01):
        steps = max(1, math.ceil(math.log(constraint) / math.log(0.75) - 1e-9))
        expected = [constraint ** (k / steps) for k in range(1, steps)] + [constraint]
        assert PruningOptions().step_constraints(constraint) == expected
        assert PruningOptions().step_constraints([constraint]) == expected
    assert PruningOptions(steps=3).step_constraints(0.5) == [0.5 ** (1 / 3), 0.5 ** (2 / 3), 0.5]
    with pytest.raises(ValueError, match="leave --options.steps null"):
        PruningOptions(steps=2).step_constraints([0.8, 0.5])


@pytest.fixture(scope="module")
def sweep(tiny_clip_dir, tiny_coco_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sweep") / "run"
    main(["prune", "--config", str(CONFIG), "--model.pretrained", str(tiny_clip_dir), "--data.root",
          str(tiny_coco_root), "--output_dir", str(out), "--constraint", "[0.5, 0.8]", "--cascade_top_m", "[2]",
          "--trainer.default_root_dir", str(out.parent)])  # its TensorBoard logs too, not the working directory's
    return out


def test_each_point_is_a_run_of_its_own_on_one_chain(sweep) -> None:
    chain = PruningOptions().step_constraints([0.8, 0.5])  # 0.8, then two steps to 0.5
    assert chain[0] == 0.8 and chain[-1] == 0.5 and len(chain) == 3
    for folder, steps in (("c0.8", 1), ("c0.5", 3)):
        report = json.loads((sweep / folder / "report.json").read_text())
        assert report["constraint"] == chain[steps - 1] and report["macs"]["ratio"] <= report["constraint"]
        assert [step["constraint"] for step in report["steps"]] == chain[:steps]
        assert report["equivalence"]["max_abs_diff"] <= 1e-5
        assert report["metrics"]["cascade"][0]["top_m"] == 2
        for name in ("head_mask.pt", "neuron_mask.pt", REFIT_FILE, "plan.json", "pruned/model.safetensors"):
            assert (sweep / folder / name).is_file(), name
    run = json.loads((sweep / "report.json").read_text())
    assert run["constraints"] == [0.8, 0.5] and run["points"] == ["c0.8/report.json", "c0.5/report.json"]
    assert (sweep / "fisher.safetensors").is_file() and not (sweep / "head_mask.pt").exists()


@pytest.mark.parametrize("folder", ["c0.8", "c0.5"])
def test_each_point_saves_the_masked_dense_model_with_its_refit_columns(sweep, tiny_clip_dir, folder) -> None:
    dense = load_model(str(tiny_clip_dir)).eval()
    head_mask, neuron_mask = read_masks(sweep / folder, tower_of(dense).config)
    refit = load_refit(sweep / folder / REFIT_FILE, dense, head_mask, neuron_mask)
    images = torch.randn(3, 3, 30, 30, generator=torch.Generator().manual_seed(0))
    with refit_applied(dense, head_mask, neuron_mask, refit):
        expected = masked_embeddings(dense, head_mask, neuron_mask, images)
    pruned = load_pruned(sweep / folder / "pruned").eval()
    with torch.no_grad():
        torch.testing.assert_close(tower_of(pruned).image_embeds({"pixel_values": images}), expected, rtol=0,
                                   atol=1e-5)


def test_apply_of_a_point_rebuilds_its_model(sweep, tiny_clip_dir, tmp_path) -> None:
    main(["apply", "--model.pretrained", str(tiny_clip_dir), "--masks", str(sweep / "c0.5"), "--output_dir",
          str(tmp_path / "applied"), "--latency_repeats", "1"])
    applied = load_file(tmp_path / "applied" / "model.safetensors")
    saved = load_file(sweep / "c0.5" / "pruned" / "model.safetensors")
    assert applied.keys() == saved.keys() and all(torch.equal(applied[key], saved[key]) for key in saved)


def test_the_table_and_the_picture_hold_what_the_points_report(sweep) -> None:
    with open(sweep / "tradeoff.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [row["model"] for row in rows] == ["dense", "pruned", "pruned"]
    assert json.loads((sweep / "tradeoff.json").read_text())["rows"][1]["constraint"] == 0.8
    for row, folder in zip(rows[1:], ("c0.8", "c0.5"), strict=True):
        report = json.loads((sweep / folder / "report.json").read_text())
        pruned = report["metrics"]["pruned"]
        assert float(row["macs_ratio"]) == pytest.approx(report["macs"]["ratio"])
        assert int(row["parameters"]) == report["parameters"]["pruned"]
        assert float(row["speedup"]) == pytest.approx(report["latency_s"]["speedup"])
        assert float(row["t2i_R@1"]) == pytest.approx(pruned["retrieval"]["t2i_R@1"])
        assert float(row["cosine_to_dense"]) == pytest.approx(report["metrics"]["cosine_to_dense"]["mean"])
        cascade = report["metrics"]["cascade"][0]
        assert float(row["cascade_M2_t2i_R@5"]) == pytest.approx(cascade["retrieval"]["t2i_R@5"])
    dense = json.loads((sweep / "c0.5" / "report.json").read_text())["metrics"]["dense"]["retrieval"]
    assert float(rows[0]["t2i_R@10"]) == pytest.approx(dense["t2i_R@10"]) and rows[0]["speedup"] == "1.0"
    assert (sweep / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_several_constraints_with_fixed_steps_are_refused_before_any_work(tiny_clip_dir, tiny_coco_root,
                                                                         tmp_path) -> None:
    with pytest.raises(ValueError, match="leave --options.steps null"):
        main(["prune", "--config", str(CONFIG), "--model.pretrained", str(tiny_clip_dir), "--data.root",
              str(tiny_coco_root), "--output_dir", str(tmp_path / "run"), "--constraint", "[0.5, 0.8]",
              "--options.steps", "2"])
    assert not (tmp_path / "run").exists()
