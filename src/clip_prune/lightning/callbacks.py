"""Callbacks that turn Fisher passes into masks: `PruningCallback` (search → rearrange → reconstruct, in one or
more steps, then save the pruned model) and `SensitivityCallback` (one layer reduced to its best head per pass)."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import lightning as L
import torch

from clip_prune.core.file_names import (
    FISHER_FILE,
    LATENCY_TABLE_FILE,
    NEURON_MASK_FILE,
    PRUNED_FOLDER,
    REPORT_FILE,
    TRADEOFF_CSV,
    TRADEOFF_JSON,
    TRADEOFF_PNG,
)
from clip_prune.core.pruning.chain import prune_in_steps
from clip_prune.core.pruning.costs import mac_costs
from clip_prune.core.pruning.fisher import FisherStatistics, save_fisher
from clip_prune.core.pruning.latency_budget import NOISE_MARGIN
from clip_prune.core.pruning.latency_table import LatencyTable, TableSource, cached_latency_table, write_table
from clip_prune.core.pruning.options import PruningOptions, requested_constraints, search_widths
from clip_prune.core.pruning.search import ConstraintType, SearchResult, WidthBudget
from clip_prune.core.pruning.sensitivity import choose_head, keep_single_head
from clip_prune.core.pruning.step import StepResult
from clip_prune.core.run.cascade import check_top_m
from clip_prune.core.run.evaluation import Comparison, Evaluator
from clip_prune.core.run.finish import PrunedModelSpec, export_to, write_masks
from clip_prune.core.run.latency_check import candidate_timer
from clip_prune.core.run.metrics import METRIC_NAMES
from clip_prune.core.run.outputs import RunDirectory, RunFolder, link_or_copy
from clip_prune.core.run.report import (
    PruningRecord,
    RunReport,
    SensitivityRecord,
    SensitivityRound,
    StatisticsRecord,
    relative_source,
    write_report,
)
from clip_prune.core.run.tradeoff import format_tradeoff, plot_tradeoff, point_folder, tradeoff_csv, tradeoff_rows
from clip_prune.core.timing import Timing, timed
from clip_prune.data.sampling import PADDING
from clip_prune.lightning.data import CocoDataModule
from clip_prune.lightning.module import MaskedCLIPModule
from clip_prune.lightning.resume import statistics_provenance
from clip_prune.lightning.tensorboard import (
    log_fisher,
    log_masks,
    log_metrics,
    log_reconstruction,
    log_search_curve,
    log_sensitivity_round,
    log_tradeoff,
)
from clip_prune.startup import STARTUP
from clip_prune.towers import VisionInputs, inputs_to

Result = TypeVar("Result")

VERIFICATION_IMAGES = 8
"""Calibration images the saved model is checked on against the masked one."""
BUDGET_TIMING_REPEATS = 9
"""Timed pairs of dense and candidate tower at a time, until the ratio's error is within the budget's tolerance over
the noise margin (at most twice as many; the saved model's report times it again)."""


def on_rank_zero(trainer: L.Trainer, work: Callable[[], Result]) -> Result | None:
    """`work()` on rank zero only (what it returns there, None elsewhere); every rank learns whether it failed, so no
    rank waits forever."""
    error = result = None
    if trainer.is_global_zero:
        try:
            result = work()
        except Exception as exception:  # re-raised below, after the other ranks are told
            error = exception
    failed = trainer.strategy.broadcast(error is not None)
    if error is not None:
        raise error
    if failed:
        raise RuntimeError("clip-prune failed on rank 0; its error is reported there")
    return result


FisherPassOf = Callable[..., FisherStatistics | None]
"""The Trainer's validation pass over the calibration data (`ClipPruneTrainer.fisher_pass`): called with the masks
and refit columns of the model to pass over (none: dense), whether to gather Fisher statistics, and how many batches
to read."""


class PruningCallback(L.Callback):
    """Solves, rearranges, reconstructs and exports: one `prune` run, top to bottom in `prune`.

    The Trainer provides the Fisher passes (the `MaskedCLIPModule`'s validation loop, on every device); this callback
    sees their batches through its hooks (it keeps the calibration images that reconstruction and the saved model's
    check run on), runs the steps of `clip_prune.core.pruning.chain.prune_in_steps` on their statistics, and saves,
    verifies, measures and evaluates the pruned model where the chain reaches a requested constraint.

    With several constraints the steps form one chain through all of them (`PruningOptions.step_constraints`), and
    each is saved into its own folder (`OUTPUT_DIR/c0.5/`, as a single run's directory); the run's own folder gets
    the trade-off of them all.

    Args:
        run: where the outputs go (staged, renamed into place at the end).
        constraint: fraction of the encoder's MACs to keep, in (0, 1], or several; None only saves the statistics.
        options: stages, steps and reconstruction settings.
        cascade_top_m: also measure the pruned-then-dense search cascade re-ranking these top M.
        constraint_type: `macs`, or `latency`: the constraint is a fraction of the dense tower's latency by a
            table measured on the run's device (docs/design.md, "Latency budget").
    """

    def __init__(self, run: RunDirectory, constraint: float | Sequence[float] | None, options: PruningOptions,
                 cascade_top_m: list[int] | None = None, constraint_type: ConstraintType = "macs") -> None:
        points = [] if constraint is None else requested_constraints(constraint, constraint_type)
        self.cascade_top_m = check_top_m(cascade_top_m)
        if self.cascade_top_m and (constraint is None or not options.save):
            raise ValueError("--cascade_top_m needs the saved pruned model: give --constraint and keep "
                             "--options.save true")
        self.run = run
        self.options = options
        self.constraint_type = constraint_type
        self.constraint = points[-1] if points else None
        """The smallest constraint: where the chain of steps ends."""
        self.chain = options.step_constraints(points) if points else []
        self.points = {step: value for step, value in enumerate(self.chain) if value in points} \
            if len(points) > 1 else {}
        """Step index → the requested constraint it reaches, for a run over several constraints."""
        self.widths: WidthBudget | None = None
        self.table_source: TableSource | None = None
        """Where rank zero's latency table came from (measured, cached and checked, re-measured)."""
        self.timings: dict[str, float] = {}
        self.steps: list[StepResult] = []
        self._search_prepared = False
        self._calibration: list[VisionInputs] = []
        self._images_wanted = 0
        self._timer: Callable[[Any], Timing] | None = None
        self._evaluator: Evaluator | None = None

    # The run, top to bottom.

    def prune(self, trainer: L.Trainer, module: MaskedCLIPModule, datamodule: CocoDataModule,
              fisher_pass: FisherPassOf, reused: tuple[FisherStatistics, Path] | None = None) -> str | None:
        """Gather the dense model's statistics (or read `reused` ones, with where they came from), then step through
        the chain; save each requested constraint's model. Returns the summary to print (rank zero)."""
        statistics = self._first_pass(trainer, datamodule, fisher_pass, reused)
        source = None if reused is None else relative_source(reused[1], self.run.path.name)
        header = RunReport(module.hparams.pretrained,
                           StatisticsRecord(statistics.num_samples, source, STARTUP.report()))
        if trainer.is_global_zero:
            self._save_statistics(trainer, module, datamodule, statistics, None if reused is None else reused[1])
        if self.constraint is None:
            return on_rank_zero(trainer, lambda: write_report(self.run, replace(header, timings=dict(self.timings))))
        point_reports: dict[float, RunReport] = {}
        summary = None
        steps = prune_in_steps(
            module.model, statistics, self.chain, self.options, self._calibration if self._reconstructs() else [],
            lambda step: fisher_pass(step.head_mask, step.neuron_mask, step.refit),
            widths=self.widths, progress=trainer.is_global_zero,
            all_reduce=(lambda t: trainer.strategy.reduce(t, reduce_op="sum")) if trainer.world_size > 1 else None,
            latency_timer=lambda index: self._candidate_timer(trainer, module) if self._checks_latency(index) else None)
        for index, step in enumerate(steps):
            self.steps.append(step)
            for stage, seconds in step.timings.items():
                self.timings[stage] = self.timings.get(stage, 0.0) + seconds
            if index == 0:  # the first pass ran before the loop, and is already counted
                step.timings["fisher"] = self.timings["fisher"]
            self._log_step(trainer, index, step)
            last = index == len(self.chain) - 1
            if index in self.points or last:  # a requested constraint of several is saved as a run of its own
                folder = self.run.folder(point_folder(self.chain[index])) if index in self.points else self.run
                written = on_rank_zero(trainer, partial(self._export, trainer, module, datamodule, header, folder,
                                                        last))
                if written is not None:
                    report, summary = written
                    if index in self.points:
                        point_reports[self.chain[index]] = report
        if self.points:
            summary = on_rank_zero(trainer, lambda: self._write_tradeoff(trainer, header, point_reports))
        return summary

    def _first_pass(self, trainer: L.Trainer, datamodule: CocoDataModule, fisher_pass: FisherPassOf,
                    reused: tuple[FisherStatistics, Path] | None) -> FisherStatistics:
        """The dense model's statistics, and this rank's calibration images kept on the way (`on_validation_batch_end`:
        its share of `reconstruct_samples`, whose first batch also checks the saved model; without reconstruction,
        that batch alone). With `reused` statistics a pass without gradients reads only the batches that hold them."""
        self._images_wanted = (math.ceil(self.options.reconstruct_samples / trainer.world_size)
                               if self._reconstructs() else VERIFICATION_IMAGES)
        started = time.perf_counter()
        if reused is None:
            statistics = fisher_pass()
        else:
            batch_size = datamodule.hparams.batch_size
            fisher_pass(gather_fisher=False, batches=math.ceil(self._images_wanted / batch_size))
            statistics = reused[0]
        self.timings["fisher"] = time.perf_counter() - started
        self._images_wanted = 0
        return statistics

    def _export(self, trainer: L.Trainer, module: MaskedCLIPModule, datamodule: CocoDataModule,
                header: RunReport, folder: RunFolder, last: bool) -> tuple[RunReport, str]:
        """Rank zero: write the masks, refit columns and plan of the steps so far into `folder`, then save, verify,
        measure and evaluate the pruned model (`last`: no Fisher pass follows, so the masks' hooks may go) and write
        the report: `header` completed with what the steps reached. Returns the report and its summary."""
        step = self.steps[-1]
        write_masks(folder, step, module.hparams.pretrained)
        report = replace(header, pruning=PruningRecord(list(self.steps), self.chain, self.options,
                                                       mac_costs(module.vision_config), self.constraint_type,
                                                       self.widths, self.table_source))
        if self.options.save:
            if last:
                module.remove_masks()
            inputs = {name: value[:VERIFICATION_IMAGES] for name, value in self._calibration[0].items()}
            spec = PrunedModelSpec(module.model, step.head_mask, step.neuron_mask, module.hparams.pretrained, inputs,
                                   refit=step.refit, folder=PRUNED_FOLDER)
            pruned, report.export = timed(self.timings, "save", lambda: export_to(folder, spec))
            if datamodule.has_evaluation_data():
                report.metrics = timed(self.timings, "evaluate",
                                       lambda: self._evaluate(trainer, module, datamodule, pruned))
        report.timings = dict(self.timings)
        return report, write_report(folder, report)

    def _write_tradeoff(self, trainer: L.Trainer, header: RunReport, point_reports: dict[float, RunReport]) -> str:
        """Rank zero, after the last point: the trade-off of all points as a table (CSV, JSON), a picture and
        TensorBoard curves, and the run's own report."""
        rows = tradeoff_rows(point_reports)
        self.run.file(TRADEOFF_CSV).write_text(tradeoff_csv(rows))
        self.run.write_json(TRADEOFF_JSON, {"rows": rows})
        not_drawn = plot_tradeoff(rows, self.run.file(TRADEOFF_PNG))
        log_tradeoff(trainer, rows)
        constraints = sorted(point_reports, reverse=True)
        written = [TRADEOFF_CSV, TRADEOFF_JSON] + ([] if not_drawn else [TRADEOFF_PNG])
        report = replace(header, facts={"constraints": constraints,
                                        "points": [f"{point_folder(c)}/{REPORT_FILE}" for c in constraints],
                                        "tradeoff": written},
                         warnings=[not_drawn] if not_drawn else None, timings=dict(self.timings))
        summary = write_report(self.run, report)
        folders = ", ".join(point_folder(point) for point in constraints)
        return "\n".join([format_tradeoff(rows), f"  one run per constraint in {folders}; the trade-off in "
                          f"{', '.join(written)}", summary])

    # Hooks: what the Fisher passes show this callback.

    def on_validation_start(self, trainer: L.Trainer, pl_module: MaskedCLIPModule) -> None:
        if self._search_prepared:  # a later pass: the search is set up
            return
        STARTUP.lap("lightning_setup")  # the model on its device, the loop and its DataLoader made
        if self.constraint is not None:
            self._prepare_search(trainer, pl_module)  # refuses an unreachable budget before the first pass
            STARTUP.lap("latency_table" if self.constraint_type == "latency" else "search_setup")
        self._search_prepared = True

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: MaskedCLIPModule, outputs: Any,
                                batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        """Keep this rank's share of the calibration images (its DDP padding left out) as the first pass reads them,
        on the model's device."""
        wanted = self._images_wanted - sum(len(inputs["pixel_values"]) for inputs in self._calibration)
        if wanted <= 0:
            return
        real = batch["index"] != PADDING
        inputs = {name: value[real][:wanted] for name, value in pl_module.tower.vision_inputs(batch).items()}
        self._calibration.append(inputs_to(inputs, pl_module.device))

    # The parts.

    def _reconstructs(self) -> bool:
        return self.constraint is not None and self.options.reconstruct != "none"

    def _prepare_search(self, trainer: L.Trainer, pl_module: MaskedCLIPModule) -> None:
        """Choose how the search measures widths (the latency table, measured on the run's device, or multiples)
        and check that the constraint can be met at all."""
        measure = partial(self._latency_table, trainer, pl_module) if self.constraint_type == "latency" else None
        # The smallest constraint: the others are reached on the way.
        self.widths = search_widths(self.options, pl_module.model, self.constraint, pl_module.device, measure)

    def _latency_table(self, trainer: L.Trainer, pl_module: MaskedCLIPModule, multiple_of: int) -> LatencyTable:
        """The run's latency table: measured (or read from the cache) on rank zero, saved in the run, shared."""
        table = None
        if trainer.is_global_zero:
            datamodule = trainer.datamodule
            batch_size = datamodule.hparams.batch_size if datamodule is not None else 8
            table, self.table_source = cached_latency_table(
                pl_module.vision_config, batch_size, pl_module.device, next(pl_module.model.parameters()).dtype,
                pl_module.model.config._attn_implementation, multiple_of=multiple_of)
            print(f"clip-prune: latency table {self.table_source.describe()} ({table.key['device']}, batch "
                  f"{batch_size})", file=sys.stderr)
            write_table(table, self.run.file(LATENCY_TABLE_FILE))
        return trainer.strategy.broadcast(table)

    def _checks_latency(self, index: int) -> bool:
        """Whether step `index` reaches a requested latency budget: its search is checked by timing (the steps
        between two requested budgets are waypoints, left to the table)."""
        reaches = index == len(self.chain) - 1 or index in self.points
        return reaches and self.constraint_type == "latency" and self.widths is not None

    def _candidate_timer(self, trainer: L.Trainer, pl_module: MaskedCLIPModule) -> Callable[[Any], Timing]:
        """Rank zero times a candidate's pruned tower against the dense one at the table's batch on the run's
        device (its dense copy made once for all the run's budgets); every rank gets its ratio, so all search
        alike."""
        if self._timer is None and trainer.is_global_zero:
            inputs = pl_module.tower.example_inputs(self.widths.latency.key["batch_size"])
            self._timer = candidate_timer(pl_module.model, inputs, BUDGET_TIMING_REPEATS,
                                          self.options.latency_tolerance / NOISE_MARGIN, 2 * BUDGET_TIMING_REPEATS)
        timer = self._timer
        return lambda candidate: trainer.strategy.broadcast(timer(candidate) if timer is not None else None)

    def _save_statistics(self, trainer: L.Trainer, module: MaskedCLIPModule, datamodule: CocoDataModule,
                         statistics: FisherStatistics, source: Path | None) -> None:
        """Rank zero: the dense model's statistics into the run (a reused file linked, keeping its own metadata)."""
        target = self.run.file(FISHER_FILE)
        if source is None:
            save_fisher(target, statistics, module.hparams.pretrained,
                        statistics_provenance(module, datamodule, trainer.world_size))
        else:
            link_or_copy(source, target)
        log_fisher(trainer, statistics)

    def _log_step(self, trainer: L.Trainer, index: int, step: StepResult) -> None:
        """The step's masks after each stage, its search curve and reconstruction errors, in TensorBoard."""
        if index == 0 and isinstance(step.search, SearchResult):
            log_search_curve(trainer, step.search.objective_curve, step.search.num_heads)
        for number, (stage, masks) in enumerate(step.stage_masks.items(), start=1):
            log_masks(trainer, stage if len(self.chain) == 1 else f"step{index + 1}_{stage}", number, *masks)
        if step.reconstruction is not None:
            log_reconstruction(trainer, index + 1, step.reconstruction.errors)

    def _evaluate(self, trainer: L.Trainer, pl_module: MaskedCLIPModule, datamodule: CocoDataModule,
                  pruned: Any) -> Comparison:
        """Retrieval / zero-shot metrics of the dense and the pruned model (caption embeddings and the dense model's
        scores computed once for all points)."""
        if self._evaluator is None:
            self._evaluator = datamodule.evaluator(pl_module.device)
        metrics = self._evaluator.compare(pl_module.model, pruned, self.cascade_top_m)
        log_metrics(trainer, metrics)
        return metrics


class SensitivityCallback(L.Callback):
    """Iterative sensitivity pruning, top to bottom in `prune` (docs/design.md, "Sensitivity-based pruning").

    Each round is one Fisher pass (the Trainer's) under the current head mask; its head scores pick the next layer to
    reduce to its best head, `head_mask_{i}.pt` is written and, with evaluation data, the round's metric decides the
    early stop.

    Args:
        run: where the masks and the report go.
        stop_ratio: stop once the round's metric is below this fraction of the dense model's.
        stop_metric: `task/name` of the watched metric, e.g. `retrieval/i2t_R@1`.
    """

    def __init__(self, run: RunDirectory, stop_ratio: float, stop_metric: str) -> None:
        if not 0 <= stop_ratio <= 1.5:
            raise ValueError(f"--stop_ratio must be a fraction of the dense metric (e.g. 0.8), got {stop_ratio}")
        if stop_metric not in METRIC_NAMES:
            raise ValueError(f"--stop_metric {stop_metric!r} is not a metric clip-prune measures; choose one of "
                             f"{sorted(METRIC_NAMES)}")
        self.run = run
        self.stop_ratio = stop_ratio
        self.stop_metric = stop_metric
        self.rounds: list[SensitivityRound] = []
        self.evaluator: Evaluator | None = None
        self.dense_metric: float | None = None

    def prune(self, trainer: L.Trainer, module: MaskedCLIPModule, datamodule: CocoDataModule,
              fisher_pass: FisherPassOf) -> str | None:
        """Rounds until every layer keeps one head or the metric falls below the stop; returns the summary to print
        (rank zero)."""
        macs = mac_costs(module.vision_config)
        head_mask = torch.ones(macs.num_layers, macs.num_heads)
        neuron_mask = torch.ones(macs.num_layers, macs.num_neurons)
        reduced: set[int] = set()
        while len(reduced) < macs.num_layers:
            scores = fisher_pass(head_mask).head_fisher.cpu()  # synced across ranks, on their devices
            if not self.rounds:  # after the first pass: the model is on its device
                on_rank_zero(trainer, lambda: self._score_dense(module, datamodule))
            layer, head = choose_head(scores, reduced)
            reduced.add(layer)
            head_mask = keep_single_head(head_mask, layer, head)
            entry = SensitivityRound(len(self.rounds), layer, head, float(scores[layer, head]),
                                     macs.of_masks(head_mask, neuron_mask) / macs.dense)
            on_rank_zero(trainer, partial(self._finish_round, trainer, module, head_mask, entry))
            entry = trainer.strategy.broadcast(entry)  # rank zero's metric and stop decision for every rank
            self.rounds.append(entry)
            if entry.stopped is not None:
                break
        return on_rank_zero(trainer, partial(self._finish, module, neuron_mask))

    def _score_dense(self, module: MaskedCLIPModule, datamodule: CocoDataModule) -> None:
        """Rank zero: the dense model's metric, the reference of the early stop (if it can be measured)."""
        if not datamodule.has_evaluation_data() or not module.tower.has_text:
            print("clip-prune sensitivity: no evaluation data for this model, so no early stop; all rounds run",
                  file=sys.stderr)
            return
        self.evaluator = datamodule.evaluator(module.device)
        self.dense_metric = metric_value(self.evaluator(module.model, "dense"), self.stop_metric)

    def _finish_round(self, trainer: L.Trainer, module: MaskedCLIPModule, head_mask: torch.Tensor,
                      entry: SensitivityRound) -> None:
        """Rank zero: write the round's mask, measure it, decide the early stop."""
        self.run.save_tensor(f"head_mask_{entry.round}.pt", head_mask)
        if self.evaluator is not None:
            with module.masked_as(head_mask, gather_fisher=False):
                metrics = self.evaluator(module.model, f"round {entry.round}")
            entry.metric = metric_value(metrics, self.stop_metric)
            if entry.metric < self.stop_ratio * self.dense_metric:
                entry.stopped = (f"{self.stop_metric} {entry.metric:.2f} < {self.stop_ratio} x dense "
                                 f"{self.dense_metric:.2f}")
        log_sensitivity_round(trainer, entry)

    def _finish(self, module: MaskedCLIPModule, neuron_mask: torch.Tensor) -> str:
        """Rank zero: the neuron mask the head masks go with (all ones) and the report."""
        self.run.save_tensor(NEURON_MASK_FILE, neuron_mask)
        return write_report(self.run, RunReport(module.hparams.pretrained, sensitivity=SensitivityRecord(
            self.stop_metric, self.stop_ratio, self.dense_metric, self.rounds)))


def metric_value(metrics: dict[str, Any], name: str) -> float:
    """The metric `task/name` (e.g. `retrieval/i2t_R@1`) from an `Evaluator` result, with a clear error."""
    task, _, key = name.partition("/")
    try:
        return float(metrics[task][key])
    except KeyError:
        available = [f"{t}/{k}" for t, values in metrics.items() for k in values]
        raise ValueError(f"--stop_metric {name!r} is not measured here; choose one of {available}") from None
