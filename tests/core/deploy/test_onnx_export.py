"""`clip-prune export-onnx`: ONNX parity with PyTorch under onnxruntime at any batch size, and its report."""

import json
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_model, tiny_vision_inputs
from transformers import AutoModel

from clip_prune.core.deploy.saving import load_pruned
from clip_prune.core.run.finish import export_pruned
from clip_prune.lightning.cli import main

onnxruntime = pytest.importorskip(
    "onnxruntime", reason="onnxruntime is not installed (pip install 'clip-prune[onnx]'): ONNX export is not tested"
)
pytest.importorskip("onnxscript", reason="onnxscript (torch's ONNX exporter backend) is not installed")

from clip_prune.core.deploy.onnx_export import check_parity, dense_twin, export_image_encoder  # noqa: E402

IMAGE_SIZE = 30


@pytest.fixture(scope="module", params=["clip", "clip_vision", "siglip", "siglip_vision"])
def pruned_dir(request, tmp_path_factory) -> Path:
    """A pruned tiny model of each family whose image encoder takes pixels alone, with uneven widths, a layer
    without heads and one without neurons."""
    pretrained = save_tiny_model(tmp_path_factory.mktemp(f"tiny-{request.param}"), request.param)
    dense = AutoModel.from_pretrained(pretrained).eval()
    head_mask = torch.tensor([[1.0, 0, 1, 1], [0, 0, 0, 0], [0.5, 1, 0, 2]])
    neuron_mask = (torch.arange(37) % 3 != 1).float().repeat(3, 1)
    neuron_mask[2] = 0
    directory = tmp_path_factory.mktemp("pruned") / request.param
    pixels = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    export_pruned(dense, head_mask, neuron_mask, directory, str(pretrained), pixels, latency_repeats=1)
    return directory


def test_export_onnx_matches_pytorch_at_any_batch_size(pruned_dir) -> None:
    main(["export-onnx", "--pruned", str(pruned_dir), "--batch_size", "4", "--latency_repeats", "2"])
    path = pruned_dir / "onnx" / "model.onnx"
    report = json.loads((pruned_dir / "onnx" / "model_report.json").read_text())
    assert report["parity"]["max_abs_diff"] <= 1e-5 and report["parity"]["batches"] == [1, 4]
    assert report["latency_s"]["dense"] > 0 and report["latency_s"]["pruned"] > 0
    # Independently of the command's own check: a batch size it never saw, compared with the loaded model.
    model = load_pruned(pruned_dir).eval()
    pixels = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(5))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (output,) = session.run(None, {"pixel_values": pixels.numpy()})
    with torch.no_grad():  # transformers' own entry points, not the encoder the export wraps
        expected = (model.get_image_features(pixel_values=pixels) if hasattr(model, "get_image_features")
                    else model(pixel_values=pixels)).pooler_output
    torch.testing.assert_close(torch.from_numpy(output), expected, rtol=0, atol=1e-5)
    with pytest.raises(FileExistsError, match="--overwrite"):
        main(["export-onnx", "--pruned", str(pruned_dir)])


def test_a_wrong_onnx_file_fails_the_parity_check(pruned_dir, tmp_path) -> None:
    model = load_pruned(pruned_dir).eval()
    pixels = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(2))
    export_image_encoder(dense_twin(model), tmp_path / "other.onnx", pixels)
    with pytest.raises(RuntimeError, match="differs from the PyTorch model by"):
        check_parity(tmp_path / "other.onnx", model, [pixels])


def test_missing_runtime_names_the_extra(monkeypatch) -> None:
    import clip_prune.core.deploy.onnx_export as onnx_export

    real = onnx_export.importlib.util.find_spec
    monkeypatch.setattr(onnx_export.importlib.util, "find_spec",
                        lambda name: None if name == "onnxruntime" else real(name))
    with pytest.raises(ImportError, match=r"needs onnxruntime.*pip install 'clip-prune\[onnx\]'"):
        onnx_export.require_onnxruntime()


def test_export_onnx_takes_a_prune_run_directory(pruned_dir, tmp_path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "pruned").symlink_to(pruned_dir)
    main(["export-onnx", "--pruned", str(run), "--output", str(tmp_path / "model.onnx"), "--latency_repeats", "1"])
    assert (tmp_path / "model.onnx").is_file()


def test_siglip2_export_is_refused_with_the_reason(tmp_path) -> None:
    """SigLIP2's variable-resolution inputs (patch mask, grid shapes) do not export yet: a clear refusal, no file."""
    pretrained = save_tiny_model(tmp_path / "tiny", "siglip2")
    model = AutoModel.from_pretrained(pretrained).eval()
    inputs = tiny_vision_inputs(model)
    heads, neurons = torch.ones(3, 4), torch.ones(3, 37)
    export_pruned(model, heads, neurons, tmp_path / "pruned", str(pretrained), inputs, latency_repeats=1)
    with pytest.raises(ValueError, match="siglip2 model.*pixel_attention_mask.*does not take yet"):
        main(["export-onnx", "--pruned", str(tmp_path / "pruned")])
    assert not (tmp_path / "pruned" / "onnx").exists()
