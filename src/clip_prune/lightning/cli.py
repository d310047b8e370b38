"""The `clip-prune` command: LightningCLI with pruning subcommands as Trainer methods."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from jsonargparse import CLI, set_parsing_settings
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from clip_prune.core.cascade import check_top_m
from clip_prune.core.finish import export_pruned
from clip_prune.core.fisher import load_fisher
from clip_prune.core.masks import mask_shapes
from clip_prune.core.outputs import RunDirectory, write_json_atomically
from clip_prune.core.pipeline import PruningOptions
from clip_prune.core.refit import REFIT_FILE, load_refit
from clip_prune.core.saving import load_pruned, read_masks
from clip_prune.core.summary import format_summary
from clip_prune.data.synthetic import synthetic_inputs, write_synthetic_coco
from clip_prune.lightning.callbacks import PruningCallback, SensitivityCallback
from clip_prune.lightning.console import (
    DEBUG_VARIABLE,
    ClipPruneArgumentParser,
    debug_requested,
    name_validation_bar,
    quiet_the_libraries,
    user_error,
)
from clip_prune.lightning.data import CocoDataModule
from clip_prune.lightning.module import MaskedCLIPModule
from clip_prune.lightning.resume import find_reusable_statistics, statistics_provenance
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
    """Refuse masks of a `weights` run without their refit columns: they alone would export a worse model."""
    report = refit_file.parent / "report.json"
    if refit_file.is_file() or not report.is_file():
        return
    try:
        method = json.loads(report.read_text()).get("options", {}).get("reconstruct")
    except (json.JSONDecodeError, AttributeError):
        return
    if method == "weights":
        raise FileNotFoundError(
            f"{report} says these masks come with refit columns (--options.reconstruct weights), but "
            f"{refit_file} is missing; copy it beside the masks (without it the export loses the reconstruction)"
        )


class LoggerConfigCallback(SaveConfigCallback):
    """Lightning's config saver, but only into a logger's folder: without a logger it would write
    ./config.yaml over whatever is there; every run directory gets its own config.yaml anyway."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.logger is not None:
            super().setup(trainer, pl_module, stage)


def save_resolved_config(trainer: L.Trainer, run: RunDirectory) -> None:
    """Write the run's resolved configuration (all defaults filled in) as `config.yaml` beside its outputs."""
    saver = next((callback for callback in trainer.callbacks if isinstance(callback, SaveConfigCallback)), None)
    if saver is not None and trainer.is_global_zero:
        run.file("config.yaml").write_text(saver.parser.dump(saver.config, skip_none=False))


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
        cascade_top_m: list[int] | None = None,
        constraint_type: Literal["macs", "latency"] = "macs",
    ) -> None:
        """Gather Fisher information on calibration data, then search, rearrange and reconstruct, in steps.

        Args:
            constraint: fraction of the vision encoder's MACs (or latency, see --constraint_type) to
                keep, in (0, 1]; leave it out to only gather the statistics (fisher.safetensors) for
                later `--fisher` runs.
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
        run = RunDirectory(output_dir, overwrite=overwrite)
        callback = PruningCallback(run, constraint, options or PruningOptions(),  # checks the constraint
                                   cascade_top_m=cascade_top_m, constraint_type=constraint_type)
        model.check_loss(tokenizer_available=datamodule.tokenizer() is not None)
        all_batches = self.limit_val_batches
        resumed = None
        if fisher is None and run.interrupted_runs():
            datamodule.setup("validate")  # the hash of the calibration sample decides whether the statistics fit
            provenance = statistics_provenance(model, datamodule, self.world_size)
            resumed = fisher = find_reusable_statistics(run, provenance, self.is_global_zero)
        if fisher is not None:
            callback.statistics = load_fisher(fisher, *mask_shapes(model.vision_config), model.hparams.pretrained)
            callback.statistics_source = Path(fisher)
            model.collect_fisher = False
            # The loop still runs (for the callback's hooks and the calibration data); one batch suffices.
            self.limit_val_batches = 1
        self.callbacks.append(callback)
        save_resolved_config(self, run)
        with run.abandoned_on_error(keep="fisher.safetensors"):
            while not callback.finished:  # one validation pass (Fisher statistics) per pruning step
                name_validation_bar(self, "Fisher pass" if model.collect_fisher else "Calibration batch")
                self.validate(model, datamodule=datamodule, verbose=False)
                model.collect_fisher, self.limit_val_batches = True, all_batches
        if callback.summary is not None:  # rank zero, once the progress bar is done
            print(callback.summary)
        if resumed is not None and self.is_global_zero:  # its statistics now live in the finished run
            shutil.rmtree(resumed.parent, ignore_errors=True)


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
        """Apply saved masks (head_mask.pt, neuron_mask.pt) and export the physically pruned model.

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
        run = RunDirectory(output_dir, overwrite=overwrite)
        head_mask, neuron_mask = read_masks(masks, model.vision_config)
        refit_file = (Path(masks) if Path(masks).is_dir() else Path(masks).parent) / REFIT_FILE
        refit = load_refit(refit_file, model.model, head_mask, neuron_mask) if refit_file.is_file() else None
        check_refit_present(refit_file)
        device = self.strategy.root_device
        dense = model.model.to(device)
        model.masks.remove()
        with run.abandoned_on_error():
            inputs, verified_on = verification_inputs(datamodule, getattr(model.vision_config, "image_size", None))
            pruned, report = export_pruned(dense, head_mask, neuron_mask, run.staging, model.hparams.pretrained,
                                           inputs_to(model.tower.vision_inputs(inputs), device), latency_repeats,
                                           refit)
            save_resolved_config(self, run)
            report = {"model": model.hparams.pretrained, "masks": str(masks), "verified_on": verified_on, **report}
            if datamodule.has_evaluation_data():
                evaluator = datamodule.evaluator(device)
                report["metrics"] = evaluator.compare(dense, pruned, cascade_top_m)
            run.write_json("report.json", report)
        print(format_summary(report))
        print(f"clip-prune: wrote {run.commit()}")

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
        if output_json is not None and Path(output_json).exists() and not overwrite:
            raise FileExistsError(f"{output_json} exists; choose another --output_json or pass --overwrite true")
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
        model.masks.remove()
        evaluator = datamodule.evaluator(device)
        if pruned_model is not None:
            pruned_model.to(device)
        metrics = evaluator.compare(model.model.to(device), pruned_model, cascade_top_m)
        print(format_summary({"metrics": metrics}))
        if output_json is not None:
            write_json_atomically(Path(output_json), metrics, overwrite)
        return metrics


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
        run = RunDirectory(output_dir, overwrite=overwrite)
        callback = SensitivityCallback(run, stop_ratio, stop_metric)  # checks the stop settings
        model.check_loss(tokenizer_available=datamodule.tokenizer() is not None)
        self.callbacks.append(callback)
        name_validation_bar(self, "Head scores")
        save_resolved_config(self, run)
        with run.abandoned_on_error():
            while not callback.finished:
                self.validate(model, datamodule=datamodule, verbose=False)
        report = callback.report()
        if self.is_global_zero:
            run.write_json("report.json", {"model": model.hparams.pretrained, **report})
            for entry in report["rounds"]:
                print(f"  round {entry['round']:2d}: layer {entry['layer']:2d} keeps head {entry['head']:2d}, "
                      f"MACs {entry['macs_ratio']:.3f}" + (f", metric {entry['metric']:.2f}" if "metric" in entry
                                                              else ""))
            print(f"clip-prune sensitivity: {stop_reason(report)}")
            print(f"clip-prune: wrote {run.commit()}")
        self.strategy.barrier()


