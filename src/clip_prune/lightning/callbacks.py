"""Callbacks that turn Fisher passes into masks: `PruningCallback` (search → rearrange → reconstruct, in one or
more steps, then save the pruned model) and `SensitivityCallback` (one layer reduced to its best head per pass)."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch

from clip_prune.core.deploy.slicing import plan_from_masks, write_plan
from clip_prune.core.file_names import (
    FISHER_FILE,
    HEAD_MASK_FILE,
    LATENCY_TABLE_FILE,
    NEURON_MASK_FILE,
    PLAN_FILE,
    REFIT_FILE,
)
from clip_prune.core.pruning.costs import MacCosts, mac_costs
from clip_prune.core.pruning.fisher import FisherStatistics, save_fisher
from clip_prune.core.pruning.latency_budget import NOISE_MARGIN
from clip_prune.core.pruning.latency_table import LatencyTable, TableSource, cached_latency_table, write_table
from clip_prune.core.pruning.options import PruningOptions, requested_constraints
from clip_prune.core.pruning.refit import refit_applied, save_refit
from clip_prune.core.pruning.search import SearchResult, WidthBudget, check_reachable
from clip_prune.core.pruning.sensitivity import choose_head, keep_single_head
from clip_prune.core.pruning.step import StepResult, prune_step
from clip_prune.core.run.cascade import check_top_m
from clip_prune.core.run.evaluation import Evaluator
from clip_prune.core.run.finish import PrunedModelSpec, finish_run
from clip_prune.core.run.latency_check import candidate_timer
from clip_prune.core.run.metrics import METRIC_NAMES
from clip_prune.core.run.outputs import RunDirectory, RunFolder, link_or_copy
from clip_prune.core.run.tradeoff import format_tradeoff, plot_tradeoff, point_folder, tradeoff_csv, tradeoff_rows
from clip_prune.core.timing import Timing
from clip_prune.data.sampling import PADDING
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

BUDGET_TIMING_REPEATS = 9
"""Timed pairs of dense and candidate tower at a time, until the ratio's error is within the budget's tolerance over
the noise margin (at most twice as many; the saved model's report times it again)."""


def on_rank_zero(trainer: L.Trainer, work: Callable[[], None]) -> None:
    """Run `work` on rank zero only; every rank learns whether it failed, so no rank waits forever."""
    error = None
    if trainer.is_global_zero:
        try:
            work()
        except Exception as exception:  # re-raised below, after the other ranks are told
            error = exception
    failed = trainer.strategy.broadcast(error is not None)
    if error is not None:
        raise error
    if failed:
        raise RuntimeError("clip-prune failed on rank 0; its error is reported there")


class PruningCallback(L.Callback):
    """Turns the Fisher statistics of each validation pass into a pruning step, and the last step into a run.

    With K steps (`PruningOptions.steps`) the Trainer runs K validation passes: the first gathers Fisher
    statistics on the dense model (or reuses `statistics`), each later one on the model pruned so far (its
    masks hooked in, its refit columns written into the weights for the pass). After each pass
    `prune_step` searches the step's budget among the units still kept, rearranges and reconstructs
    (teacher: always the dense model); after the last, the masks are written and the pruned model saved and evaluated.

    With several constraints the steps form one chain through all of them (`PruningOptions.step_constraints`), and
    each is saved, verified, measured and evaluated where the chain reaches it, into its own folder
    (`OUTPUT_DIR/c0.5/`, as a single run's directory); the run's own folder gets the trade-off of them all.

    Args:
        run: where the outputs go (staged, renamed into place at the end).
        constraint: fraction of the encoder's MACs to keep, in (0, 1], or several; None only saves the statistics.
        options: stages, steps and reconstruction settings.
        statistics: statistics loaded from an earlier run (`--fisher`), used by the first step; None gathers them.
        cascade_top_m: also measure the pruned-then-dense search cascade re-ranking these top M.
        constraint_type: `macs`, or `latency`: the constraint is a fraction of the dense tower's latency by a
            table measured on the run's device (docs/design.md, "Latency budget").
    """

    def __init__(self, run: RunDirectory, constraint: float | Sequence[float] | None, options: PruningOptions,
                 statistics: FisherStatistics | None = None, cascade_top_m: list[int] | None = None,
                 constraint_type: Literal["macs", "latency"] = "macs") -> None:
        points = [] if constraint is None else requested_constraints(constraint, constraint_type)
        self.cascade_top_m = check_top_m(cascade_top_m)
        if self.cascade_top_m and (constraint is None or not options.save):
            raise ValueError("--cascade_top_m needs the saved pruned model: give --constraint and keep "
                             "--options.save true")
        self.run = run
        self.constraint = points[-1] if points else None
        """The smallest constraint: where the chain of steps ends."""
        self.constraint_type = constraint_type
        self.widths: WidthBudget | None = None
        self.table_source: TableSource | None = None
        self._timer: Callable[[Any], Timing] | None = None
        """Where rank zero's latency table came from (measured, cached and checked, re-measured)."""
        self._search_prepared = False
        self.options = options
        self.statistics = statistics
        self.constraints = options.step_constraints(points) if points else []
        self.points = {step: value for step, value in enumerate(self.constraints) if value in points} \
            if len(points) > 1 else {}
        """Step index → the requested constraint it reaches, for a run over several constraints."""
        self.point_reports: dict[float, dict[str, Any]] = {}
        self.steps: list[StepResult] = []
        self.timings: dict[str, float] = {}
        self.finished = False
        self._pruned_so_far = ExitStack()
        self._reconstruction_batches: list[torch.Tensor] | None = None
        self._evaluator: Evaluator | None = None
        self.statistics_source: Path | None = None
        """The file `statistics` were read from (`--fisher` or an interrupted run), linked into the run."""
        self.summary: str | None = None
        """What to print once the run is written (rank zero)."""

    def on_validation_start(self, trainer: L.Trainer, pl_module: MaskedCLIPModule) -> None:
        if not self.steps:
            STARTUP.lap("lightning_setup")  # the model on its device, the loop and its DataLoader made
        if not self.steps and self.constraint is not None and not self._search_prepared:
            self._prepare_search(trainer, pl_module)  # refuses an unreachable budget before the first pass
            STARTUP.lap("latency_table" if self.constraint_type == "latency" else "search_setup")
        self._started = time.perf_counter()
        if self.steps:  # a Fisher pass on the model pruned so far
            last = self.steps[-1]
            pl_module.fisher.reset()
            pl_module.masks.set(last.head_mask, last.neuron_mask)
            self._pruned_so_far.enter_context(refit_applied(pl_module.model, last.head_mask, last.neuron_mask,
                                                            last.refit))

    def on_validation_end(self, trainer: L.Trainer, pl_module: MaskedCLIPModule) -> None:
        self._restore_dense(pl_module)  # the teacher of every step
        fisher_s = time.perf_counter() - self._started
        self._add_time("fisher", fisher_s)
        first = not self.steps
        stats = self.statistics if first and self.statistics is not None else pl_module.fisher.compute()
        if first and trainer.is_global_zero:
            target = self.run.file(FISHER_FILE)
            if self.statistics_source is None:
                save_fisher(target, stats, pl_module.hparams.pretrained,
                            statistics_provenance(pl_module, trainer.datamodule, trainer.world_size))
            else:  # the original file, with the metadata of where it came from
                link_or_copy(self.statistics_source, target)
            log_fisher(trainer, stats)
        if self.constraint is not None:
            self._step(trainer, pl_module, stats)  # every rank: reconstruction sums across ranks
            self.steps[-1].timings["fisher"] = fisher_s
        self.finished = len(self.steps) == len(self.constraints)
        point = self.points.get(len(self.steps) - 1)
        if point is not None:  # a requested constraint of several: saved and evaluated as a run of its own
            folder = self.run.folder(point_folder(point))
            on_rank_zero(trainer, lambda: self._finish(trainer, pl_module, self._header(pl_module, stats), folder,
                                                              self.finished))
        if self.finished and self.points:
            on_rank_zero(trainer, lambda: self._finish_tradeoff(trainer, self._header(pl_module, stats)))
        elif self.finished:
            on_rank_zero(trainer, lambda: self._finish(trainer, pl_module, self._header(pl_module, stats), self.run))

    def _header(self, pl_module: MaskedCLIPModule, stats: FisherStatistics) -> dict[str, Any]:
        """What every report of the run starts with: the checkpoint and the statistics."""
        report: dict[str, Any] = {"model": pl_module.hparams.pretrained, "fisher_samples": stats.num_samples,
                                  "startup_s": STARTUP.report()}
        if self.statistics_source is not None:
            # An interrupted run's staging folder is removed once this run is in place: name the run itself.
            resumed = self.statistics_source.parent.name.startswith(f".{self.run.path.name}.partial-")
            report["fisher_source"] = ("an interrupted run of this output directory" if resumed
                                       else str(self.statistics_source))
        return report

    def on_exception(self, trainer: L.Trainer, pl_module: MaskedCLIPModule, exception: BaseException) -> None:
        self._restore_dense(pl_module)  # a failed pass must not leave refit columns in the caller's model

    def _restore_dense(self, pl_module: MaskedCLIPModule) -> None:
        """The dense weights and all-ones masks again, after a Fisher pass on the model pruned so far."""
        self._pruned_so_far.close()
        pl_module.masks.set(torch.ones_like(pl_module.masks.head_mask), torch.ones_like(pl_module.masks.neuron_mask))

    def _prepare_search(self, trainer: L.Trainer, pl_module: MaskedCLIPModule) -> None:
        """Choose how the search measures widths (the latency table, measured on the run's device, or multiples)
        and check that the constraint can be met at all."""
        config = pl_module.vision_config
        head_dim = config.hidden_size // config.num_attention_heads
        multiple = self.options.widths_multiple(pl_module.device, config.intermediate_size, head_dim,
                                                latency_budget=self.constraint_type == "latency")
        if self.constraint_type == "latency" or multiple > 1:
            table = self._latency_table(trainer, pl_module, multiple) if self.constraint_type == "latency" else None
            self.widths = WidthBudget(head_dim, multiple, table)
        check_reachable(self.constraint, mac_costs(config), pl_module.tower.pooling_needs_attention(),
                        self.widths)  # the smallest constraint: the others are reached on the way
        self._search_prepared = True

    def _step(self, trainer: L.Trainer, pl_module: MaskedCLIPModule, stats: FisherStatistics) -> None:
        """One pruning step on `stats`; logs its masks."""
        index = len(self.steps)
        previous = self.steps[-1] if self.steps else None
        result = prune_step(
            pl_module.model, stats, mac_costs(pl_module.vision_config), self.constraints[index],
            self.options, self._calibration_batches(trainer, pl_module),
            kept=None if previous is None else (previous.head_mask, previous.neuron_mask),
            all_reduce=lambda t: trainer.strategy.reduce(t, reduce_op="sum") if trainer.world_size > 1 else t,
            progress=trainer.is_global_zero, widths=self.widths,
            time_ratio=self._candidate_timer(trainer, pl_module) if self._closes_latency_loop(index) else None,
        )
        self.steps.append(result)
        for stage, seconds in result.timings.items():
            self._add_time(stage, seconds)
        if index == 0 and isinstance(result.search, SearchResult):
            log_search_curve(trainer, result.search.objective_curve, result.search.num_heads)
        for number, (stage, masks) in enumerate(result.stage_masks.items(), start=1):
            log_masks(trainer, stage if len(self.constraints) == 1 else f"step{index + 1}_{stage}", number, *masks)
        if result.reconstruction is not None:
            log_reconstruction(trainer, index + 1, result.reconstruction.errors)

    def _closes_latency_loop(self, index: int) -> bool:
        """Whether step `index` reaches a requested latency budget: its search is checked by timing (the steps
        between two requested budgets are waypoints, left to the table)."""
        reaches = index == len(self.constraints) - 1 or index in self.points
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

    def _finish(self, trainer: L.Trainer, pl_module: MaskedCLIPModule, report: dict[str, Any], folder: RunFolder,
                last: bool = True) -> None:
        """Rank zero: write the masks and plan of the steps so far into `folder`, then finish it as a run (save and
        evaluate the pruned model, report); `last`: no Fisher pass follows, so the masks' hooks may go."""
        model = evaluate = None
        if self.steps:
            report |= self._write_masks(folder, mac_costs(pl_module.vision_config),
                                        pl_module.hparams.pretrained)
            if self.options.save:
                model = self._model_to_save(trainer, pl_module, last)
                if trainer.datamodule is not None and trainer.datamodule.has_evaluation_data():
                    evaluate = partial(self._evaluate, trainer, pl_module)
        self.summary = finish_run(folder, report, model, evaluate, self.timings)
        if self.steps and self.points:
            self.point_reports[self.constraints[len(self.steps) - 1]] = report

    def _finish_tradeoff(self, trainer: L.Trainer, report: dict[str, Any]) -> None:
        """Rank zero, after the last point: the trade-off of all points as a table (CSV, JSON), a picture and
        TensorBoard curves, and the run's own report."""
        rows = tradeoff_rows(self.point_reports)
        self.run.file("tradeoff.csv").write_text(tradeoff_csv(rows))
        self.run.write_json("tradeoff.json", {"rows": rows})
        not_drawn = plot_tradeoff(rows, self.run.file("tradeoff.png"))
        log_tradeoff(trainer, rows)
        report |= {"constraints": sorted(self.point_reports, reverse=True),
                   "points": [f"{point_folder(c)}/report.json" for c in sorted(self.point_reports, reverse=True)],
                   "tradeoff": ["tradeoff.csv", "tradeoff.json"] + ([] if not_drawn else ["tradeoff.png"])}
        if not_drawn:
            report["warnings"] = [not_drawn]
        summary = finish_run(self.run, report, timings=self.timings)
        folders = ", ".join(point_folder(point) for point in report["constraints"])
        self.summary = "\n".join([format_tradeoff(rows), f"  one run per constraint in {folders}; the trade-off in "
                                  f"{', '.join(report['tradeoff'])}", summary])

    def _write_masks(self, folder: RunFolder, macs: MacCosts, model_name: str) -> dict[str, Any]:
        """Write the masks, refit columns and plan of the steps so far into `folder`; return the report's pruning
        part."""
        last = self.steps[-1]
        folder.save_tensor(HEAD_MASK_FILE, last.head_mask)
        folder.save_tensor(NEURON_MASK_FILE, last.neuron_mask)
        if last.refit:
            save_refit(folder.file(REFIT_FILE), last.refit, model_name)
        write_plan(plan_from_masks(last.head_mask, last.neuron_mask), folder.file(PLAN_FILE))
        pruned = macs.of_masks(last.head_mask, last.neuron_mask)
        return {
            "constraint": self.constraints[len(self.steps) - 1],
            "options": asdict(self.options),
            "macs": {"dense": macs.dense, "pruned": pruned, "ratio": pruned / macs.dense, "unit": "MACs per image"},
            "kept": {"heads": int((last.head_mask != 0).sum()), "neurons": int((last.neuron_mask != 0).sum()),
                     "heads_per_layer": (last.head_mask != 0).sum(1).tolist(),
                     "neurons_per_layer": (last.neuron_mask != 0).sum(1).tolist()},
            "steps": [step.report(constraint, macs) for step, constraint in zip(self.steps, self.constraints,
                                                                               strict=False)],
            "warnings": [warning for step in self.steps for warning in step.warnings],
            **self._budget_report(last),
        }

    def _budget_report(self, last: StepResult) -> dict[str, Any]:
        """The report's constraint type and, under a latency budget, the table's latency of the final masks."""
        multiple = 1 if self.widths is None else self.widths.multiple_of
        report: dict[str, Any] = {"constraint_type": self.constraint_type, "multiple_of": multiple}
        table = None if self.widths is None else self.widths.latency
        if table is not None:
            predicted = table.latency_of((last.head_mask != 0).sum(1).tolist(), (last.neuron_mask != 0).sum(1).tolist())
            report["latency"] = {"table": LATENCY_TABLE_FILE, "batch_size": table.key["batch_size"],
                                 "device": table.key["device"], "dense_s": table.dense_latency,
                                 "predicted_s": predicted, "predicted_ratio": predicted / table.dense_latency,
                                 "table_source": None if self.table_source is None else self.table_source.report()}
        if last.budget_loop is not None:
            loop = last.budget_loop.report()
            report["latency"] |= {"measured_ratio": loop["measured_ratio"], "budget_loop": loop}
        return report

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

    def _model_to_save(self, trainer: L.Trainer, pl_module: MaskedCLIPModule, last: bool) -> PrunedModelSpec:
        """The dense model (the reference of verification and evaluation: its masks removed after the last step,
        all ones before a later one) and the masks so far, to be saved into OUTPUT_DIR/pruned and checked on
        calibration images (the tower's inputs)."""
        read = self._calibration_batches(trainer, pl_module)  # on the device already, unless nothing was rebuilt
        batch = read[0] if read else pl_module.tower.vision_inputs(next(iter(trainer.val_dataloaders)))
        inputs = inputs_to({name: value[:8] for name, value in batch.items()}, pl_module.device)
        if last:
            pl_module.masks.remove()
        last = self.steps[-1]
        return PrunedModelSpec(pl_module.model, last.head_mask, last.neuron_mask, pl_module.hparams.pretrained,
                               inputs, refit=last.refit)

    def _evaluate(self, trainer: L.Trainer, pl_module: MaskedCLIPModule, pruned: Any) -> dict[str, Any]:
        """Retrieval / zero-shot metrics of the dense and the pruned model (caption embeddings and the dense model's
        scores computed once for all points)."""
        if self._evaluator is None:
            self._evaluator = trainer.datamodule.evaluator(pl_module.device)
        metrics = self._evaluator.compare(pl_module.model, pruned, self.cascade_top_m)
        log_metrics(trainer, metrics)
        return metrics

    def _calibration_batches(self, trainer: L.Trainer, pl_module: MaskedCLIPModule) -> list[VisionInputs]:
        """This rank's share of `reconstruct_samples` calibration images, on the model's device (read once: every
        step reconstructs on the same images)."""
        if self._reconstruction_batches is None:
            self._reconstruction_batches = self._read_calibration_batches(trainer, pl_module)
        return self._reconstruction_batches

    def _read_calibration_batches(self, trainer: L.Trainer, pl_module: MaskedCLIPModule) -> list[VisionInputs]:
        if self.options.reconstruct == "none":
            return []
        per_rank = math.ceil(self.options.reconstruct_samples / trainer.world_size)
        batches, seen = [], 0
        for batch in trainer.val_dataloaders:
            if seen >= per_rank:
                break
            real = batch["index"] != PADDING  # DDP padding: not data
            inputs = {name: value[real][: per_rank - seen]
                      for name, value in pl_module.tower.vision_inputs(batch).items()}
            batches.append(inputs_to(inputs, pl_module.device))
            seen += len(inputs["pixel_values"])
        return batches

    def _add_time(self, stage: str, seconds: float) -> None:
        self.timings[stage] = self.timings.get(stage, 0.0) + seconds


class SensitivityCallback(L.Callback):
    """One round of sensitivity pruning per validation pass (docs/design.md, "Sensitivity-based pruning").

    Before the pass the module's head mask is set to the current one; after it, the head
    scores under that mask pick the next layer to reduce to its best head, `head_mask_{i}.pt`
    is written and, with evaluation data, the round's metric decides the early stop.

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
        self.rounds: list[dict[str, Any]] = []
        self.reduced: set[int] = set()
        self.head_mask: torch.Tensor | None = None
        self.evaluator: Evaluator | None = None
        self.dense_metric: float | None = None
        self.finished = False

    def on_validation_start(self, trainer: L.Trainer, pl_module: MaskedCLIPModule) -> None:
        if self.head_mask is None:
            config = pl_module.vision_config
            self.head_mask = torch.ones(config.num_hidden_layers, config.num_attention_heads)
            on_rank_zero(trainer, lambda: self._score_dense(trainer, pl_module))
        pl_module.fisher.reset()
        pl_module.masks.set(head_mask=self.head_mask)

    def _score_dense(self, trainer: L.Trainer, pl_module: MaskedCLIPModule) -> None:
        """Rank zero: the dense model's metric, the reference of the early stop (if it can be measured)."""
        datamodule = trainer.datamodule
        if datamodule is None or not datamodule.has_evaluation_data() or not pl_module.tower.has_text:
            print("clip-prune sensitivity: no evaluation data for this model, so no early stop; all rounds run",
                  file=sys.stderr)
            return
        self.evaluator = datamodule.evaluator(pl_module.device)
        self.dense_metric = metric_value(self.evaluator(pl_module.model, "dense"), self.stop_metric)

    def on_validation_end(self, trainer: L.Trainer, pl_module: MaskedCLIPModule) -> None:
        scores = pl_module.fisher.compute().head_fisher.cpu()  # synced across ranks, on their devices
        layer, head = choose_head(scores, self.reduced)
        self.reduced.add(layer)
        self.head_mask = keep_single_head(self.head_mask, layer, head)
        macs = mac_costs(pl_module.vision_config)
        neuron_mask = torch.ones(macs.num_layers, macs.num_neurons)
        entry: dict[str, Any] = {"round": len(self.rounds), "layer": layer, "head": head,
                                 "score": float(scores[layer, head]),
                                 "macs_ratio": macs.of_masks(self.head_mask, neuron_mask) / macs.dense}
        on_rank_zero(trainer, lambda: self._finish_round(trainer, pl_module, entry))
        entry = trainer.strategy.broadcast(entry)  # rank zero's metric and stop decision for every rank
        self.rounds.append(entry)
        self.finished = "stopped" in entry or len(self.reduced) == macs.num_layers
        if self.finished:
            on_rank_zero(trainer, lambda: self.run.save_tensor(NEURON_MASK_FILE, neuron_mask))

    def _finish_round(self, trainer: L.Trainer, pl_module: MaskedCLIPModule, entry: dict[str, Any]) -> None:
        """Rank zero: write the round's mask, measure it, decide the early stop."""
        self.run.save_tensor(f"head_mask_{entry['round']}.pt", self.head_mask)
        if self.evaluator is not None:
            pl_module.masks.set(head_mask=self.head_mask)
            entry["metric"] = metric_value(self.evaluator(pl_module.model, f"round {entry['round']}"),
                                           self.stop_metric)
            if entry["metric"] < self.stop_ratio * self.dense_metric:
                entry["stopped"] = (f"{self.stop_metric} {entry['metric']:.2f} < {self.stop_ratio} x dense "
                                    f"{self.dense_metric:.2f}")
        log_sensitivity_round(trainer, entry)

    def report(self) -> dict[str, Any]:
        return {"stop_metric": self.stop_metric, "stop_ratio": self.stop_ratio, "dense_metric": self.dense_metric,
                "rounds": self.rounds}


def metric_value(metrics: dict[str, Any], name: str) -> float:
    """The metric `task/name` (e.g. `retrieval/i2t_R@1`) from an `Evaluator` result, with a clear error."""
    task, _, key = name.partition("/")
    try:
        return float(metrics[task][key])
    except KeyError:
        available = [f"{t}/{k}" for t, values in metrics.items() for k in values]
        raise ValueError(f"--stop_metric {name!r} is not measured here; choose one of {available}") from None
