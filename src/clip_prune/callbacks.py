"""Callbacks that turn Fisher passes into masks: `PruningCallback` (search → rearrange → rescale → export)
and `SensitivityCallback` (one layer reduced to its best head per pass)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

import lightning as L
import torch
from transformers import CLIPModel

from clip_prune.apply import export_pruned
from clip_prune.evaluation import Evaluator
from clip_prune.metrics import METRIC_NAMES
from clip_prune.model.module import MaskedCLIPModule
from clip_prune.outputs import RunDirectory
from clip_prune.pruning.fisher import FisherStatistics, save_fisher
from clip_prune.pruning.flops import EncoderMacs, count_encoder_macs
from clip_prune.pruning.rearrange import rearrange_mask
from clip_prune.pruning.rescale import rescale_masks
from clip_prune.pruning.search import search_masks
from clip_prune.pruning.sensitivity import choose_head, keep_single_head
from clip_prune.pruning.structural import plan_from_masks, write_plan
from clip_prune.summary import format_summary
from clip_prune.tensorboard import log_fisher, log_masks, log_metrics, log_search_curve, log_sensitivity_round


@dataclass(frozen=True)
class PruningOptions:
    """Which stages run after the Fisher pass, and how rescaling is done."""

    rearrange: bool = True
    """Rearrange the searched masks with the per-layer Fisher blocks."""
    rescale: bool = True
    """Fit real-valued scales of the kept heads and neurons by layer-wise least squares."""
    teacher: Literal["dense", "ta"] = "dense"
    """Rescaling target: the dense model, or the 'teaching assistant' mask searched at √constraint."""
    damping: float = 1e-2
    """Pull of the scales towards 1, relative to the mean diagonal of the normal equations."""
    max_abs_scale: float = 10.0
    """A layer whose solved scales leave [-max, max] keeps its binary mask."""
    rescale_samples: int = 512
    """Calibration images used for rescaling (split across ranks)."""
    last_layer_cls_only: bool = True
    """At the last layer, reconstruct only the CLS token (the one CLIP pools); on the demo model this
    kept the pruned embeddings closer to the dense ones at constraints 0.4-0.6 than all tokens did."""
    export: bool = True
    """Slice the weights and save the smaller model into OUTPUT_DIR/pruned."""

    def __post_init__(self) -> None:
        if self.damping < 0:
            raise ValueError(f"--options.damping must be >= 0, got {self.damping}")
        if self.rescale_samples < 1:
            raise ValueError(f"--options.rescale_samples must be >= 1, got {self.rescale_samples}")


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


def check_constraint(constraint: float) -> None:
    """Refuse a FLOP constraint outside (0, 1] before any work starts."""
    if not (isinstance(constraint, int | float) and 0 < constraint <= 1):
        raise ValueError(
            f"--constraint must be in (0, 1] (the fraction of the encoder's FLOPs to keep, e.g. 0.75), got {constraint}"
        )


class PruningCallback(L.Callback):
    """Turns the Fisher statistics of the validation pass into rescaled masks and a written run.

    Args:
        run: where the outputs go (staged, renamed into place at the end).
        constraint: fraction of the encoder's MACs to keep, in (0, 1]; None only saves the statistics.
        options: stages and rescaling settings.
        statistics: statistics loaded from an earlier run (`--fisher`); None gathers them.
    """

    def __init__(self, run: RunDirectory, constraint: float | None, options: PruningOptions,
                 statistics: FisherStatistics | None = None) -> None:
        if constraint is not None:
            check_constraint(constraint)
        self.run = run
        self.constraint = constraint
        self.options = options
        self.statistics = statistics
        self.timings: dict[str, float] = {}

    def on_validation_start(self, trainer: L.Trainer, pl_module: MaskedCLIPModule) -> None:
        self._started = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: MaskedCLIPModule) -> None:
        self.timings["fisher"] = time.perf_counter() - self._started
        stats = self.statistics if self.statistics is not None else pl_module.fisher.compute()
        if trainer.is_global_zero:
            save_fisher(self.run.file("fisher.safetensors"), stats, pl_module.hparams.pretrained)
            log_fisher(trainer, stats)
        report: dict[str, Any] = {"model": pl_module.hparams.pretrained, "fisher_samples": stats.num_samples}
        if self.constraint is not None:
            report |= self._prune(trainer, pl_module, stats)  # every rank: rescaling sums across ranks
        on_rank_zero(trainer, lambda: self._finish(trainer, pl_module, report))

    def _finish(self, trainer: L.Trainer, pl_module: MaskedCLIPModule, report: dict[str, Any]) -> None:
        """Rank zero: export and evaluate the pruned model, write the report, move the run into place."""
        if self.constraint is not None and self.options.export:
            pruned, export_report = self._timed("export", lambda: self._export(trainer, pl_module))
            report |= export_report
            if trainer.datamodule is not None and trainer.datamodule.has_evaluation_data():
                report["metrics"] = self._timed("evaluate", lambda: self._evaluate(trainer, pl_module, pruned))
        report["timings_s"] = {**self.timings, "total": sum(self.timings.values())}
        self.run.write_json("report.json", report)
        path = self.run.commit()
        print(format_summary(report))
        print(f"clip-prune: wrote {path}")

    def _prune(self, trainer: L.Trainer, pl_module: MaskedCLIPModule, stats: FisherStatistics) -> dict[str, Any]:
        """Search, rearrange and rescale; write masks and the plan; return the report's pruning part."""
        macs = count_encoder_macs(pl_module.vision_config)
        head_mask, neuron_mask = self._timed("search", lambda: self._search(trainer, stats, macs))
        log_masks(trainer, "search", 1, head_mask, neuron_mask)
        if self.options.rearrange:
            head_mask, neuron_mask = self._timed("rearrange", lambda: (
                rearrange_mask(head_mask, stats.head_fisher, stats.head_gram),
                rearrange_mask(neuron_mask, stats.neuron_fisher, stats.neuron_gram),
            ))
            log_masks(trainer, "rearrange", 2, head_mask, neuron_mask)
        warnings: list[str] = []
        if self.options.rescale:
            result = self._timed("rescale", lambda: self._rescale(trainer, pl_module, stats, macs,
                                                                   head_mask, neuron_mask))
            head_mask, neuron_mask, warnings = result.head_mask, result.neuron_mask, result.warnings
            log_masks(trainer, "rescale", 3, head_mask, neuron_mask)
        self.head_mask, self.neuron_mask = head_mask.cpu(), neuron_mask.cpu()
        if trainer.is_global_zero:
            self.run.save_tensor("head_mask.pt", head_mask)
            self.run.save_tensor("neuron_mask.pt", neuron_mask)
            write_plan(plan_from_masks(self.head_mask, self.neuron_mask), self.run.file("plan.json"))
        pruned = macs.of_masks(head_mask, neuron_mask)
        return {
            "constraint": self.constraint,
            "options": asdict(self.options),
            "flops": {"dense": macs.dense, "pruned": pruned, "ratio": pruned / macs.dense, "unit": "MACs per image"},
            "kept": {"heads": int((head_mask != 0).sum()), "neurons": int((neuron_mask != 0).sum()),
                     "heads_per_layer": (head_mask != 0).sum(1).tolist(),
                     "neurons_per_layer": (neuron_mask != 0).sum(1).tolist()},
            "warnings": warnings,
        }

    def _export(self, trainer: L.Trainer, pl_module: MaskedCLIPModule) -> tuple[Any, dict[str, Any]]:
        """Slice, verify and save the pruned model into OUTPUT_DIR/pruned."""
        pixels = next(iter(trainer.val_dataloaders))["pixel_values"][:8].to(pl_module.device)
        pl_module.masks.remove()  # the dense model again: the reference for verification and evaluation
        return export_pruned(pl_module.model, self.head_mask, self.neuron_mask, self.run.file("pruned"),
                             pl_module.hparams.pretrained, pixels)

    def _evaluate(self, trainer: L.Trainer, pl_module: MaskedCLIPModule, pruned: Any) -> dict[str, Any]:
        """Retrieval / zero-shot metrics of the dense and the pruned model (caption embeddings computed once)."""
        evaluator = Evaluator(trainer.datamodule, pl_module.device)
        metrics = {"dense": evaluator(pl_module.model, "dense"), "pruned": evaluator(pruned, "pruned")}
        log_metrics(trainer, metrics)
        return metrics

    def _search(self, trainer: L.Trainer, stats: FisherStatistics, macs: EncoderMacs) -> tuple[torch.Tensor, ...]:
        result = search_masks(stats.head_fisher, stats.neuron_fisher, macs, self.constraint)
        log_search_curve(trainer, result.objective_curve, result.num_heads)
        return result.head_mask, result.neuron_mask

    def _rescale(self, trainer: L.Trainer, pl_module: MaskedCLIPModule, stats: FisherStatistics,
                 macs: EncoderMacs, head_mask: torch.Tensor, neuron_mask: torch.Tensor) -> Any:
        teacher: dict[str, torch.Tensor] = {}
        if self.options.teacher == "ta":
            assistant = search_masks(stats.head_fisher, stats.neuron_fisher, macs, math.sqrt(self.constraint))
            teacher = {"teacher_head_mask": assistant.head_mask, "teacher_neuron_mask": assistant.neuron_mask}
        per_rank = math.ceil(self.options.rescale_samples / trainer.world_size)
        batches, seen = [], 0
        for batch in trainer.val_dataloaders:
            if seen >= per_rank:
                break
            pixels = batch["pixel_values"][: per_rank - seen]
            batches.append(pixels.to(pl_module.device))
            seen += len(pixels)
        return rescale_masks(
            pl_module.model, head_mask.to(pl_module.device), neuron_mask.to(pl_module.device), batches,
            damping=self.options.damping, max_abs_scale=self.options.max_abs_scale,
            last_layer_cls_only=self.options.last_layer_cls_only,
            all_reduce=lambda t: trainer.strategy.reduce(t, reduce_op="sum") if trainer.world_size > 1 else t,
            progress=trainer.is_global_zero, **teacher,
        )

    def _timed(self, stage: str, work: Any) -> Any:
        start = time.perf_counter()
        result = work()
        self.timings[stage] = time.perf_counter() - start
        return result


