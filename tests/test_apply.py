"""`export_pruned`: the sliced model with refit columns is checked against the masked model; the check can fail."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import CLIPVisionModel

import clip_prune.core.run.finish
from clip_prune.core.deploy.saving import cut_pruned_model, load_pruned
from clip_prune.core.pruning.masks import head_columns
from clip_prune.core.pruning.refit import load_refit, save_refit
from clip_prune.core.run.finish import PrunedModelSpec, export_pruned, export_to
from clip_prune.core.run.outputs import RunDirectory
from clip_prune.core.run.report import RunReport, StatisticsRecord, write_report
from clip_prune.files import MANIFEST
from clip_prune.towers import image_embeds


def _masks_and_refit(model: CLIPVisionModel) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    config = model.config
    head_mask = (torch.rand(config.num_hidden_layers, config.num_attention_heads, generator=generator) < 0.6).float()
    neuron_mask = (torch.rand(config.num_hidden_layers, config.intermediate_size, generator=generator) < 0.6).float()
    head_mask[:, 0] = 1.0
    head_dim = config.hidden_size // config.num_attention_heads
    refit = {}
    for layer in range(config.num_hidden_layers):
        columns = len(head_columns(head_mask[layer].nonzero().flatten(), head_dim))
        refit[f"layers.{layer}.self_attn.out_proj.weight"] = torch.randn(config.hidden_size, columns,
                                                                         generator=generator)
        refit[f"layers.{layer}.mlp.fc2.weight"] = torch.randn(config.hidden_size, int(neuron_mask[layer].sum()),
                                                              generator=generator)
        refit[f"layers.{layer}.mlp.fc2.bias"] = torch.randn(config.hidden_size, generator=generator)
    return head_mask, neuron_mask, refit


def test_save_with_refit_equals_the_masked_model_and_reloads(tiny_vision_dir: Path, tmp_path: Path) -> None:
    model = CLIPVisionModel.from_pretrained(tiny_vision_dir).eval()
    head_mask, neuron_mask, refit = _masks_and_refit(model)
    pixels = torch.randn(4, 3, 30, 30, generator=torch.Generator().manual_seed(1))
    before = {name: value.clone() for name, value in model.state_dict().items()}
    pruned, report = export_pruned(model, head_mask, neuron_mask, tmp_path / "out", str(tiny_vision_dir),
                                       pixels, latency_repeats=1, refit=refit)
    assert report.equivalence["max_abs_diff"] <= report.equivalence["tolerance"]
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())  # dense untouched
    layer = pruned.encoder.layers[1].mlp.fc2
    torch.testing.assert_close(layer.weight, refit["layers.1.mlp.fc2.weight"])
    torch.testing.assert_close(layer.bias, refit["layers.1.mlp.fc2.bias"])
    reloaded = load_pruned(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(image_embeds(reloaded, pixels), image_embeds(pruned, pixels))
    save_refit(tmp_path / "refit.safetensors", refit)
    loaded = load_refit(tmp_path / "refit.safetensors", model, head_mask, neuron_mask)
    assert all(torch.equal(loaded[key], value) for key, value in refit.items())
    with pytest.raises(ValueError, match="different runs"):
        load_refit(tmp_path / "refit.safetensors", model, head_mask, torch.ones_like(neuron_mask))


def test_the_equivalence_check_fails_when_the_slicing_drops_the_refit(tiny_vision_dir: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    model = CLIPVisionModel.from_pretrained(tiny_vision_dir).eval()
    head_mask, neuron_mask, refit = _masks_and_refit(model)
    pixels = torch.randn(4, 3, 30, 30, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(clip_prune.core.run.finish, "cut_pruned_model",
                        lambda dense, heads, neurons, _: cut_pruned_model(dense, heads, neurons))
    with pytest.raises(RuntimeError, match="differ from the masked model"):
        export_pruned(model, head_mask, neuron_mask, tmp_path / "out", str(tiny_vision_dir), pixels,
                          latency_repeats=1, refit=refit)
    assert not (tmp_path / "out").exists()


def test_export_and_report_write_the_model_and_one_report(tiny_vision_dir: Path, tmp_path: Path) -> None:
    model = CLIPVisionModel.from_pretrained(tiny_vision_dir).eval()
    head_mask, neuron_mask, refit = _masks_and_refit(model)
    pixels = torch.randn(2, 3, 30, 30, generator=torch.Generator().manual_seed(1))
    run, timings = RunDirectory(tmp_path / "run"), {"fisher": 1.0, "save": 2.0}
    with run.writing():
        _, measured = export_to(run, PrunedModelSpec(model, head_mask, neuron_mask, str(tiny_vision_dir), pixels,
                                                     refit, 1))
        summary = write_report(run, RunReport("tiny", export=measured, timings=timings))
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["model"] == "tiny"
    assert report["equivalence"]["max_abs_diff"] <= report["equivalence"]["tolerance"]
    assert report["timings_s"] == {"fisher": 1.0, "save": 2.0, "total": 3.0}
    assert (tmp_path / "run" / "pruned" / "model.safetensors").is_file()
    assert summary.startswith("\nclip-prune summary") and summary.endswith(f"clip-prune: wrote {tmp_path / 'run'}")
    # Nothing to save (a sensitivity run, statistics only): only the report.
    bare = RunDirectory(tmp_path / "bare")
    with bare.writing():
        assert write_report(bare, RunReport("tiny", StatisticsRecord(3))) == (
            f"  Fisher statistics of 3 samples\nclip-prune: wrote {tmp_path / 'bare'}")
    assert sorted(path.name for path in (tmp_path / "bare").iterdir()) == [MANIFEST, "report.json"]
