"""`report.json`: built here, in one place, from the typed results of a run (docs/usage.md, "What a run writes").

Every verb and `clip_prune.prune` describe their run as a `RunReport`, whose sections are the typed results
themselves (the statistics, the steps and their masks, the latency budget, the saved model's checks and costs,
the evaluation, the sensitivity rounds); `write_report` writes its JSON and returns the summary, which reads the
same typed results (`core/run/summary.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from clip_prune.core.file_names import LATENCY_TABLE_FILE, REPORT_FILE
from clip_prune.core.pruning.costs import MacCosts
from clip_prune.core.pruning.latency_table import TableSource
from clip_prune.core.pruning.options import PruningOptions
from clip_prune.core.pruning.search import ConstraintType, WidthBudget
from clip_prune.core.pruning.step import StepResult
from clip_prune.core.run.costs import DenseVsPruned
from clip_prune.core.run.evaluation import Comparison
from clip_prune.core.run.finish import ExportResult
from clip_prune.core.run.outputs import RunFolder
from clip_prune.core.run.summary import format_summary


@dataclass(frozen=True)
class StatisticsRecord:
    """What every `prune` report starts with: how many samples the Fisher statistics hold, where they were read
    from (None: gathered by this run) and the time before the first batch."""

    samples: int
    source: str | None = None
    startup_s: dict[str, float] | None = None

    def to_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"fisher_samples": self.samples}
        if self.startup_s is not None:
            entry["startup_s"] = self.startup_s
        if self.source is not None:
            entry["fisher_source"] = self.source
        return entry


def kept_units(head_mask: torch.Tensor, neuron_mask: torch.Tensor) -> dict[str, Any]:
    """Kept heads and neurons, in all and per layer."""
    return {"heads": int((head_mask != 0).sum()), "neurons": int((neuron_mask != 0).sum()),
            "heads_per_layer": (head_mask != 0).sum(1).tolist(),
            "neurons_per_layer": (neuron_mask != 0).sum(1).tolist()}


def step_section(step: StepResult, constraint: float, macs: MacCosts) -> dict[str, Any]:
    """One step: its constraint, the MACs it keeps, what each stage did and took."""
    entry: dict[str, Any] = {
        "constraint": constraint, "macs_ratio": macs.of_masks(step.head_mask, step.neuron_mask) / macs.dense,
        "kept_heads": int((step.head_mask != 0).sum()), "kept_neurons": int((step.neuron_mask != 0).sum()),
        "timings_s": step.timings,
    }
    if step.reconstruction is not None:
        entry["reconstruction"] = step.reconstruction.report()
    if step.budget_loop is not None:
        entry["latency_budget"] = step.budget_loop.report()
    return entry


@dataclass(frozen=True)
class PruningRecord:
    """The steps so far of a chain and what they were asked for: the last step's masks are the run's."""

    steps: Sequence[StepResult]
    chain: Sequence[float]
    """Every step's constraint (the steps so far are the first `len(steps)`)."""
    options: PruningOptions
    macs: MacCosts
    constraint_type: ConstraintType = "macs"
    widths: WidthBudget | None = None
    table_source: TableSource | None = None

    @property
    def last(self) -> StepResult:
        return self.steps[-1]

    def macs_ratio(self, step: StepResult) -> float:
        return self.macs.of_masks(step.head_mask, step.neuron_mask) / self.macs.dense

    def macs_kept(self) -> DenseVsPruned:
        """MACs per image of the dense tower and under the last step's masks."""
        return DenseVsPruned(self.macs.dense, self.macs.of_masks(self.last.head_mask, self.last.neuron_mask),
                             "MACs per image")

    def predicted_latency_ratio(self) -> float | None:
        """The latency table's latency of the final masks over the dense tower's (None without a latency budget)."""
        table = None if self.widths is None else self.widths.latency
        if table is None:
            return None
        widths = (self.last.head_mask != 0).sum(1).tolist(), (self.last.neuron_mask != 0).sum(1).tolist()
        return table.latency_of(*widths) / table.dense_latency

    @property
    def warnings(self) -> list[str]:
        return [warning for step in self.steps for warning in step.warnings]

    def to_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "constraint": self.chain[len(self.steps) - 1],
            "options": asdict(self.options),
            "macs": self.macs_kept().to_json(),
            "kept": kept_units(self.last.head_mask, self.last.neuron_mask),
            "steps": [step_section(step, constraint, self.macs)
                      for step, constraint in zip(self.steps, self.chain, strict=False)],
            "warnings": self.warnings,
            "constraint_type": self.constraint_type,
            "multiple_of": 1 if self.widths is None else self.widths.multiple_of,
        }
        table = None if self.widths is None else self.widths.latency
        if table is not None:
            predicted = table.latency_of((self.last.head_mask != 0).sum(1).tolist(),
                                         (self.last.neuron_mask != 0).sum(1).tolist())
            entry["latency"] = {"table": LATENCY_TABLE_FILE, "batch_size": table.key["batch_size"],
                                "device": table.key["device"], "dense_s": table.dense_latency,
                                "predicted_s": predicted, "predicted_ratio": predicted / table.dense_latency,
                                "table_source": None if self.table_source is None else self.table_source.report()}
            if self.last.budget_loop is not None:
                loop = self.last.budget_loop.report()
                entry["latency"] |= {"measured_ratio": loop["measured_ratio"], "budget_loop": loop}
        return entry


