"""`ClipPruneTrainer`: a Lightning Trainer whose methods are clip-prune's subcommands (`clip-prune VERB`).

Each method is a verb: its typed arguments are the verb's options, the first line of its docstring its help
(LightningCLI reads both, `lightning/cli.py` lists the verbs). A method only checks, loads, calls the core and
prints; the work is in `core/` and in the callbacks.
"""

from __future__ import annotations

import json
import shutil
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import SaveConfigCallback

from clip_prune.core.deploy.onnx_export import export_pruned_onnx, require_onnxruntime
from clip_prune.core.deploy.saving import load_pruned, read_masks
from clip_prune.core.file_names import CONFIG_FILE, FISHER_FILE, REFIT_FILE, REPORT_FILE
from clip_prune.core.pruning.fisher import FisherStatistics, load_fisher
from clip_prune.core.pruning.masks import mask_shapes, mask_value_notes
from clip_prune.core.pruning.options import PruningOptions
from clip_prune.core.pruning.refit import RefitWeights, load_refit
from clip_prune.core.run.cascade import check_top_m
from clip_prune.core.run.finish import PrunedModelSpec, check_keeps_a_path, export_to
from clip_prune.core.run.outputs import RunDirectory
from clip_prune.core.run.report import RunReport, write_report
from clip_prune.core.run.summary import format_metrics, format_onnx_summary
from clip_prune.data.synthetic import synthetic_inputs, write_synthetic_coco
from clip_prune.files import check_file_free, record_written, write_json_atomically
from clip_prune.lightning.callbacks import PruningCallback, SensitivityCallback
from clip_prune.lightning.console import name_validation_bar
from clip_prune.lightning.data import CocoDataModule
from clip_prune.lightning.module import MaskedCLIPModule
from clip_prune.lightning.resume import find_reusable_statistics, statistics_provenance
from clip_prune.startup import STARTUP
from clip_prune.towers import inputs_to, tower_of


def check_same_origin(pruned: Any, dense: Any, path: str) -> Any:
    """`pruned`, after checking that it was cut from `dense`: pruning leaves everything but the encoder layers alone."""
    pruned_tower, dense_tower = tower_of(pruned), tower_of(dense)
    if pruned_tower.family != dense_tower.family or pruned_tower.has_text != dense_tower.has_text:
        raise ValueError(f"--pruned {path} and --model.pretrained differ in kind: another family, or one of them is "
                         "vision-only")
    untouched = dict(tower_of(pruned).vision.embeddings.named_parameters())
    reference = dict(tower_of(dense).vision.embeddings.named_parameters())
    same = untouched.keys() == reference.keys() and all(
        untouched[name].shape == reference[name].shape and torch.equal(untouched[name].cpu(), reference[name].cpu())
        for name in reference)
    if not same:
        raise ValueError(
            f"--pruned {path} was not cut from --model.pretrained (their patch embeddings differ); pass the "
            "checkpoint it was pruned from"
        )
    return pruned


def resolve_pruned(path: str) -> str:
    """The pruned model directory for `--pruned`: PATH itself, or PATH/pruned when PATH is a `prune` run directory."""
    inner = Path(path) / "pruned"
    return str(inner) if not (Path(path) / "config.json").exists() and (inner / "config.json").is_file() else path


def verification_inputs(datamodule: CocoDataModule, image_size: int | None,
                        count: int = 8) -> tuple[dict[str, torch.Tensor], str]:
    """Images to check the pruned model on (the tower's inputs): calibration images, or synthetic ones without
    --data.root, drawn at `image_size` px (64 where the family has no input size: SigLIP2 resizes to its patches)."""
    if datamodule.hparams.root is not None:
        return datamodule.sample_inputs(count), "calibration images"
    inputs = synthetic_inputs(count, image_size or 64, datamodule.image_processor())
    return inputs, "synthetic images (no --data.root)"


def check_refit_present(refit_file: Path) -> None:
    """Refuse masks of a `weights` run without their refit columns: they alone would save a worse model."""
    report = refit_file.parent / REPORT_FILE
    if refit_file.is_file() or not report.is_file():
        return
    try:
        method = json.loads(report.read_text()).get("options", {}).get("reconstruct")
    except (json.JSONDecodeError, AttributeError):
        return
    if method == "weights":
        raise FileNotFoundError(
            f"{report} says these masks come with refit columns (--options.reconstruct weights), but "
            f"{refit_file} is missing; copy it beside the masks (without it the saved model loses the reconstruction)"
        )


def save_resolved_config(trainer: L.Trainer, run: RunDirectory) -> None:
    """Write the run's resolved configuration (all defaults filled in) as `config.yaml` beside its outputs."""
    saver = next((callback for callback in trainer.callbacks if isinstance(callback, SaveConfigCallback)), None)
    if saver is not None and trainer.is_global_zero:
        run.file(CONFIG_FILE).write_text(saver.parser.dump(saver.config, skip_none=False))


