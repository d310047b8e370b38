"""`clip-prune` end to end on a tiny saved CLIP and a tiny COCO-format folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import linear_latency_table, run_cli_subprocess, save_tiny_clip
from PIL import Image
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModel, AutoProcessor, BertConfig

from clip_prune.core.deploy.saving import read_masks
from clip_prune.core.file_names import REFIT_FILE
from clip_prune.core.pruning import latency_table as latency
from clip_prune.core.pruning.fisher import fisher_metadata
from clip_prune.core.pruning.refit import load_refit, refit_applied
from clip_prune.core.run.finish import masked_embeddings
from clip_prune.core.timing import Timing
from clip_prune.lightning import callbacks
from clip_prune.lightning.cli import main
from clip_prune.towers import load_model, tower_of

CONFIG = Path(__file__).parents[1] / "configs" / "tiny.yaml"


def run_prune(model_dir: Path, data_root: Path, output_dir: Path, *extra: str) -> None:
    main(["prune", "--config", str(CONFIG), "--model.pretrained", str(model_dir), "--data.root", str(data_root),
          "--output_dir", str(output_dir), *extra])


def test_prune_writes_masks_statistics_report_and_tensorboard(tiny_clip_dir, tiny_coco_root, tmp_path,
                                                              monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    run_prune(tiny_clip_dir, tiny_coco_root, out, "--constraint", "0.6")
    report = json.loads((out / "report.json").read_text())
    assert report["macs"]["ratio"] <= 0.6
    assert report["fisher_samples"] == 10
    assert set(report["timings_s"]) >= {"fisher", "search", "rearrange", "reconstruct", "total"}
    # Two steps by default at 0.6 (each keeps at least 0.75 of the previous), the last exactly at 0.6.
    assert [step["constraint"] for step in report["steps"]] == pytest.approx([0.6 ** 0.5, 0.6])
    assert report["steps"][0]["macs_ratio"] <= 0.6 ** 0.5 and report["steps"][1]["macs_ratio"] <= 0.6
    assert len(report["steps"][1]["reconstruction"]["neurons_after"]) == 3
    head_mask = torch.load(out / "head_mask.pt", weights_only=True)
    neuron_mask = torch.load(out / "neuron_mask.pt", weights_only=True)
    assert head_mask.shape == (3, 4) and neuron_mask.shape == (3, 37)
    # Step 2 keeps a subset of step 1's units; weight reconstruction keeps the masks binary.
    assert report["steps"][1]["kept_heads"] <= report["steps"][0]["kept_heads"]
    assert set(head_mask.unique().tolist()) <= {0.0, 1.0} and set(neuron_mask.unique().tolist()) <= {0.0, 1.0}
    refit = load_file(out / "refit.safetensors")
    assert refit["layers.0.mlp.fc2.weight"].shape == (32, int((neuron_mask[0] != 0).sum()))
    assert report["kept"]["heads"] == int((head_mask != 0).sum())
    plan = json.loads((out / "plan.json").read_text())
    assert [len(layer["heads"]) for layer in plan] == (head_mask != 0).sum(1).tolist()
    assert [layer["head_scales"] for layer in plan] == [row[row != 0].tolist() for row in head_mask]
    assert report["equivalence"]["max_abs_diff"] <= 1e-5
    assert (out / "pruned" / "model.safetensors").is_file()
    assert "constraint: 0.6" in (out / "config.yaml").read_text()
    stats = load_file(out / "fisher.safetensors")
    assert stats["head_fisher"].dtype == torch.float64 and stats["head_fisher"].sum() > 0
    assert fisher_metadata(out / "fisher.safetensors")["num_samples"] == "10"
    events = EventAccumulator(str(next((tmp_path / "lightning_logs").glob("version_*")))).Reload().Tags()
    assert {"fisher/head_scores/layer_00", "fisher/neuron_scores/layer_02"} <= set(events["histograms"])
    images = {"fisher/head_scores_map", "masks/1_step1_search/kept_heads", "masks/3_step2_reconstruct/kept_heads"}
    assert images <= set(events["images"])
    assert {"search/objective_by_kept_heads", "metrics/retrieval/i2t_R@1",
            "reconstruction/step2/neurons_after"} <= set(events["scalars"])

    with pytest.raises(FileExistsError, match="--overwrite"):
        run_prune(tiny_clip_dir, tiny_coco_root, out, "--constraint", "0.6")
    # Re-solving from the saved statistics skips the first gradient pass; step 2 gathers its own, on the same
    # data, so the run is reproduced.
    again = tmp_path / "again"
    run_prune(tiny_clip_dir, tiny_coco_root, again, "--constraint", "0.6", "--fisher", str(out / "fisher.safetensors"))
    again_report = json.loads((again / "report.json").read_text())
    assert again_report["kept"] == report["kept"]
    again_refit = load_file(again / "refit.safetensors")
    for key, value in refit.items():
        torch.testing.assert_close(again_refit[key], value, rtol=1e-4, atol=1e-5)


def _vision_only(model_dir: Path) -> bool:
    return json.loads((model_dir / "config.json").read_text())["model_type"].endswith("_vision_model")


def test_prune_exports_an_equivalent_model_for_every_family(tiny_model_dir, tiny_coco_root, tmp_path) -> None:
    """CLIP, SigLIP and SigLIP2 (full and vision-only) end to end: Fisher, search, reconstruction, export, check
    against the masked dense model, counted MACs, evaluation; the directory reloads with AutoModel/AutoProcessor."""
    loss = "distill" if _vision_only(tiny_model_dir) else "contrastive"
    out = tmp_path / "run"
    run_prune(tiny_model_dir, tiny_coco_root, out, "--constraint", "0.6", "--model.loss", loss)
    report = json.loads((out / "report.json").read_text())
    assert report["macs"]["ratio"] <= 0.6 and report["equivalence"]["max_abs_diff"] <= 1e-5
    assert report["macs_counted"]["pruned"] == report["macs"]["pruned"]
    assert report["macs_counted"]["dense"] == report["macs"]["dense"]
    if loss == "contrastive":  # a vision tower alone scores no captions
        assert 0 <= report["metrics"]["pruned"]["retrieval"]["t2i_R@5"] <= 100

    pruned = AutoModel.from_pretrained(out / "pruned").eval()
    dense = load_model(str(tiny_model_dir)).eval()
    head_mask, neuron_mask = read_masks(out, tower_of(dense).config)
    refit = load_refit(out / REFIT_FILE, dense, head_mask, neuron_mask)
    image = Image.open(next((tiny_coco_root / "val2017").iterdir())).convert("RGB")
    processor = AutoProcessor.from_pretrained(out / "pruned")
    inputs = tower_of(pruned).vision_inputs(processor(images=[image, image.crop((0, 0, 40, 20))], return_tensors="pt"))
    with refit_applied(dense, head_mask, neuron_mask, refit):
        expected = masked_embeddings(dense, head_mask, neuron_mask, inputs)
    with torch.no_grad():
        torch.testing.assert_close(tower_of(pruned).image_embeds(inputs), expected, rtol=0, atol=1e-5)

    # `apply` of the run's masks and refit columns, verified on synthetic images: the same model.
    main(["apply", "--model.pretrained", str(tiny_model_dir), "--masks", str(out), "--output_dir",
          str(tmp_path / "applied"), "--latency_repeats", "1"])
    applied, exported = (load_file(path / "model.safetensors") for path in (tmp_path / "applied", out / "pruned"))
    assert applied.keys() == exported.keys() and all(torch.equal(applied[k], exported[k]) for k in exported)
    report = json.loads((tmp_path / "applied" / "report.json").read_text())
    assert report["verified_on"] == "synthetic images (no --data.root)"
    assert report["equivalence"]["max_abs_diff"] <= 1e-5


def test_help_and_print_config(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "prune" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    text = capsys.readouterr().out
    assert "--constraint" in text and "--model.pretrained" in text and "--data.root" in text
    with pytest.raises(SystemExit):
        main(["prune", "--config", str(CONFIG), "--print_config"])
    assert "constraint: 0.6" in capsys.readouterr().out


@pytest.fixture
def coco_copy(tiny_coco_root: Path, tmp_path: Path) -> Path:
    root = tmp_path / "coco"
    shutil.copytree(tiny_coco_root, root)
    return root


def _captions(root: Path) -> Path:
    return root / "annotations" / "captions_train2017.json"


@pytest.mark.parametrize(
    ("damage", "error", "match"),
    [
        (lambda root: shutil.rmtree(root), FileNotFoundError, "COCO data not found"),
        (lambda root: _captions(root).unlink(), FileNotFoundError, "captions_train2017.json does not exist"),
        (lambda root: _captions(root).write_text("{not json"), ValueError, "is not valid JSON"),
        (lambda root: _captions(root).write_text('{"images": []}'), ValueError,
         r"lacks the key\(s\) \['annotations'\]"),
        (lambda root: next((root / "train2017").iterdir()).unlink(), FileNotFoundError, r"\(missing\)"),
        (lambda root: next((root / "train2017").iterdir()).write_bytes(b"garbage"), FileNotFoundError,
         "cannot be decoded"),
    ],
    ids=["no-root", "no-captions", "bad-json", "no-annotations-key", "missing-image", "broken-image"],
)
def test_bad_data_is_reported_before_work(damage, error, match, tiny_clip_dir, coco_copy, tmp_path) -> None:
    damage(coco_copy)
    with pytest.raises(error, match=match):
        run_prune(tiny_clip_dir, coco_copy, tmp_path / "out", "--data.num_samples", "12")
    assert not (tmp_path / "out").exists()


def test_too_many_samples_warns_and_uses_all(tiny_clip_dir, tiny_coco_root, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.warns(UserWarning, match="larger than the 12 captioned images"):
        run_prune(tiny_clip_dir, tiny_coco_root, tmp_path / "out", "--data.num_samples", "500", "--constraint", "null")
    assert fisher_metadata(tmp_path / "out" / "fisher.safetensors")["num_samples"] == "12"


def test_bad_model_and_constraint(tiny_clip_dir, tiny_coco_root, tmp_path) -> None:
    bert = tmp_path / "bert"
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37).save_pretrained(bert)
    with pytest.raises(TypeError, match="a 'bert' model is not a supported vision-language model"):
        run_prune(bert, tiny_coco_root, tmp_path / "out")
    for value in ("0", "1.5", "-0.2"):
        with pytest.raises(ValueError, match=r"--constraint must be in \(0, 1\]"):
            run_prune(tiny_clip_dir, tiny_coco_root, tmp_path / "out", "--constraint", value)


def test_fisher_file_of_another_model_is_refused(tiny_clip_dir, tiny_coco_root, tmp_path) -> None:
    other = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file({k: torch.zeros(2, 2, dtype=torch.float64) for k in
               ("head_fisher", "neuron_fisher", "head_gram", "neuron_gram")}, str(other), metadata={"num_samples": "4"})
    with pytest.raises(ValueError, match="statistics of another model"):
        run_prune(tiny_clip_dir, tiny_coco_root, tmp_path / "out", "--constraint", "0.5", "--fisher", str(other))
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00\x01 not safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        run_prune(tiny_clip_dir, tiny_coco_root, tmp_path / "out", "--constraint", "0.5", "--fisher", str(corrupt))


def _prune_in_one_and_two_processes(model_dir: Path, data_root: Path, folder: Path, *extra: str,
                                    one: tuple[str, ...] = (), two: tuple[str, ...] = ()) -> None:
    """The same run in this process (folder/one) and under 2-process gloo DDP (folder/two: DDP needs a fresh launch)."""
    common = ["prune", "--config", str(CONFIG), "--model.pretrained", str(model_dir), "--data.root", str(data_root),
              "--trainer.logger", "false", *extra]
    main([*common, "--output_dir", str(folder / "one"), *one])
    run_cli_subprocess([*common, "--output_dir", str(folder / "two"), "--trainer.strategy", "ddp",
                        "--trainer.devices", "2", *two], cwd=folder)


def test_fisher_from_two_ddp_processes_equals_one_for_every_family(tiny_model_dir, tiny_coco_root, tmp_path) -> None:
    """The family's own loss (SigLIP's sigmoid loss over the global batch; distill for a vision tower alone) and
    its inputs (SigLIP2's patch masks) under 2-process gloo DDP; 9 samples, so rank 1 pads the last batch."""
    loss = "distill" if _vision_only(tiny_model_dir) else "contrastive"
    _prune_in_one_and_two_processes(tiny_model_dir, tiny_coco_root, tmp_path, "--model.loss", loss,
                                    "--data.num_samples", "9", "--constraint", "null",
                                    one=("--data.batch_size", "8"), two=("--data.batch_size", "4"))
    one, two = load_file(tmp_path / "one" / "fisher.safetensors"), load_file(tmp_path / "two" / "fisher.safetensors")
    assert one["head_fisher"].sum() > 0
    for key in one:  # float32 passes at batch 4 vs 8: equal to 1e-6 of each statistic's largest entry
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6 * one[key].abs().max().item())
    assert fisher_metadata(tmp_path / "two" / "fisher.safetensors")["num_samples"] == "9"

