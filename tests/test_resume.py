"""A rerun into the output directory of an interrupted run reuses its Fisher statistics when they fit, and only then."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
from conftest import write_tiny_coco

from clip_prune.core.pruning.fisher import fisher_metadata
from clip_prune.lightning.cli import main

CONFIG = Path(__file__).parents[1] / "configs" / "tiny.yaml"


def prune(model_dir: Path, data_root: Path, output_dir: Path, *extra: str) -> None:
    main(["prune", "--config", str(CONFIG), "--model.pretrained", str(model_dir), "--data.root", str(data_root),
          "--output_dir", str(output_dir), "--options.reconstruct", "none", *extra])


def interrupted_prune(model_dir: Path, data_root: Path, output_dir: Path, monkeypatch: pytest.MonkeyPatch,
                      *extra: str) -> Path:
    """A run stopped after its Fisher pass (as by Ctrl-C in the search); returns the statistics it left."""
    with monkeypatch.context() as patch:
        patch.setattr("clip_prune.core.pruning.chain.prune_step",
                      lambda *args, **kwargs: (_ for _ in ()).throw(KeyboardInterrupt()))
        with pytest.raises((KeyboardInterrupt, SystemExit)):
            prune(model_dir, data_root, output_dir, *extra)
    [staging] = output_dir.parent.glob(f".{output_dir.name}.partial-*")
    return staging / "fisher.safetensors"


def test_rerun_reuses_the_statistics_of_an_interrupted_run(tiny_clip_dir, tiny_coco_root, tmp_path, monkeypatch,
                                                           capsys) -> None:
    out = tmp_path / "run"
    left = interrupted_prune(tiny_clip_dir, tiny_coco_root, out, monkeypatch)
    metadata = fisher_metadata(left)
    assert metadata["model_path"] == str(tiny_clip_dir.resolve()) and len(metadata["calibration_sha256"]) == 64
    assert metadata["loss"] == "contrastive" and metadata["global_batch"] == "4"
    inode = left.stat().st_ino
    capsys.readouterr()
    prune(tiny_clip_dir, tiny_coco_root, out)
    printed = capsys.readouterr().err  # status lines go with the progress, not the results
    assert "resuming the interrupted run" in printed and "gradient pass is skipped" in printed
    assert (out / "fisher.safetensors").stat().st_ino == inode, "the very file the interrupted run wrote"
    report = json.loads((out / "report.json").read_text())
    # Not the staging folder's path: that folder is gone once the run is in place.
    assert report["fisher_source"] == "an interrupted run of this output directory" and not left.exists()
    assert report["fisher_samples"] == 10
    assert "fisher" in report["timings_s"] and report["kept"]["heads"] > 0
    assert sorted(path.name for path in tmp_path.iterdir() if "run" in path.name) == ["run"]


def test_statistics_of_other_data_are_not_reused_and_are_removed(tiny_clip_dir, tiny_coco_root, tmp_path,
                                                                 monkeypatch, capsys) -> None:
    out = tmp_path / "run"
    left = interrupted_prune(tiny_clip_dir, tiny_coco_root, out, monkeypatch)
    capsys.readouterr()
    prune(tiny_clip_dir, tiny_coco_root, out, "--data.seed", "2")
    printed = capsys.readouterr().err
    assert "cannot reuse its statistics: its calibration sample differs" in printed and "removing it" in printed
    assert not left.parent.exists()
    assert "fisher_source" not in json.loads((out / "report.json").read_text())
    assert fisher_metadata(out / "fisher.safetensors")["calibration_sha256"] != ""


def test_changed_image_bytes_change_the_calibration_hash(tiny_clip_dir, tiny_coco_root, tmp_path, monkeypatch,
                                                         capsys) -> None:
    root = write_tiny_coco(tmp_path / "coco", num_images=12)
    out = tmp_path / "run"
    interrupted_prune(tiny_clip_dir, root, out, monkeypatch)
    image = next((root / "train2017").iterdir())
    write_tiny_coco(tmp_path / "other", num_images=12, seed=5)
    image.write_bytes((tmp_path / "other" / "train2017" / image.name).read_bytes())  # same name, other picture
    prune(tiny_clip_dir, root, out)
    assert "its calibration sample differs" in capsys.readouterr().err


def test_fisher_runs_link_the_original_statistics(tiny_clip_dir, tiny_coco_root, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tiny_clip_dir.parent)
    first = tmp_path / "first"
    prune(Path(tiny_clip_dir.name), tiny_coco_root, first, "--constraint", "null")
    again = tmp_path / "again"
    with_dot = f".{os.sep}{tiny_clip_dir.name}"  # the same model spelled differently: no "another model" warning
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*gathered on model")
        prune(Path(with_dot), tiny_coco_root, again, "--fisher", str(first / "fisher.safetensors"))
    assert (again / "fisher.safetensors").stat().st_ino == (first / "fisher.safetensors").stat().st_ino
    assert fisher_metadata(again / "fisher.safetensors")["model"] == tiny_clip_dir.name  # not relabelled
    assert json.loads((again / "report.json").read_text())["fisher_source"] == str(first / "fisher.safetensors")