class ClipPruneTrainer(L.Trainer):
    """A Lightning Trainer with clip-prune's subcommands."""

    def prune(
        self,
        model: MaskedCLIPModule,
        datamodule: CocoDataModule,
        constraint: float | list[float] | None = None,
        output_dir: str = "outputs/prune",
        fisher: str | None = None,
        overwrite: bool = False,
        options: PruningOptions | None = None,
        cascade_top_m: list[int] | None = None,
        constraint_type: Literal["macs", "latency"] = "macs",
    ) -> None:
        """Gather Fisher information on calibration data, then search, rearrange and reconstruct, in steps.

        Args:
            constraint: fraction of the vision encoder's MACs (or latency, see --constraint_type) to
                keep, in (0, 1]; or several ('[0.75, 0.5, 0.3]'): one chain of steps through all of them,
                each saved as a run of its own (OUTPUT_DIR/c0.5/...) beside the trade-off table and plot
                (tradeoff.csv, tradeoff.png); leave it out to only gather the statistics (fisher.safetensors)
                for later `--fisher` runs.
            output_dir: run directory to write (refused if it exists, unless --overwrite).
            fisher: fisher.safetensors of an earlier run: skip the first gradient pass and reuse it (linked
                into the run, keeping its own metadata; later steps of iterative pruning gather their own).
                Without it, statistics left by an interrupted run into the same output_dir are reused
                when model, data and sampling match.
            overwrite: replace an existing output directory.
            options: pruning stages, steps and reconstruction settings (see `--options.help PruningOptions`).
            cascade_top_m: also evaluate text-to-image search where the pruned model ranks the gallery
                and the dense model re-ranks each caption's top M, for each M given (e.g. '[10, 50]').
            constraint_type: `macs` (analytic MACs) or `latency`: a fraction of the dense tower's latency,
                measured on the run's device at the data batch size (latency_table.json, cached).
        """
        STARTUP.lap("cli")
        run = RunDirectory(output_dir, overwrite=overwrite,
                           inputs=(model.hparams.pretrained, fisher, *datamodule.input_paths()))
        callback = PruningCallback(run, constraint, options or PruningOptions(),  # checks the constraint
                                   cascade_top_m=cascade_top_m, constraint_type=constraint_type)
        model.check_loss(tokenizer_available=datamodule.tokenizer() is not None)
        reused = self._statistics_to_reuse(model, datamodule, run, fisher)
        self.callbacks.append(callback)
        with run.writing(keep=FISHER_FILE) if self.is_global_zero else nullcontext():
            save_resolved_config(self, run)
            summary = callback.prune(self, model, datamodule, partial(self.fisher_pass, model, datamodule), reused)
        if summary is not None:  # rank zero, once the progress bar is done
            print(summary)
        if reused is not None and fisher is None and self.is_global_zero:  # an interrupted run's statistics
            shutil.rmtree(reused[1].parent, ignore_errors=True)  # its statistics now live in the finished run

    def fisher_pass(self, model: MaskedCLIPModule, datamodule: CocoDataModule, head_mask: torch.Tensor | None = None,
                    neuron_mask: torch.Tensor | None = None, refit: RefitWeights | None = None,
                    gather_fisher: bool = True, batches: int | None = None) -> FisherStatistics | None:
        """One validation pass over the calibration data with the model under these masks and refit columns (None:
        dense; `MaskedCLIPModule.masked_as`): the module gathers the Fisher statistics (summed across ranks), the
        callbacks see its batches. `gather_fisher` False: only the first `batches` batches are read, for their
        images."""
        name_validation_bar(self, "Fisher pass" if gather_fisher else "Calibration images")
        all_batches = self.limit_val_batches
        self.limit_val_batches = all_batches if batches is None else batches
        try:
            with model.masked_as(head_mask, neuron_mask, refit, gather_fisher):
                self.validate(model, datamodule=datamodule, verbose=False)
                return model.statistics() if gather_fisher else None
        finally:
            self.limit_val_batches = all_batches

    def _statistics_to_reuse(self, model: MaskedCLIPModule, datamodule: CocoDataModule, run: RunDirectory,
                             fisher: str | None) -> tuple[FisherStatistics, Path] | None:
        """Statistics that spare the first gradient pass, and their file: `--fisher`, or an interrupted run's into
        the same output directory when model, data and sampling match."""
        if fisher is None and run.interrupted_runs():
            datamodule.setup("validate")  # the hash of the calibration sample decides whether the statistics fit
            provenance = statistics_provenance(model, datamodule, self.world_size)
            fisher = find_reusable_statistics(run, provenance, self.is_global_zero)
        if fisher is None:
            return None
        return load_fisher(fisher, *mask_shapes(model.vision_config), model.hparams.pretrained), Path(fisher)

    def apply(
        self,
        model: MaskedCLIPModule,
        datamodule: CocoDataModule,
        masks: str,
        output_dir: str = "outputs/apply",
        overwrite: bool = False,
        latency_repeats: int = 15,
        cascade_top_m: list[int] | None = None,
    ) -> None:
        """Apply saved masks (head_mask.pt, neuron_mask.pt) and save the physically pruned model.

        Args:
            masks: folder with head_mask.pt [L, H] and neuron_mask.pt [L, F] (and refit.safetensors, the refit
                columns of a `weights` reconstruction), from `clip-prune prune` or the original tool (a
                missing neuron_mask.pt keeps every neuron); or one head mask
                file such as a `clip-prune sensitivity` run's DIR/head_mask_3.pt (neurons from the
                neuron_mask.pt beside it).
            output_dir: Hugging Face directory to write (refused if it exists, unless --overwrite).
            overwrite: replace an existing output directory.
            latency_repeats: timed forward passes per model for the latency figures (their median and
                spread are reported).
            cascade_top_m: also evaluate the pruned-then-dense search cascade re-ranking each
                caption's top M, for each M given (e.g. '[10, 50]').
        """
        cascade_top_m = check_top_m(cascade_top_m)
        masks_folder = Path(masks) if Path(masks).is_dir() else Path(masks).parent
        run = RunDirectory(output_dir, overwrite=overwrite,
                           inputs=(model.hparams.pretrained, masks_folder, *datamodule.input_paths()))
        head_mask, neuron_mask = read_masks(masks, model.vision_config)
        check_keeps_a_path(model.model, head_mask)  # before any data is read
        refit_file = masks_folder / REFIT_FILE
        refit = (load_refit(refit_file, model.model, head_mask, neuron_mask, model.hparams.pretrained)
                 if refit_file.is_file() else None)
        check_refit_present(refit_file)
        notes = mask_value_notes(head_mask, neuron_mask, binary=refit is not None)
        device = self.strategy.root_device
        dense = model.model.to(device)
        model.remove_masks()
        with run.writing():
            inputs, verified_on = verification_inputs(datamodule, getattr(model.vision_config, "image_size", None))
            save_resolved_config(self, run)
            pruned, export = export_to(run, PrunedModelSpec(
                dense, head_mask, neuron_mask, model.hparams.pretrained,
                inputs_to(model.tower.vision_inputs(inputs), device), refit, latency_repeats, folder=""))
            metrics = (datamodule.evaluator(device).compare(dense, pruned, cascade_top_m)
                       if datamodule.has_evaluation_data() else None)
            summary = write_report(run, RunReport(model.hparams.pretrained, export=export, metrics=metrics,
                                                  facts={"masks": str(masks), "verified_on": verified_on},
                                                  warnings=notes))
        print(summary)

    def evaluate(
        self,
        model: MaskedCLIPModule,
        datamodule: CocoDataModule,
        pruned: str | None = None,
        output_json: str | None = None,
        overwrite: bool = False,
        cascade_top_m: list[int] | None = None,
    ) -> dict[str, Any]:
        """Retrieval recall@k (and zero-shot accuracy) of the dense model and, if given, a pruned one.

        Args:
            pruned: a directory written by `clip-prune apply`, or a `clip-prune prune` run directory
                (its DIR/pruned is used).
            output_json: also write the metrics to this JSON file.
            overwrite: replace an existing `output_json`.
            cascade_top_m: also evaluate text-to-image search where the pruned model ranks the gallery
                and the dense model re-ranks each caption's top M, for each M given (e.g. '[10, 50]').
        """
        if check_top_m(cascade_top_m) and pruned is None:
            raise ValueError("--cascade_top_m needs a pruned model for the first stage: pass --pruned DIR")
        if pruned is None and not model.tower.has_text:
            raise ValueError(f"{model.hparams.pretrained} is vision-only: without a text tower it has no retrieval or "
                             "zero-shot metrics; pass --pruned DIR to measure how closely a pruned model's image "
                             "embeddings follow it")
        if output_json is not None:
            check_file_free(output_json, overwrite)
        if not datamodule.has_evaluation_data():
            root = datamodule.hparams.root
            raise FileNotFoundError(
                "no evaluation data: " + ("--data.root is not set" if root is None else
                                          f"{Path(root) / datamodule.hparams.val_captions} does not exist")
                + " and --data.zero_shot_root is not set"
            )
        device = self.strategy.root_device
        if pruned is not None:
            pruned = resolve_pruned(pruned)
        pruned_model = check_same_origin(load_pruned(pruned), model.model, pruned) if pruned is not None else None
        model.remove_masks()
        evaluator = datamodule.evaluator(device)
        if pruned_model is not None:
            pruned_model.to(device)
        metrics = evaluator.compare(model.model.to(device), pruned_model, cascade_top_m)
        print(format_metrics(metrics))
        if output_json is not None:
            write_json_atomically(Path(output_json), metrics.to_json(), overwrite)
        return metrics.to_json()

    def sensitivity(
        self,
        model: MaskedCLIPModule,
        datamodule: CocoDataModule,
        output_dir: str = "outputs/sensitivity",
        stop_ratio: float = 0.8,
        stop_metric: str = "retrieval/i2t_R@1",
        overwrite: bool = False,
    ) -> None:
        """Iterative sensitivity pruning: each round reduces one more layer to its best head (head_mask_{i}.pt).

        Args:
            output_dir: run directory to write (refused if it exists, unless --overwrite).
            stop_ratio: stop when the round's metric falls below this fraction of the dense model's.
            stop_metric: `task/name` of the metric watched for the early stop (needs evaluation data),
                e.g. retrieval/i2t_R@1, retrieval/t2i_R@5 or zero_shot/top1.
            overwrite: replace an existing output directory.
        """
        run = RunDirectory(output_dir, overwrite=overwrite,
                           inputs=(model.hparams.pretrained, *datamodule.input_paths()))
        callback = SensitivityCallback(run, stop_ratio, stop_metric)  # checks the stop settings
        model.check_loss(tokenizer_available=datamodule.tokenizer() is not None)
        self.callbacks.append(callback)
        with run.writing() if self.is_global_zero else nullcontext():
            save_resolved_config(self, run)
            summary = callback.prune(self, model, datamodule, partial(self.fisher_pass, model, datamodule))
        if summary is not None:
            print(summary)
        self.strategy.barrier()

    def make_demo_data(self, root: str = "demo_data", num_train: int = 2000, num_val: int = 500, image_size: int = 64,
                       seed: int = 0, overwrite: bool = False, zero_shot_per_class: int = 40,
                       model: None = None) -> None:
        """Write the synthetic COCO-format demo data set (shapes with colours, sizes and positions).

        Args:
            root: folder to create (train2017/, val2017/, annotations/).
            num_train: calibration / training images.
            num_val: evaluation images (5 captions each).
            image_size: image side in pixels.
            seed: the images and captions are byte-identical for a seed.
            overwrite: replace an existing folder.
            zero_shot_per_class: single-shape images per shape kind in ROOT/zeroshot/ (an ImageFolder
                tree for zero-shot accuracy; 0 writes none).
            model: none (LightningCLI hands every verb a model; this one needs none).
        """
        path = write_synthetic_coco(root, num_train=num_train, num_val=num_val, image_size=image_size, seed=seed,
                                    overwrite=overwrite, zero_shot_per_class=zero_shot_per_class)
        print(f"clip-prune: wrote the demo data set to {path}")

    def export_onnx(self, pruned: str, output: str | None = None, batch_size: int = 8, latency_repeats: int = 10,
                    overwrite: bool = False, model: None = None) -> dict[str, Any]:
        """Export a pruned model's vision tower to ONNX (dynamic batch), check it under onnxruntime, time it.

        Args:
            pruned: directory written by `clip-prune prune` (DIR/pruned, or DIR itself) or `clip-prune apply`.
            output: ONNX file to write; PRUNED/onnx/model.onnx if not given. The report (parity,
                onnxruntime latency of the dense shapes vs the pruned model) goes beside it as
                OUTPUT_report.json.
            batch_size: images per batch for the parity check (also run at batch 1) and the latency.
            latency_repeats: timed onnxruntime runs per model.
            overwrite: replace an existing output file.
            model: none (LightningCLI hands every verb a model; this one needs none).
        """
        require_onnxruntime()  # the optional onnx extra, before any work
        pruned = resolve_pruned(pruned)  # a `prune` run directory means its pruned/ model
        path = Path(output) if output is not None else Path(pruned) / "onnx" / "model.onnx"
        report_path = path.with_name(f"{path.stem}_report.json")
        check_file_free(path, overwrite, record=report_path)  # the report says whose the ONNX file is
        check_file_free(report_path, overwrite)
        export = export_pruned_onnx(pruned, path, batch_size, latency_repeats)
        write_json_atomically(report_path, {"describes": path.name, **export.to_json()}, overwrite=True)
        for written in (path, report_path):
            record_written(written)
        print(format_onnx_summary(export))
        print(f"clip-prune: wrote {path}")
        return export.to_json()


# Verbs are named like their method, in the command line's spelling (a Python name cannot hold a hyphen).
for _verb in ("make_demo_data", "export_onnx"):
    setattr(ClipPruneTrainer, _verb.replace("_", "-"), getattr(ClipPruneTrainer, _verb))
