"""`clip_prune.prune`: prune a model on batches in memory, in this process, for a notebook or a training script.

It runs the loop the CLI runs (`clip_prune.core.pruning.chain.prune_in_steps`), with a plain Fisher pass in place of
the Lightning module's validation loop; `PruningResult.save` writes what a `clip-prune prune` run directory holds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from clip_prune.core.deploy.saving import cut_pruned_model
from clip_prune.core.file_names import FISHER_FILE, PRUNED_FOLDER
from clip_prune.core.pruning.chain import prune_in_steps
from clip_prune.core.pruning.costs import mac_costs
from clip_prune.core.pruning.fisher import FisherStatistics, save_fisher
from clip_prune.core.pruning.fisher_pass import LossName, fisher_pass
from clip_prune.core.pruning.options import PruningOptions, requested_constraints, search_widths
from clip_prune.core.pruning.refit import RefitWeights
from clip_prune.core.pruning.step import StepResult
from clip_prune.core.run.finish import PrunedModelSpec, export_to, write_masks
from clip_prune.core.run.outputs import RunDirectory
from clip_prune.core.run.report import PruningRecord, RunReport, StatisticsRecord, write_report
from clip_prune.towers import VisionInputs, inputs_to, tower_of

Batch = Mapping[str, torch.Tensor]


@dataclass
class PruningResult:
    """What `prune` found: the last step's masks and refit columns, every step, and the dense model they apply to."""

    model: nn.Module
    """The dense model (unchanged)."""
    steps: list[StepResult]
    chain: list[float]
    """The constraint of each step."""
    options: PruningOptions
    statistics: FisherStatistics
    """The dense model's Fisher statistics."""
    verification_inputs: VisionInputs
    """A few calibration images on the model's device: the saved model is checked on them against the masked one."""

    @property
    def head_mask(self) -> torch.Tensor:
        """[L, H] kept heads (their scales with `scales` reconstruction), 0 = pruned."""
        return self.steps[-1].head_mask

    @property
    def neuron_mask(self) -> torch.Tensor:
        """[L, F] kept neurons, 0 = pruned."""
        return self.steps[-1].neuron_mask

    @property
    def refit(self) -> RefitWeights:
        """Refit output columns of the kept units (`weights` reconstruction; empty otherwise)."""
        return self.steps[-1].refit

    def pruned_model(self) -> nn.Module:
        """The physically smaller model, in memory (`save` also writes it, checked and measured)."""
        return cut_pruned_model(self.model, self.head_mask, self.neuron_mask, self.refit).eval()

    def report(self) -> RunReport:
        """The run as `report.json` describes it: the statistics and the steps (`save` adds the saved model's checks
        and costs)."""
        return RunReport(self.model.name_or_path, StatisticsRecord(self.statistics.num_samples),
                         PruningRecord(self.steps, self.chain, self.options, mac_costs(tower_of(self.model).config)))

    def save(self, directory: str | Path, overwrite: bool = False, latency_repeats: int = 15) -> Path:
        """Write what `clip-prune prune` writes into a run directory: the statistics, the masks, refit columns and
        plan, the pruned model in `pruned/` (checked against the masked model, measured) and `report.json`;
        atomically, refusing an existing directory unless `overwrite` (which replaces only what clip-prune wrote).

        The processor saved beside the model is the checkpoint's (`model.name_or_path`)."""
        pretrained = self.model.name_or_path
        run = RunDirectory(directory, overwrite=overwrite, inputs=(pretrained,))
        with run.writing():
            save_fisher(run.file(FISHER_FILE), self.statistics, pretrained)
            write_masks(run, self.steps[-1], pretrained)
            report = self.report()
            if self.options.save:
                _, report.export = export_to(run, PrunedModelSpec(
                    self.model, self.head_mask, self.neuron_mask, pretrained, self.verification_inputs, self.refit,
                    latency_repeats, folder=PRUNED_FOLDER))
            print(write_report(run, report))
        return run.path


def prune(model: nn.Module, batches: Sequence[Batch], constraint: float, options: PruningOptions | None = None, *,
          loss: LossName | None = None, noise_seed: int = 0, progress: bool = True) -> PruningResult:
    """Prune the image encoder of `model` to `constraint` of its MACs on the calibration `batches`.

    Fisher statistics, then each step's search, rearrangement and reconstruction, with a new Fisher pass on the model
    pruned so far between steps: what `clip-prune prune` does, without files, Lightning or DDP.

    Args:
        model: a dense model of a supported family (CLIP, SigLIP, SigLIP2; full or vision-only) on the device to
            prune on; left unchanged.
        batches: calibration batches, read once per Fisher pass: each a dict of the tower's inputs (`pixel_values`
            as its image processor makes them; SigLIP2 also `pixel_attention_mask` and `spatial_shapes`) and, for the
            contrastive loss, the captions' `input_ids` (and `attention_mask`).
        constraint: fraction of the encoder's MACs to keep, in (0, 1].
        options: stages, steps and reconstruction settings (`PruningOptions`; its defaults are the CLI's).
        loss: `contrastive` (the family's image-text loss) or `distill` (label-free); None: `contrastive` where the
            batches hold captions and the model a text tower.
        noise_seed: seed of the `distill` loss's noise.
        progress: show the reconstruction's progress bars.
    """
    options = options or PruningOptions()
    (constraint,) = requested_constraints([constraint])
    tower = tower_of(model)
    if not batches:
        raise ValueError("prune needs at least one calibration batch")
    if loss is None:
        loss = "contrastive" if tower.has_text and "input_ids" in batches[0] else "distill"
    if loss == "contrastive" and not (tower.has_text and "input_ids" in batches[0]):
        raise ValueError("the contrastive loss needs a model with a text tower and batches with `input_ids`; pass "
                         "loss='distill' to prune on images alone")
    widths = search_widths(options, model, constraint, next(model.parameters()).device)

    def pass_over(step: StepResult | None) -> FisherStatistics:
        return fisher_pass(model, batches, loss, noise_seed, step)

    statistics = pass_over(None)
    calibration = _calibration_images(model, batches, options.reconstruct_samples)
    chain = options.step_constraints(constraint)
    steps = list(prune_in_steps(model, statistics, chain, options,
                                calibration if options.reconstruct != "none" else [], pass_over,
                                widths=widths, progress=progress))
    return PruningResult(model, steps, chain, options, statistics,
                         {name: value[:8] for name, value in calibration[0].items()})


def _calibration_images(model: nn.Module, batches: Sequence[Batch], count: int) -> list[VisionInputs]:
    """The tower's inputs of the first `count` images of `batches`, on the model's device."""
    tower = tower_of(model)
    device = next(model.parameters()).device
    kept, seen = [], 0
    for batch in batches:
        if seen >= count:
            break
        inputs = inputs_to({name: value[: count - seen] for name, value in tower.vision_inputs(batch).items()}, device)
        kept.append(inputs)
        seen += len(inputs["pixel_values"])
    return kept
