"""The `clip-prune` command: LightningCLI with pruning subcommands as Trainer methods."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from clip_prune.callbacks import PruningCallback, PruningOptions, check_constraint
from clip_prune.data.coco import CocoDataModule
from clip_prune.model.masking import mask_shapes
from clip_prune.model.module import MaskedCLIPModule
from clip_prune.outputs import RunDirectory
from clip_prune.pruning.fisher import load_fisher


class ClipPruneTrainer(L.Trainer):
    """A Lightning Trainer with clip-prune's subcommands."""

    def prune(
        self,
        model: MaskedCLIPModule,
        datamodule: CocoDataModule,
        constraint: float | None = None,
        output_dir: str = "outputs/prune",
        fisher: str | None = None,
        overwrite: bool = False,
        options: PruningOptions | None = None,
    ) -> None:
        """Gather Fisher information on calibration data, then search, rearrange and rescale the masks.

        Args:
            constraint: fraction of the vision encoder's FLOPs to keep, in (0, 1]; leave it out to
                only gather the statistics (fisher.safetensors) for later `--fisher` runs.
            output_dir: run directory to write (refused if it exists, unless --overwrite).
            fisher: fisher.safetensors of an earlier run: skip the gradient pass and reuse it.
            overwrite: replace an existing output directory.
            options: pruning stages and rescaling settings (see `--options.help PruningOptions`).
        """
        if constraint is not None:
            check_constraint(constraint)
        run = RunDirectory(output_dir, overwrite=overwrite)
        statistics = None
        if fisher is not None:
            statistics = load_fisher(fisher, *mask_shapes(model.vision_config))
            model.collect_fisher = False
            # The loop still runs (for the callback's hooks and the calibration data); one batch suffices.
            self.limit_val_batches = 1
        self.callbacks.append(PruningCallback(run, constraint, options or PruningOptions(), statistics))
        self.validate(model, datamodule=datamodule, verbose=False)


class ClipPruneCLI(LightningCLI):
    """LightningCLI whose subcommands include `prune`; the checkpoint is named once (`--model.pretrained`)."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {
            "prune": {"model", "datamodule"},
            "validate": {"model", "dataloaders", "datamodule"},
        }

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.pretrained", "data.pretrained")


def main(args: list[str] | None = None) -> Any:
    """Entry point of `clip-prune`; `args` replaces sys.argv[1:] (for tests)."""
    return ClipPruneCLI(
        MaskedCLIPModule,
        CocoDataModule,
        trainer_class=ClipPruneTrainer,
        trainer_defaults={"inference_mode": False, "enable_checkpointing": False},
        save_config_kwargs={"overwrite": True},
        args=args,
        parser_kwargs={"description": "Prune the vision tower of a CLIP model without retraining."},
    )