def stop_reason(report: dict[str, Any]) -> str:
    """Why a sensitivity run ended, from its report: the early stop, or every layer reduced."""
    last = report["rounds"][-1]
    if "stopped" in last:
        return f"stopped after round {last['round']}: {last['stopped']}"
    if report["dense_metric"] is None:
        return f"all {len(report['rounds'])} layers reduced to one head (no evaluation data, so no early stop)"
    return (f"all {len(report['rounds'])} layers reduced to one head; {report['stop_metric']} stayed above "
            f"{report['stop_ratio']} x dense {report['dense_metric']:.2f}")


class ClipPruneCLI(LightningCLI):
    """LightningCLI whose subcommands include `prune`; the checkpoint is named once (`--model.pretrained`)."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {
            "prune": {"model", "datamodule"},
            "apply": {"model", "datamodule"},
            "evaluate": {"model", "datamodule"},
            "sensitivity": {"model", "datamodule"},
        }

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand == "sensitivity":
            # Each round rescores the heads on 128 samples, as the original CLIP adaptation did (DESIGN.md).
            parser.set_defaults({"data.num_samples": 128})
        return parser

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.pretrained", "data.pretrained")


def make_demo_data(root: str = "demo_data", num_train: int = 2000, num_val: int = 500, image_size: int = 64,
                   seed: int = 0, overwrite: bool = False, zero_shot_per_class: int = 40) -> None:
    """Write the synthetic COCO-format demo data set (shapes with colours, sizes and positions).

    Args:
        root: folder to create (train2017/, val2017/, annotations/).
        num_train: calibration / training images.
        num_val: evaluation images (5 captions each).
        image_size: image side in pixels.
        seed: the data set is byte-identical for a seed.
        overwrite: replace an existing folder.
        zero_shot_per_class: single-shape images per shape kind in ROOT/zeroshot/ (an ImageFolder
            tree for zero-shot accuracy; 0 writes none).
    """
    path = write_synthetic_coco(root, num_train=num_train, num_val=num_val, image_size=image_size, seed=seed,
                                overwrite=overwrite, zero_shot_per_class=zero_shot_per_class)
    print(f"clip-prune: wrote the demo data set to {path}")


def export_onnx(pruned: str, output: str | None = None, batch_size: int = 8, latency_repeats: int = 10,
                overwrite: bool = False) -> dict[str, Any]:
    """Export a pruned model's vision tower to ONNX (dynamic batch), check it under onnxruntime, time it.

    Args:
        pruned: directory written by `clip-prune prune` (DIR/pruned) or `clip-prune apply`.
        output: ONNX file to write; PRUNED/onnx/model.onnx if not given. The report (parity,
            onnxruntime latency of the dense shapes vs the pruned model) goes beside it as
            OUTPUT_report.json.
        batch_size: images per batch for the parity check (also run at batch 1) and the latency.
        latency_repeats: timed onnxruntime runs per model.
        overwrite: replace an existing output file.
    """
    from clip_prune.core.onnx_export import export_pruned_onnx  # needs the optional onnx extra

    pruned = resolve_pruned(pruned)  # a `prune` run directory means its pruned/ model
    path = Path(output) if output is not None else Path(pruned) / "onnx" / "model.onnx"
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; choose another --output or pass --overwrite true")
    report = export_pruned_onnx(pruned, path, batch_size, latency_repeats)
    write_json_atomically(path.with_name(f"{path.stem}_report.json"), report, overwrite=True)
    print(format_summary(report))
    print(f"  onnxruntime vs PyTorch: max abs diff {report['parity']['max_abs_diff']:.2g} "
          f"(tolerance {report['parity']['tolerance']:.2g})")
    print(f"clip-prune: wrote {path}")
    return report


EXTRA_COMMANDS = {
    "make-demo-data": "write the synthetic COCO-format demo data set",
    "export-onnx": "write a pruned model's vision tower as ONNX, checked with onnxruntime",
    "fit": "train a CLIP contrastively (builds the demo model: --config configs/demo_train.yaml)",
}


def main(args: list[str] | None = None) -> None:
    """Entry point of `clip-prune`; `args` replaces sys.argv[1:] (for tests).

    A user error (bad path, value or file, refused overwrite) prints one `clip-prune: error:` block and exits
    with status 2; `--debug` or CLIP_PRUNE_DEBUG=1 raises it with its traceback instead, as internal errors are.
    """
    argv = list(sys.argv[1:] if args is None else args)
    if "--debug" in argv:
        argv = [arg for arg in argv if arg != "--debug"]
        os.environ[DEBUG_VARIABLE] = "1"  # DDP launches this command again in each process: tell them too
        if args is None:
            sys.argv[1:] = argv  # LightningCLI reads sys.argv itself (it warns when given both)
    debug = debug_requested()
    quiet_the_libraries(debug)
    try:
        _dispatch(argv, None if args is None else argv)
    except SIGTERMException:
        # Lightning stops a terminated run with a SystemExit without a code, i.e. status 0: a scheduler would
        # take the pre-empted job for a finished one. 128 + SIGTERM, as the shell reports it.
        print("clip-prune: stopped by SIGTERM; rerun the same command to resume from its statistics", file=sys.stderr)
        sys.exit(143)
    except Exception as error:
        cause = user_error(error)
        if debug or cause is None:
            raise
        print(f"clip-prune: error: {cause}\n(run with --debug or {DEBUG_VARIABLE}=1 to see the traceback)",
              file=sys.stderr)
        sys.exit(2)


def _dispatch(argv: list[str], args: list[str] | None) -> None:
    """Run the subcommand of `argv`; `args` is what LightningCLI gets (None: it reads sys.argv)."""
    # Dataclass fields document themselves with a docstring below them: show those in --help
    # (reading them costs about a second, so only when help is asked for).
    set_parsing_settings(docstring_parse_attribute_docstrings=any(arg.endswith("help") for arg in argv))
    if argv[:1] == ["make-demo-data"]:
        CLI(make_demo_data, args=argv[1:], prog="clip-prune make-demo-data")
        return
    if argv[:1] == ["export-onnx"]:
        CLI(export_onnx, args=argv[1:], prog="clip-prune export-onnx", as_positional=False)
        return
    if argv[:1] == ["fit"]:
        from clip_prune.lightning.training import TrainingCLI

        TrainingCLI(args=args)
        return
    extra = "; ".join(f"'{name}' ({text})" for name, text in EXTRA_COMMANDS.items())
    ClipPruneCLI(
        MaskedCLIPModule,
        CocoDataModule,
        trainer_class=ClipPruneTrainer,
        parser_class=ClipPruneArgumentParser,
        trainer_defaults={"inference_mode": False, "enable_checkpointing": False},
        save_config_callback=LoggerConfigCallback,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        args=args,
        parser_kwargs={"description": f"Prune the vision tower of a CLIP model without retraining. Also: {extra}. "
                                      f"Add --debug (or set {DEBUG_VARIABLE}=1) to see the traceback of an error."},
    )