@pytest.mark.parametrize("num_samples", [8, 11])
def test_fisher_from_two_ddp_processes_equals_one(num_samples, tiny_clip_dir, tiny_coco_root, tmp_path) -> None:
    _prune_in_one_and_two_processes(tiny_clip_dir, tiny_coco_root, tmp_path, "--model.loss", "distill",
                                    "--data.num_samples", str(num_samples), "--constraint", "0.6")
    one, two = load_file(tmp_path / "one" / "fisher.safetensors"), load_file(tmp_path / "two" / "fisher.safetensors")
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-9)
    assert fisher_metadata(tmp_path / "two" / "fisher.safetensors")["num_samples"] == str(num_samples)
    masks = [torch.load(tmp_path / run / "head_mask.pt", weights_only=True) for run in ("one", "two")]
    torch.testing.assert_close(masks[1], masks[0], rtol=1e-3, atol=1e-4)
    # Both steps' reconstruction sums its moments across the ranks: the same refit columns as one process, up to
    # float32 rounding of the per-batch products (the ranks batch other samples together) amplified by the damped
    # system's condition number (at most 1 + columns / damping = 3201 here): about 1e-7 x 3e3.
    refits = [load_file(tmp_path / run / "refit.safetensors") for run in ("one", "two")]
    assert refits[0].keys() == refits[1].keys() and refits[0]
    for key in refits[0]:
        torch.testing.assert_close(refits[1][key], refits[0][key], rtol=2e-3, atol=5e-4)


