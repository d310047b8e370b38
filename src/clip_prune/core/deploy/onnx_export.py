"""A pruned directory's vision tower as ONNX: export with a dynamic batch, parity with PyTorch under
onnxruntime, and onnxruntime latency of the dense vs the pruned tower (`clip-prune export-onnx`).

Needs the optional `onnx` extra (onnx, onnxscript for torch's dynamo exporter, onnxruntime).
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import os
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import AutoImageProcessor, PreTrainedModel

from clip_prune.core.deploy.saving import load_pruned
from clip_prune.core.timing import LatencyComparison, interleaved_seconds, load_average, summarise_latency
from clip_prune.data.coco import available_cores
from clip_prune.data.synthetic import synthetic_pixels
from clip_prune.errors import MissingExtra, first_line
from clip_prune.towers import image_embeds, tower_of

ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
"""What exporting and checking need: the model format, the backend of torch's exporter, the runtime."""

PARITY_TOLERANCE = 1e-4
"""Largest accepted |onnxruntime − PyTorch| of the outputs, relative to the largest |output| (at least 1),
in float32: the runtime fuses and reorders sums (measured about 1e-6 on the tiny test models)."""


def require_onnxruntime() -> Any:
    """The onnxruntime module, or `MissingExtra` naming the missing packages and the extra that installs them."""
    missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
    if not missing:
        try:
            return importlib.import_module("onnxruntime")
        except ImportError as error:  # installed, but broken (e.g. a build for another Python)
            missing = [f"a working onnxruntime ({first_line(error)})"]
    raise MissingExtra(f"ONNX export needs {', '.join(missing)}, not installed here: pip install 'clip-prune[onnx]'")


class ImageEncoder(nn.Module):
    """What the ONNX graph computes: pixels [B, 3, S, S] to image embeddings [B, E] (a full model's, as it
    compares them with text) or to pooled features [B, D] (a vision tower alone)."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model
        self.output_name = "image_embeds" if tower_of(model).has_text else "pooler_output"

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return image_embeds(self.model, pixel_values)


def dense_twin(model: PreTrainedModel) -> PreTrainedModel:
    """A randomly initialised model with the dense shapes `model` was cut from: the latency reference.

    The values of the weights do not change the work, so the dense checkpoint is not needed.
    """
    config = copy.deepcopy(model.config)
    vision = config.vision_config if tower_of(model).has_text else config
    vision.heads_per_layer = [vision.num_attention_heads] * vision.num_hidden_layers
    vision.neurons_per_layer = [vision.intermediate_size] * vision.num_hidden_layers
    return type(model)._from_config(config).eval()


def export_image_encoder(model: PreTrainedModel, path: Path, pixels: torch.Tensor) -> str:
    """Write `model`'s image encoder to `path` as one ONNX file whose batch size is free; return the output name."""
    encoder = ImageEncoder(model).eval()
    batch = torch.export.Dim("batch", min=1)
    torch.onnx.export(encoder, (pixels,), path, input_names=["pixel_values"], output_names=[encoder.output_name],
                      dynamic_shapes={"pixel_values": {0: batch}}, dynamo=True, external_data=False, verbose=False)
    return encoder.output_name


def session(path: Path) -> Any:
    """An onnxruntime CPU session for the ONNX file at `path`."""
    return require_onnxruntime().InferenceSession(str(path), providers=["CPUExecutionProvider"])


