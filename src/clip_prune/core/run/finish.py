"""The end of a pruned run: masks → a physically smaller model on disk, verified against the masked model and
measured (`export_pruned`), and the checks that refuse a model that would not work.

Shared by `clip-prune prune` (which saves into `DIR/pruned/`), `clip-prune apply` (into its output directory)
and `clip_prune.prune`'s `PruningResult.save`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from clip_prune.core.deploy.saving import cut_pruned_model, write_pruned_files
from clip_prune.core.deploy.sharing import read_processor
from clip_prune.core.deploy.slicing import plan_from_masks, write_plan
from clip_prune.core.file_names import HEAD_MASK_FILE, NEURON_MASK_FILE, PLAN_FILE, REFIT_FILE
from clip_prune.core.pruning.masks import VisionMasks
from clip_prune.core.pruning.refit import RefitWeights, refit_applied, save_refit
from clip_prune.core.pruning.step import StepResult
from clip_prune.core.run.costs import ModelCosts, measure_costs
from clip_prune.core.run.outputs import RunFolder
from clip_prune.towers import VisionInputs, as_inputs, image_embeds, tower_of

EQUIVALENCE_TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
"""Largest accepted |masked − pruned| of image embeddings, relative to the largest |embedding| (at least 1),
per dtype: slicing reorders sums, so the two agree to the dtype's rounding (float32 measured ≤ 1e-5)."""


@torch.no_grad()
def masked_embeddings(model: PreTrainedModel, head_mask: torch.Tensor, neuron_mask: torch.Tensor,
                      pixels: torch.Tensor | VisionInputs) -> torch.Tensor:
    """Image embeddings of the dense model under hook masks: the reference the pruned model must match."""
    masks = VisionMasks(model, head_mask, neuron_mask)
    try:
        return image_embeds(model, pixels)
    finally:
        masks.remove()


@dataclass(frozen=True)
class PrunedModelSpec:
    """What `export_to` saves: the dense model, the masks (and refit columns) to cut it with, where, and how to
    check and time it."""

    model: PreTrainedModel
    """The dense model (left unchanged)."""
    head_mask: torch.Tensor
    """[L, H] head scales, 0 = pruned."""
    neuron_mask: torch.Tensor
    """[L, F] neuron scales, 0 = pruned."""
    pretrained: str
    """Checkpoint whose image processor and tokenizer are saved alongside."""
    inputs: torch.Tensor | VisionInputs
    """The tower's inputs on the model's device for the equivalence check and the latency (`VisionTower.input_names`:
    pixels [B, 3, S, S], or SigLIP2's patches, patch mask and grid), or pixels alone."""
    refit: RefitWeights | None = None
    """Refit columns of the kept units (`weights` reconstruction)."""
    latency_repeats: int = 15
    """Timed forward passes per model."""
    folder: str = "pruned"
    """Where in the run directory the model goes ("" for the run directory itself)."""


@dataclass(frozen=True)
class ExportResult:
    """What saving a pruned model checked (its embeddings against the masked model's, and that they still depend on
    the image) and measured (`ModelCosts`)."""

    equivalence: dict[str, Any]
    image_dependence: dict[str, float | None]
    costs: ModelCosts

    def to_json(self) -> dict[str, Any]:
        return {"equivalence": self.equivalence, "image_dependence": self.image_dependence, **self.costs.to_json()}


def export_to(run: RunFolder, spec: PrunedModelSpec) -> tuple[nn.Module, ExportResult]:
    """`export_pruned` of `spec` into its folder of `run`: the pruned model and what its checks and costs measured."""
    return export_pruned(spec.model, spec.head_mask, spec.neuron_mask, run.file(spec.folder), spec.pretrained,
                         spec.inputs, spec.latency_repeats, spec.refit)