@dataclass
class SensitivityRound:
    """One round of `clip-prune sensitivity`: the layer reduced to one head, the head it keeps (its Fisher score),
    the MACs left and, where measured, the watched metric and why the run stopped there."""

    round: int
    layer: int
    head: int
    score: float
    macs_ratio: float
    metric: float | None = None
    stopped: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {name: value for name, value in asdict(self).items()
                if value is not None or name not in ("metric", "stopped")}


@dataclass(frozen=True)
class SensitivityRecord:
    """The rounds of a sensitivity run and its early stop: `stop_metric` below `stop_ratio` × `dense_metric`."""

    stop_metric: str
    stop_ratio: float
    dense_metric: float | None
    """None where the model could not be evaluated: no early stop."""
    rounds: list[SensitivityRound]

    def stop_reason(self) -> str:
        """Why the run ended: the early stop, or every layer reduced."""
        last = self.rounds[-1]
        if last.stopped is not None:
            return f"stopped after round {last.round}: {last.stopped}"
        if self.dense_metric is None:
            return f"all {len(self.rounds)} layers reduced to one head (no evaluation data, so no early stop)"
        return (f"all {len(self.rounds)} layers reduced to one head; {self.stop_metric} stayed above "
                f"{self.stop_ratio} x dense {self.dense_metric:.2f}")

    def to_json(self) -> dict[str, Any]:
        return {"stop_metric": self.stop_metric, "stop_ratio": self.stop_ratio, "dense_metric": self.dense_metric,
                "rounds": [entry.to_json() for entry in self.rounds]}


@dataclass
class RunReport:
    """One run's typed results; `to_json` is its `report.json`. A verb fills in the sections it has."""

    model: str
    statistics: StatisticsRecord | None = None
    pruning: PruningRecord | None = None
    export: ExportResult | None = None
    """The saved model's checks and costs (absent where no model was saved)."""
    metrics: Comparison | None = None
    sensitivity: SensitivityRecord | None = None
    facts: dict[str, Any] = field(default_factory=dict)
    """What a verb records that the summary does not read: `apply`'s masks and verification images, a run over
    several constraints' points and trade-off files."""
    warnings: list[str] | None = None
    """Warnings of the run beyond its steps' (None: the verb has none to report)."""
    timings: dict[str, float] | None = None
    """Seconds per stage; `report.json` adds their total."""

    def all_warnings(self) -> list[str]:
        return [*(self.pruning.warnings if self.pruning is not None else []), *(self.warnings or [])]

    def to_json(self) -> dict[str, Any]:
        report: dict[str, Any] = {"model": self.model}
        if self.statistics is not None:
            report |= self.statistics.to_json()
        report |= self.facts
        if self.pruning is not None:
            report |= self.pruning.to_json()
        if self.warnings is not None:
            report["warnings"] = self.all_warnings()
        if self.export is not None:
            report |= self.export.to_json()
        if self.metrics is not None:
            report["metrics"] = self.metrics.to_json()
        if self.sensitivity is not None:
            report |= self.sensitivity.to_json()
        if self.timings is not None:
            report["timings_s"] = {**self.timings, "total": sum(self.timings.values())}
        return report


def write_report(run: RunFolder, report: RunReport) -> str:
    """Write `report` as the folder's `report.json`; return the summary to print once the run is in place."""
    run.write_json(REPORT_FILE, report.to_json())
    return "\n".join(filter(None, [format_summary(report), f"clip-prune: wrote {run.path}"]))


def relative_source(path: Path, run_name: str) -> str:
    """How the report names statistics read from `path`: an interrupted run's staging folder is removed once the run
    is in place, so it is named by what it was."""
    resumed = path.parent.name.startswith(f".{run_name}.partial-")
    return "an interrupted run of this output directory" if resumed else str(path)