@torch.no_grad()
def check_parity(path: Path, model: PreTrainedModel, batches: list[torch.Tensor],
                 tolerance: float = PARITY_TOLERANCE) -> dict[str, float]:
    """Largest |onnxruntime − PyTorch| over `batches` and the accepted one; a RuntimeError if it is exceeded.

    Args:
        path: the exported ONNX file.
        model: the model it was exported from.
        batches: pixel batches [B, 3, S, S] of different sizes (the batch dimension is dynamic).
        tolerance: relative to the largest |output|, at least 1.
    """
    runtime = session(path)
    encoder = ImageEncoder(model).eval()
    difference, largest = 0.0, 1.0
    for pixels in batches:
        expected = encoder(pixels.float().cpu()).numpy()
        (actual,) = runtime.run(None, {"pixel_values": pixels.float().cpu().numpy()})
        if actual.shape != expected.shape:
            raise RuntimeError(f"{path} returns shape {actual.shape} for a batch of {len(pixels)}, expected "
                               f"{expected.shape}")
        difference = max(difference, float(np.abs(actual - expected).max()))
        largest = max(largest, float(np.abs(expected).max()))
    if not difference <= tolerance * largest:
        raise RuntimeError(
            f"{path} differs from the PyTorch model by {difference:.3g} under onnxruntime (tolerance "
            f"{tolerance * largest:.3g}); the export is wrong: please report it with the model directory"
        )
    return {"max_abs_diff": difference, "tolerance": tolerance * largest}


def measure_onnx_latencies(paths: list[Path], pixels: torch.Tensor, repeats: int) -> list[list[float]]:
    """Seconds of each timed onnxruntime run over `pixels`, `repeats` per file, the files taking turns after a
    warm-up (`interleaved_seconds`)."""
    inputs = {"pixel_values": pixels.float().cpu().numpy()}
    runs = [partial(session(path).run, None, inputs) for path in paths]
    return interleaved_seconds(runs, torch.device("cpu"), warmup=2, repeats=repeats)


@dataclass(frozen=True)
class OnnxExport:
    """What `export_pruned_onnx` wrote and measured: the file, its inputs and output, the parity check against
    PyTorch and onnxruntime's latency of the dense shapes against the pruned model."""

    onnx: Path
    inputs: dict[str, list[str | int]]
    output: str
    parity: dict[str, Any]
    latency: LatencyComparison

    def to_json(self) -> dict[str, Any]:
        return {"onnx": str(self.onnx), "inputs": self.inputs, "output": self.output, "parity": self.parity,
                "latency_s": self.latency.to_json()}


def export_pruned_onnx(directory: str | Path, output: str | Path, batch_size: int = 8,
                       latency_repeats: int = 10) -> OnnxExport:
    """Export the pruned model in `directory` to `output`, check it, time it against the dense shapes; a report.

    Parity is checked at batch 1 and `batch_size` on synthetic images of the model's input size run
    through the directory's image processor.
    """
    require_onnxruntime()
    model = load_pruned(directory, dtype=torch.float32).eval()
    if tower_of(model).input_names != ("pixel_values",):
        raise ValueError(f"{directory} holds a {tower_of(model).family} model, whose inputs "
                         f"({', '.join(tower_of(model).input_names)}) the ONNX export does not take yet; it exports "
                         "models that take pixel_values alone (CLIP, SigLIP)")
    image_size = tower_of(model).config.image_size
    pixels = synthetic_pixels(batch_size, image_size, AutoImageProcessor.from_pretrained(directory))
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=f".{output.name}.") as scratch:
        # Checked before it takes its place, so a failed check leaves no wrong model behind.
        candidate, dense_path = Path(scratch) / output.name, Path(scratch) / "dense.onnx"
        output_name = export_image_encoder(model, candidate, pixels)
        parity = check_parity(candidate, model, [pixels[:1], pixels])
        export_image_encoder(dense_twin(model), dense_path, pixels)
        load = load_average()
        dense, pruned = measure_onnx_latencies([dense_path, candidate], pixels, latency_repeats)
        os.replace(candidate, output)
    return OnnxExport(output, {"pixel_values": ["batch", 3, image_size, image_size]}, output_name,
                      {**parity, "batches": [1, batch_size], "runtime": "onnxruntime CPUExecutionProvider"},
                      summarise_latency(dense, pruned, load, available_cores(), batch_size,
                                        "onnxruntime CPUExecutionProvider"))
