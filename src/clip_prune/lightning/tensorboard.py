"""TensorBoard views of Fisher scores and masks: per-layer histograms and L×H heat maps."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer import Trainer

from clip_prune.core.pruning.fisher import FisherStatistics
from clip_prune.core.run.evaluation import Comparison
from clip_prune.core.run.report import SensitivityRound

CELL = 16
"""Pixels per head in the heat maps, so a 12×12 map is readable."""


def summary_writer(trainer: Trainer):
    """The SummaryWriter of the Trainer's TensorBoard logger, or None when none is configured."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def heat_map(values: torch.Tensor) -> torch.Tensor:
    """An RGB image [3, L·CELL, H·CELL] of `values` [L, H]: dark blue (low) to yellow (high), rows = layers."""
    values = values.detach().double().cpu()
    low, high = values.min(), values.max()
    scaled = ((values - low) / (high - low)) if high > low else torch.ones_like(values)
    dark, bright = torch.tensor([0.10, 0.05, 0.35]), torch.tensor([1.0, 0.9, 0.1])
    rgb = dark[:, None, None] + (bright - dark)[:, None, None] * scaled.float()[None]
    return rgb.repeat_interleave(CELL, dim=1).repeat_interleave(CELL, dim=2)


def log_fisher(trainer: Trainer, stats: FisherStatistics) -> None:
    """Histograms of head and neuron scores per layer and the L×H map of head scores."""
    writer = summary_writer(trainer)
    if writer is None:
        return
    for layer, (heads, neurons) in enumerate(zip(stats.head_fisher, stats.neuron_fisher, strict=True)):
        writer.add_histogram(f"fisher/head_scores/layer_{layer:02d}", heads.float(), 0)
        writer.add_histogram(f"fisher/neuron_scores/layer_{layer:02d}", neurons.float(), 0)
    writer.add_image("fisher/head_scores_map", heat_map(stats.head_fisher.log10().clamp(min=-30)), 0)
    writer.flush()


def log_masks(trainer: Trainer, stage: str, step: int, head_mask: torch.Tensor, neuron_mask: torch.Tensor) -> None:
    """The kept-head map (L×H) and kept neurons per layer after one pruning stage."""
    writer = summary_writer(trainer)
    if writer is None:
        return
    writer.add_image(f"masks/{step}_{stage}/kept_heads", heat_map((head_mask != 0).float()), 0)
    for layer, count in enumerate((neuron_mask != 0).sum(dim=1).tolist()):
        writer.add_scalar(f"masks/{step}_{stage}/kept_neurons", count, layer)
    writer.flush()


def log_search_curve(trainer: Trainer, curve: torch.Tensor, chosen_heads: int) -> None:
    """The search objective against the number of kept heads, and the chosen split."""
    writer = summary_writer(trainer)
    if writer is None:
        return
    for heads, value in enumerate(curve.tolist()):
        if value != float("-inf"):
            writer.add_scalar("search/objective_by_kept_heads", value, heads)
    writer.add_scalar("search/chosen_kept_heads", chosen_heads, 0)
    writer.flush()


def log_reconstruction(trainer: Trainer, step: int, errors: dict[str, torch.Tensor]) -> None:
    """Per-layer reconstruction errors (before/after, heads and neurons) of one pruning step, by layer."""
    writer = summary_writer(trainer)
    if writer is None:
        return
    for name, values in errors.items():
        for layer, value in enumerate(values.tolist()):
            writer.add_scalar(f"reconstruction/step{step}/{name}", value, layer)
    writer.flush()


def log_metrics(trainer: Trainer, metrics: Comparison) -> None:
    """Retrieval and zero-shot metrics of the dense (step 0) and pruned (step 1) models, and the cascade's
    recall, MAC ratio and measured speedup against its M (the step)."""
    writer = summary_writer(trainer)
    if writer is None:
        return
    for step, scores in enumerate((metrics.dense, metrics.pruned or {})):
        for task, values in scores.items():
            for name, value in values.items():
                writer.add_scalar(f"metrics/{task}/{name}", value, step)
    for entry in metrics.cascade:
        for name, value in entry.retrieval.items():
            writer.add_scalar(f"cascade/{name}_by_top_m", value, entry.top_m)
        writer.add_scalar("cascade/macs_ratio_by_top_m", entry.macs.ratio, entry.top_m)
        writer.add_scalar("cascade/speedup_by_top_m", entry.seconds.speedup, entry.top_m)
    writer.flush()


def log_sensitivity_round(trainer: Trainer, entry: SensitivityRound) -> None:
    """A sensitivity round's metric (if measured) against its MAC ratio, in per mille of the dense MACs."""
    writer = summary_writer(trainer)
    if writer is None:
        return
    if entry.metric is not None:
        writer.add_scalar("sensitivity/metric_by_macs_permille", entry.metric, round(1000 * entry.macs_ratio))
    writer.add_scalar("sensitivity/macs_ratio_by_round", entry.macs_ratio, entry.round)
    writer.flush()


def log_tradeoff(trainer: Trainer, rows: list[dict[str, Any]]) -> None:
    """The trade-off of a run over several constraints as curves: each recall, zero-shot accuracy, cosine to dense
    and speedup against the MACs kept, in per mille (the step, as TensorBoard's x axis takes integers)."""
    writer = summary_writer(trainer)
    if writer is None:
        return
    for row in rows:
        step = round(1000 * row["macs_ratio"])
        for name, value in row.items():
            if name not in ("model", "constraint", "macs_ratio", "latency_reliable") and isinstance(value, int | float):
                writer.add_scalar(f"tradeoff/{name}_by_macs_permille", value, step)
    writer.flush()