class SensitivityCallback(L.Callback):
    """One round of sensitivity pruning per validation pass (DESIGN.md, "Sensitivity-based pruning").

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
        if datamodule is None or not datamodule.has_evaluation_data() or not isinstance(pl_module.model, CLIPModel):
            print("clip-prune sensitivity: no evaluation data for this model, so no early stop; all rounds run")
            return
        self.evaluator = Evaluator(datamodule, pl_module.device)
        self.dense_metric = metric_value(self.evaluator(pl_module.model, "dense"), self.stop_metric)

    def on_validation_end(self, trainer: L.Trainer, pl_module: MaskedCLIPModule) -> None:
        scores = pl_module.fisher.compute().head_fisher.cpu()  # synced across ranks, on their devices
        layer, head = choose_head(scores, self.reduced)
        self.reduced.add(layer)
        self.head_mask = keep_single_head(self.head_mask, layer, head)
        macs = count_encoder_macs(pl_module.vision_config)
        neuron_mask = torch.ones(macs.num_layers, macs.num_neurons)
        entry: dict[str, Any] = {"round": len(self.rounds), "layer": layer, "head": head,
                                 "score": float(scores[layer, head]),
                                 "flops_ratio": macs.of_masks(self.head_mask, neuron_mask) / macs.dense}
        on_rank_zero(trainer, lambda: self._finish_round(trainer, pl_module, entry))
        entry = trainer.strategy.broadcast(entry)  # rank zero's metric and stop decision for every rank
        self.rounds.append(entry)
        self.finished = "stopped" in entry or len(self.reduced) == macs.num_layers
        if self.finished:
            on_rank_zero(trainer, lambda: self.run.save_tensor("neuron_mask.pt", neuron_mask))

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
