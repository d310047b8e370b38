"""`report.json`: built here, in one place, from the typed results of a run (docs/usage.md, "What a run writes").

Every verb and `clip_prune.prune` write their report with `write_report`; its sections come from the functions
below, each from one kind of result: the statistics, the steps and their masks, the latency budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from clip_prune.core.file_names import LATENCY_TABLE_FILE, REPORT_FILE
from clip_prune.core.pruning.costs import MacCosts
from clip_prune.core.pruning.latency_table import TableSource
from clip_prune.core.pruning.options import PruningOptions
from clip_prune.core.pruning.search import ConstraintType, WidthBudget
from clip_prune.core.pruning.step import StepResult
from clip_prune.core.run.outputs import RunFolder
from clip_prune.core.run.summary import format_summary


def statistics_section(model_name: str, num_samples: int, source: str | None = None,
                       startup_s: dict[str, float] | None = None) -> dict[str, Any]:
    """What every `prune` report starts with: the checkpoint, the statistics (and where they were read from) and the
    time before the first batch."""
    report: dict[str, Any] = {"model": model_name, "fisher_samples": num_samples}
    if startup_s is not None:
        report["startup_s"] = startup_s
    if source is not None:
        report["fisher_source"] = source
    return report


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


def pruning_section(steps: Sequence[StepResult], chain: Sequence[float], options: PruningOptions,
                    macs: MacCosts) -> dict[str, Any]:
    """The masks the steps so far reached: the constraint, the options, MACs, kept units, every step, warnings."""
    last = steps[-1]
    pruned = macs.of_masks(last.head_mask, last.neuron_mask)
    return {
        "constraint": chain[len(steps) - 1],
        "options": asdict(options),
        "macs": {"dense": macs.dense, "pruned": pruned, "ratio": pruned / macs.dense, "unit": "MACs per image"},
        "kept": kept_units(last.head_mask, last.neuron_mask),
        "steps": [step_section(step, constraint, macs) for step, constraint in zip(steps, chain, strict=False)],
        "warnings": [warning for step in steps for warning in step.warnings],
    }


def budget_section(last: StepResult, constraint_type: ConstraintType, widths: WidthBudget | None,
                   table_source: TableSource | None) -> dict[str, Any]:
    """The constraint type and, under a latency budget, the table's latency of the final masks and what timing the
    candidates measured."""
    report: dict[str, Any] = {"constraint_type": constraint_type,
                              "multiple_of": 1 if widths is None else widths.multiple_of}
    table = None if widths is None else widths.latency
    if table is not None:
        predicted = table.latency_of((last.head_mask != 0).sum(1).tolist(), (last.neuron_mask != 0).sum(1).tolist())
        report["latency"] = {"table": LATENCY_TABLE_FILE, "batch_size": table.key["batch_size"],
                             "device": table.key["device"], "dense_s": table.dense_latency,
                             "predicted_s": predicted, "predicted_ratio": predicted / table.dense_latency,
                             "table_source": None if table_source is None else table_source.report()}
        if last.budget_loop is not None:
            loop = last.budget_loop.report()
            report["latency"] |= {"measured_ratio": loop["measured_ratio"], "budget_loop": loop}
    return report


def write_report(run: RunFolder, report: dict[str, Any], timings: dict[str, float] | None = None) -> str:
    """Write `report` (with the seconds per stage and their total, if given) as the folder's `report.json`; return
    the summary to print once the run is in place."""
    if timings is not None:
        report["timings_s"] = {**timings, "total": sum(timings.values())}
    run.write_json(REPORT_FILE, report)
    return "\n".join(filter(None, [format_summary(report), f"clip-prune: wrote {run.path}"]))


def relative_source(path: Path, run_name: str) -> str:
    """How the report names statistics read from `path`: an interrupted run's staging folder is removed once the run
    is in place, so it is named by what it was."""
    resumed = path.parent.name.startswith(f".{run_name}.partial-")
    return "an interrupted run of this output directory" if resumed else str(path)