def test_prune_under_a_latency_budget_with_widths_at_multiples(tiny_clip_dir, tiny_coco_root, tmp_path,
                                                               monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(latency, "measure_latency_table", linear_latency_table)  # tests/core times real tables
    monkeypatch.setattr(latency, "dense_tower_seconds", lambda config, batch, *args, **kwargs:
                        linear_latency_table(config, batch).dense_s)  # the cached table's check agrees
    timed = []

    def fake_timer(model, inputs, repeats, target_error, most_repeats):
        # The tower runs 0.8 of the fraction of heads and neurons it keeps.
        def time_ratio(found):
            timed.append(found)
            return Timing(0.8 * (found.head_mask.mean().item() + found.neuron_mask.mean().item()) / 2, 0.01)
        return time_ratio

    monkeypatch.setattr(callbacks, "candidate_timer", fake_timer)  # tests/core times real candidates
    args = ("--constraint", "0.6", "--constraint_type", "latency", "--options.multiple_of", "8",
            "--options.reconstruct", "none")
    run_prune(tiny_clip_dir, tiny_coco_root, tmp_path / "run", *args)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    table = json.loads((tmp_path / "run" / "latency_table.json").read_text())
    assert report["constraint_type"] == "latency" and report["multiple_of"] == 8
    assert len(report["steps"]) == 2  # iterative: 0.6 in two steps, the second among the first's units
    loop = report["latency"]["budget_loop"]  # only the last step's search is timed: the first is a waypoint
    assert "latency_budget" not in report["steps"][0] and report["steps"][1]["latency_budget"] == loop
    assert len(loop["rounds"]) == len(timed) and loop["rounds"][0]["budget"] == 0.6
    chosen = loop["rounds"][loop["chosen_round"]]
    assert report["latency"]["measured_ratio"] == chosen["measured_ratio"]
    assert report["latency"]["predicted_ratio"] == pytest.approx(chosen["table_ratio"])
    assert loop["met"] == (abs(chosen["measured_ratio"] / 0.6 - 1) <= 0.03)
    assert report["latency"]["table_source"]["how"] == "measured"
    assert report["latency"]["dense_s"] == pytest.approx(table["dense_latency_s"])
    assert table["key"]["batch_size"] == 4 and table["key"]["tokens"] == 26
    assert all(n % 8 == 0 or n == 37 for n in report["kept"]["neurons_per_layer"])
    assert len(list((tmp_path / "cache" / "clip_prune" / "latency").glob("*.json"))) == 1
    # A second run reads the cached table: the same table, so the same masks.
    run_prune(tiny_clip_dir, tiny_coco_root, tmp_path / "again", *args)
    assert json.loads((tmp_path / "again" / "latency_table.json").read_text()) == table
    again = json.loads((tmp_path / "again" / "report.json").read_text())
    assert again["latency"]["table_source"]["how"] == "cached" and again["latency"]["table_source"]["drift"] == 0
    for name in ("head_mask.pt", "neuron_mask.pt"):
        assert torch.equal(torch.load(tmp_path / "again" / name), torch.load(tmp_path / "run" / name))


def run_apply(model_dir: Path, data_root: Path, masks: Path, output_dir: Path, *extra: str) -> None:
    main(["apply", "--model.pretrained", str(model_dir), "--data.root", str(data_root), "--data.num_workers", "0",
          "--masks", str(masks), "--output_dir", str(output_dir), "--latency_repeats", "1", *extra])


def test_apply_reproduces_the_model_saved_by_prune(tiny_clip_dir, tiny_coco_root, tmp_path) -> None:
    run_prune(tiny_clip_dir, tiny_coco_root, tmp_path / "run", "--constraint", "0.5")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*was fitted on the checkpoint")  # it was: no warning
        run_apply(tiny_clip_dir, tiny_coco_root, tmp_path / "run", tmp_path / "applied")
    saved = load_file(tmp_path / "run" / "pruned" / "model.safetensors")
    applied = load_file(tmp_path / "applied" / "model.safetensors")
    assert saved.keys() == applied.keys()
    for key in saved:
        torch.testing.assert_close(applied[key], saved[key], rtol=0, atol=0)
    report = json.loads((tmp_path / "applied" / "report.json").read_text())
    assert report["equivalence"]["max_abs_diff"] <= 1e-5
    assert report["macs_counted"]["ratio"] == pytest.approx(report["macs"]["ratio"], abs=1e-9)
    assert report["metrics"]["dense"]["retrieval"]["i2t_R@10"] >= 0
    with pytest.raises(FileExistsError, match="--overwrite"):
        run_apply(tiny_clip_dir, tiny_coco_root, tmp_path / "run", tmp_path / "applied")
    # The refit columns are part of the model: the masks alone give another one.
    masks_only = tmp_path / "masks-only"
    masks_only.mkdir()
    for name in ("head_mask.pt", "neuron_mask.pt"):
        shutil.copy(tmp_path / "run" / name, masks_only / name)
    run_apply(tiny_clip_dir, tiny_coco_root, masks_only, tmp_path / "binary")
    binary = load_file(tmp_path / "binary" / "model.safetensors")
    assert not torch.equal(binary["vision_model.encoder.layers.0.mlp.fc2.weight"],
                           saved["vision_model.encoder.layers.0.mlp.fc2.weight"])
    # Beside the run's report.json, which says the masks came with refit columns, the missing file is refused.
    shutil.copy(tmp_path / "run" / "report.json", masks_only / "report.json")
    with pytest.raises(FileNotFoundError, match="refit.safetensors is missing"):
        run_apply(tiny_clip_dir, tiny_coco_root, masks_only, tmp_path / "refused")


def test_apply_warns_when_refit_columns_meet_another_checkpoint(tiny_clip_dir, tiny_coco_root, tmp_path) -> None:
    """The masked-equals-saved check cannot see it: both sides carry the same foreign columns."""
    run_prune(tiny_clip_dir, tiny_coco_root, tmp_path / "run", "--constraint", "0.5")
    other = save_tiny_clip(tmp_path / "other-seed", seed=5)
    with pytest.warns(UserWarning, match="was fitted on the checkpoint .* not .*other-seed"):
        run_apply(other, tiny_coco_root, tmp_path / "run", tmp_path / "applied")


def test_apply_without_data_root_verifies_on_synthetic_images(tiny_clip_dir, tiny_coco_root, tmp_path) -> None:
    masks = tmp_path / "masks"
    masks.mkdir()
    torch.save(torch.tensor([[1.0, 0, 1, 0], [0, 1, 1, 1], [1, 1, 0, 0]]), masks / "head_mask.pt")
    torch.save((torch.arange(37) % 4 != 0).float().repeat(3, 1), masks / "neuron_mask.pt")
    main(["apply", "--model.pretrained", str(tiny_clip_dir), "--masks", str(masks), "--output_dir",
          str(tmp_path / "no-data"), "--latency_repeats", "1"])
    report = json.loads((tmp_path / "no-data" / "report.json").read_text())
    assert report["verified_on"] == "synthetic images (no --data.root)"
    assert report["equivalence"]["samples"] == 8 and report["equivalence"]["max_abs_diff"] <= 1e-5
    assert "metrics" not in report
    run_apply(tiny_clip_dir, tiny_coco_root, masks, tmp_path / "with-data")
    with_data = load_file(tmp_path / "with-data" / "model.safetensors")
    without = load_file(tmp_path / "no-data" / "model.safetensors")
    assert with_data.keys() == without.keys() and all(torch.equal(with_data[k], without[k]) for k in with_data)
    with pytest.raises(ValueError, match="--data.root is not set: calibration needs"):
        main(["prune", "--config", str(CONFIG), "--model.pretrained", str(tiny_clip_dir), "--data.root", "null",
              "--output_dir", str(tmp_path / "prune"), "--constraint", "0.5"])


def test_apply_refuses_bad_masks(tiny_clip_dir, tiny_coco_root, tmp_path) -> None:
    masks = tmp_path / "masks"
    masks.mkdir()
    torch.save(torch.ones(12, 12), masks / "head_mask.pt")
    with pytest.raises(ValueError, match="shape"):
        run_apply(tiny_clip_dir, tiny_coco_root, masks, tmp_path / "out")
    torch.save(torch.full((3, 4), float("nan")), masks / "head_mask.pt")
    with pytest.raises(ValueError, match="NaN"):
        run_apply(tiny_clip_dir, tiny_coco_root, masks, tmp_path / "out")
    torch.save(torch.zeros(3, 4), masks / "head_mask.pt")
    torch.save(torch.zeros(3, 37), masks / "neuron_mask.pt")
    with pytest.raises(ValueError, match="prune every head and every neuron"):
        run_apply(tiny_clip_dir, tiny_coco_root, masks, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_vision_only_checkpoint_without_tokenizer_prunes_with_distill(tiny_vision_dir, tiny_coco_root,
                                                                       tmp_path) -> None:
    with pytest.raises(ValueError, match="vision-only; use --model.loss=distill"):
        run_prune(tiny_vision_dir, tiny_coco_root, tmp_path / "refused", "--constraint", "0.6")
    run_prune(tiny_vision_dir, tiny_coco_root, tmp_path / "run", "--constraint", "0.6", "--model.loss", "distill")
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["macs"]["ratio"] <= 0.6 and report["equivalence"]["max_abs_diff"] <= 1e-5
    assert "metrics" not in report or report["metrics"]["dense"] == {}


def test_a_checkpoint_saved_without_tokenizer_files_has_no_tokenizer(tiny_clip_dir, tiny_coco_root,
                                                                     tmp_path) -> None:
    """transformers makes up a tokenizer of special tokens alone for it; contrastive Fisher on it would be garbage."""
    checkpoint = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_clip_dir, checkpoint, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens*",
                                                                             "vocab*", "merges*"))
    with pytest.raises(ValueError, match="has no tokenizer; save one beside the model or use --model.loss=distill"):
        run_prune(checkpoint, tiny_coco_root, tmp_path / "run", "--constraint", "0.6")