def export_pruned(model: PreTrainedModel, head_mask: torch.Tensor, neuron_mask: torch.Tensor,
                      directory: Path, pretrained: str, pixels: torch.Tensor | VisionInputs, latency_repeats: int = 15,
                      refit: RefitWeights | None = None) -> tuple[nn.Module, ExportResult]:
    """Slice `model` by the masks, check it against the masked model, save it to `directory`; return it and what
    was checked and measured.

    The reference of the check is the dense model under hook masks with the refit columns written into
    its weights: it shares no code with the slicing.

    Args:
        model: the dense model (left unchanged).
        head_mask: [L, H] scales, 0 = pruned.
        neuron_mask: [L, F] scales, 0 = pruned.
        directory: folder to write the Hugging Face files into (created if missing; not staged: callers write
            it inside a staged run directory).
        pretrained: checkpoint whose image processor and tokenizer are saved alongside.
        pixels: [B, 3, S, S] images on the model's device for the equivalence check and latency, or the tower's
            inputs (`VisionTower.input_names`: SigLIP2's patches, patch mask and grid).
        latency_repeats: timed forward passes per model.
        refit: refit columns of the kept units (`weights` reconstruction); None or empty for none.
    """
    head_mask, neuron_mask, refit = head_mask.float().cpu(), neuron_mask.float().cpu(), refit or {}
    pixels = as_inputs(pixels)
    device = pixels["pixel_values"].device
    check_keeps_a_path(model, head_mask)
    pruned = cut_pruned_model(model, head_mask, neuron_mask, refit).eval()
    with refit_applied(model, head_mask, neuron_mask, refit):
        reference = masked_embeddings(model, head_mask.to(device), neuron_mask.to(device), pixels)
    with torch.no_grad():
        difference = (image_embeds(pruned, pixels) - reference).abs().max().item()
        dependence = image_dependence(image_embeds(model, pixels), reference)
    tolerance = EQUIVALENCE_TOLERANCE[reference.dtype] * max(1.0, reference.abs().max().item())
    if not difference <= tolerance:
        raise RuntimeError(
            f"the pruned model's image embeddings differ from the masked model's by {difference:.3g} "
            f"(tolerance {tolerance:.3g} in {reference.dtype}); this is a bug in clip-prune, please report it"
        )
    directory.mkdir(parents=True, exist_ok=True)
    write_pruned_files(pruned, directory, plan_from_masks(head_mask, neuron_mask), processor=read_processor(pretrained))
    equivalence = {"max_abs_diff": difference, "tolerance": tolerance, "dtype": str(reference.dtype),
                   "samples": len(pixels["pixel_values"])}
    return pruned, ExportResult(equivalence, dependence,
                                measure_costs(model, pruned, head_mask, neuron_mask, pixels, latency_repeats))


MIN_SPREAD_RATIO = 1e-3
"""Least spread of the pruned model's image embeddings across images, relative to the dense model's, that a saved
model must keep: an embedding that hardly varies with the image retrieves nothing. A CLIP left without heads
spreads about 1e-6 of the dense model's (float rounding); pruned models that still retrieve keep far more."""


def check_keeps_a_path(model: PreTrainedModel, head_mask: torch.Tensor) -> None:
    """Refuse masks that leave no attention head where the pooled token learns of the image only through attention
    (`VisionTower.pooling_needs_attention`): the model's embedding would be the same for every image."""
    if tower_of(model).pooling_needs_attention() and not bool((head_mask != 0).any()):
        raise ValueError("the masks keep no attention head, so the pruned tower's embedding would be the same for "
                         "every image (its pooled token sees the patches only through attention); keep at least one "
                         "head: raise --constraint, or use masks that keep one")


def embedding_spread(embeds: torch.Tensor) -> float:
    """Mean distance of the unit-length embeddings [B, E] from their mean: 0 when every image embeds alike."""
    unit = torch.nn.functional.normalize(embeds.detach().double(), dim=-1)
    return float((unit - unit.mean(dim=0)).norm(dim=-1).mean())


def image_dependence(dense: torch.Tensor, pruned: torch.Tensor) -> dict[str, float | None]:
    """How much the pruned model's embeddings [B, E] still vary with the image, against the dense model's; refuse a
    model whose embedding hardly depends on its input (`MIN_SPREAD_RATIO`)."""
    dense_spread, pruned_spread = embedding_spread(dense), embedding_spread(pruned)
    ratio = pruned_spread / dense_spread if dense_spread > 0 else None  # one image, or identical ones: no measure
    if ratio is not None and ratio < MIN_SPREAD_RATIO:
        raise ValueError(f"the pruned model's image embeddings hardly depend on the image: across {len(pruned)} "
                         f"images they spread {ratio:.2g} of the dense model's (at least {MIN_SPREAD_RATIO:g} needed); "
                         "prune less: raise --constraint, or use masks that keep more")
    return {"dense_spread": dense_spread, "pruned_spread": pruned_spread, "ratio": ratio}


def write_masks(folder: RunFolder, step: StepResult, model_name: str) -> None:
    """Write a step's masks (the original tool's format), its refit columns and its plan into `folder`."""
    folder.save_tensor(HEAD_MASK_FILE, step.head_mask)
    folder.save_tensor(NEURON_MASK_FILE, step.neuron_mask)
    if step.refit:
        save_refit(folder.file(REFIT_FILE), step.refit, model_name)
    write_plan(plan_from_masks(step.head_mask, step.neuron_mask), folder.file(PLAN_FILE))