def test_overwrite_never_replaces_an_input(tiny_clip_dir, tiny_coco_root, tmp_path) -> None:
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(tiny_clip_dir, checkpoint)
    with pytest.raises(ValueError, match="is the input"):
        run_prune(checkpoint, tiny_coco_root, checkpoint, "--constraint", "0.6", "--overwrite", "true")
    with pytest.raises(ValueError, match="is the input"):
        run_apply(checkpoint, tiny_coco_root, checkpoint, checkpoint, "--overwrite", "true")
    assert (checkpoint / "config.json").is_file()


def test_bad_evaluation_data_is_reported_before_the_fisher_pass(tiny_clip_dir, tiny_coco_root, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="zero_shot_root"):
        run_prune(tiny_clip_dir, tiny_coco_root, tmp_path / "run", "--constraint", "0.6",
                  "--data.zero_shot_root", str(tmp_path / "missing"))
    assert not [path for path in tmp_path.iterdir() if "run" in path.name]  # neither the run nor its staging


def test_evaluate_takes_a_prune_run_directory(tiny_clip_dir, tiny_coco_root, tmp_path) -> None:
    run_prune(tiny_clip_dir, tiny_coco_root, tmp_path / "run", "--constraint", "0.6", "--options.reconstruct", "none")
    main(["evaluate", "--model.pretrained", str(tiny_clip_dir), "--data.root", str(tiny_coco_root),
          "--data.num_workers", "0", "--pruned", str(tmp_path / "run"), "--output_json", str(tmp_path / "m.json")])
    metrics = json.loads((tmp_path / "m.json").read_text())
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert metrics["pruned"]["retrieval"] == pytest.approx(report["metrics"]["pruned"]["retrieval"])


def test_statistics_only_run_prints_no_empty_table(tiny_clip_dir, tiny_coco_root, tmp_path, capsys) -> None:
    run_prune(tiny_clip_dir, tiny_coco_root, tmp_path / "run", "--constraint", "null")
    printed = capsys.readouterr().out
    assert "clip-prune summary" not in printed and "dense" not in printed
    assert "Fisher statistics of 10 samples" in printed and f"clip-prune: wrote {tmp_path / 'run'}" in printed


def _cli(*args: str, cwd: Path, debug: bool = False) -> subprocess.CompletedProcess:
    """`python -m clip_prune ARGS` as a user runs it (no CLIP_PRUNE_DEBUG unless `debug`)."""
    env = {key: value for key, value in os.environ.items() if key != "CLIP_PRUNE_DEBUG"}
    env |= {"OMP_NUM_THREADS": "1", **({"CLIP_PRUNE_DEBUG": "1"} if debug else {})}
    return subprocess.run([sys.executable, "-m", "clip_prune", *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd, env=env)


def test_user_errors_print_one_line_and_exit_2_and_runs_print_one_screen(tiny_clip_dir, tiny_coco_root,
                                                                         tmp_path) -> None:
    common = ["prune", "--config", str(CONFIG), "--model.pretrained", str(tiny_clip_dir)]
    missing = _cli(*common, "--data.root", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.startswith(f"clip-prune: error: COCO data not found: {tmp_path / 'nowhere'}")
    assert "--data.root" in missing.stderr and "--debug" in missing.stderr and missing.stdout == ""
    bad_value = _cli(*common, "--data.root", str(tiny_coco_root), "--options.damping", "-1", cwd=tmp_path)
    assert bad_value.returncode == 2
    assert bad_value.stderr.splitlines()[0] == "clip-prune: error: --options.damping must be >= 0, got -1.0"
    unknown = _cli(*common, "--data.root", str(tiny_coco_root), "--constraint", "half", cwd=tmp_path)
    assert unknown.returncode == 2 and unknown.stderr.startswith("clip-prune: error: --constraint: got half, "
                                                                 "expected a number or a list such as '[1, 2]'\n")
    assert "usage:" not in unknown.stderr
    shown = _cli(*common, "--data.root", str(tmp_path / "nowhere"), "--debug", cwd=tmp_path)
    assert shown.returncode == 1 and "Traceback" in shown.stderr and "FileNotFoundError: COCO data" in shown.stderr

    ok = _cli(*common, "--data.root", str(tiny_coco_root), "--output_dir", str(tmp_path / "run"), cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    output = ok.stdout + ok.stderr
    for noise in ("Tip", "GPU available", "Seed set", "LeafSpec", "Loading weights", "does not have many workers"):
        assert noise not in output
    assert "clip-prune summary" in ok.stdout and ok.stdout.rstrip().endswith(f"clip-prune: wrote {tmp_path / 'run'}")
    assert len(ok.stdout.splitlines()) <= 22
    assert all("it/s]" in line for line in ok.stderr.splitlines() if line.strip()), ok.stderr  # progress bars only


def test_internal_errors_keep_their_traceback(tiny_clip_dir, tiny_coco_root, tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("CLIP_PRUNE_DEBUG")
    monkeypatch.setattr("clip_prune.core.pruning.chain.prune_step", lambda *args, **kwargs: int("not a number"))
    with pytest.raises(ValueError, match="invalid literal"):
        run_prune(tiny_clip_dir, tiny_coco_root, tmp_path / "run", "--constraint", "0.6")
    with pytest.raises(SystemExit) as caught:
        run_prune(tiny_clip_dir, tiny_coco_root, tmp_path / "run", "--constraint", "1.5")
    assert caught.value.code == 2


def test_evaluate_refuses_a_model_pruned_from_another_checkpoint(tiny_clip_dir, tiny_coco_root, tmp_path) -> None:
    other = save_tiny_clip(tmp_path / "other", seed=7)
    run_prune(other, tiny_coco_root, tmp_path / "run", "--constraint", "0.6")
    with pytest.raises(ValueError, match="was not cut from --model.pretrained"):
        main(["evaluate", "--model.pretrained", str(tiny_clip_dir), "--data.root", str(tiny_coco_root),
              "--data.num_workers", "0", "--pruned", str(tmp_path / "run" / "pruned")])


def test_a_terminated_run_exits_with_the_sigterm_status(monkeypatch) -> None:
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    import clip_prune.lightning.cli

    def terminated(*_: object, **__: object) -> None:
        raise SIGTERMException  # what Lightning raises when the process receives SIGTERM

    monkeypatch.setattr(clip_prune.lightning.cli, "run_cli", terminated)
    with pytest.raises(SystemExit) as exit_info:
        main(["prune"])
    assert exit_info.value.code == 143
