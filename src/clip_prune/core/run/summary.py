"""The short table `clip-prune` prints at the end of a run: what pruning gained and what it cost.

It reads the run's typed results (`core/run/report.py`), the same ones `report.json` is written from.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from clip_prune.core.deploy.onnx_export import OnnxExport
    from clip_prune.core.run.costs import DenseVsPruned
    from clip_prune.core.run.evaluation import Comparison
    from clip_prune.core.run.report import PruningRecord, RunReport, SensitivityRecord
    from clip_prune.core.timing import LatencyComparison


def _row(name: str, dense: str, pruned: str, change: str = "") -> str:
    return f"  {name:<22}{dense:>14}{pruned:>14}{change:>12}"


def _table(rows: list[str]) -> list[str]:
    return ["", "clip-prune summary", _row("", "dense", "pruned", "ratio"), *rows] if rows else []


def format_summary(report: RunReport) -> str:
    """A plain-text table of MACs, parameters, latency and metrics, then the run's statistics, steps, budget,
    stage timings and warnings."""
    rows: list[str] = []
    latency = None
    if report.export is not None:
        costs = report.export.costs
        rows += [_count_row("encoder GMACs/image", costs.macs, 1e9, "{:.4f}"),
                 _count_row("  counted (torch)", costs.macs_counted, 1e9, "{:.4f}"),
                 _count_row("vision params (M)", costs.parameters, 1e6, "{:.3f}")]
        latency = costs.latency
        rows.append(_latency_row(latency))
    elif report.pruning is not None:
        rows.append(_count_row("encoder GMACs/image", report.pruning.macs_kept(), 1e9, "{:.4f}"))
    if report.metrics is not None:
        rows += _metric_rows(report.metrics)
    lines = _table(rows)
    statistics = report.statistics
    if statistics is not None:
        lines.append(f"  Fisher statistics of {statistics.samples} samples"
                     + (f", reused from {statistics.source}" if statistics.source else ""))
    if report.pruning is not None:
        lines += _pruning_lines(report.pruning)
    if statistics is not None and statistics.startup_s is not None:
        laps = {stage: seconds for stage, seconds in statistics.startup_s.items() if stage != "total"}
        stages = ", ".join(f"{stage.replace('_', ' ')} {seconds:.1f}s" for stage, seconds in laps.items())
        lines.append(f"  before the first batch: {statistics.startup_s['total']:.1f}s ({stages})")
    if report.timings is not None:
        timings = {**report.timings, "total": sum(report.timings.values())}
        lines.append(f"  time: {', '.join(f'{stage} {seconds:.1f}s' for stage, seconds in timings.items())}")
    if latency is not None and latency.unreliable is not None:
        lines.append(f"  latency not measured reliably: {latency.unreliable}")
    lines += [f"  warning: {warning}" for warning in report.all_warnings()]
    if report.sensitivity is not None:
        lines += _sensitivity_lines(report.sensitivity)
    return "\n".join(lines)


def format_onnx_summary(export: OnnxExport) -> str:
    """The ONNX export's latency of the pruned model against the dense shapes, and its parity with PyTorch."""
    lines = _table([_latency_row(export.latency)])
    if export.latency.unreliable is not None:
        lines.append(f"  latency not measured reliably: {export.latency.unreliable}")
    lines.append(f"  onnxruntime vs PyTorch: max abs diff {export.parity['max_abs_diff']:.2g} "
                 f"(tolerance {export.parity['tolerance']:.2g})")
    return "\n".join(lines)


def format_metrics(metrics: Comparison) -> str:
    """`clip-prune evaluate`'s table: the metrics, the agreement with the dense model and the cascades."""
    return "\n".join(_table(_metric_rows(metrics)))


def _count_row(name: str, counts: DenseVsPruned, scale: float, unit: str) -> str:
    return _row(name, unit.format(counts.dense / scale), unit.format(counts.pruned / scale), f"{counts.ratio:.3f}")


def _latency_row(latency: LatencyComparison) -> str:
    dense, pruned = (f"{seconds * 1e3:.1f} ±{latency.spread[name]:.0%}"
                     for name, seconds in (("dense", latency.dense), ("pruned", latency.pruned)))
    speedup = f"{latency.speedup:.2f}x ±{latency.speedup_error:.0%}" if latency.reliable else "unreliable"
    return _row(f"latency ms (batch {latency.batch})", dense, pruned, speedup)


def _metric_rows(metrics: Comparison) -> list[str]:
    rows = []
    for task, values in metrics.dense.items():
        for name, dense in values.items():
            pruned = None if metrics.pruned is None else metrics.pruned.get(task, {}).get(name)
            if pruned is None:
                rows.append(_row(f"{task} {name} (%)", f"{dense:.1f}", "-", "-"))
            else:
                rows.append(_row(f"{task} {name} (%)", f"{dense:.1f}", f"{pruned:.1f}", f"{pruned - dense:+.1f}"))
    if metrics.cosine_to_dense is not None:
        agreement = metrics.cosine_to_dense
        rows.append(f"  image embeddings vs dense: cosine {agreement.mean:.4f} on average, {agreement.min:.4f} "
                    f"at worst ({agreement.images} images)")
    return rows + _cascade_rows(metrics)


def _cascade_rows(metrics: Comparison) -> list[str]:
    """Per M: the cascade's text-to-image recall and its gallery encoding cost, beside the dense model alone."""
    if not metrics.cascade:
        return []
    dense = metrics.dense.get("retrieval", {})
    rows = [_row("cascade: pruned top M", "dense", "cascade", "change")]
    for entry in metrics.cascade:
        m = f"M={entry.top_m}"
        for name, value in entry.retrieval.items():
            rows.append(_row(f"{m} {name} (%)", f"{dense[name]:.1f}", f"{value:.1f}", f"{value - dense[name]:+.1f}"))
        rows.append(_row(f"{m} dense encodings", str(entry.images), str(entry.reranked_images),
                         f"{entry.reranked_images / entry.images:.3f}"))
        macs, seconds = entry.macs, entry.seconds
        rows.append(_row(f"{m} gallery GMACs", f"{macs.dense / 1e9:.4g}", f"{macs.cascade / 1e9:.4g}",
                         f"{macs.ratio:.3f}"))
        rows.append(_row(f"{m} gallery s ({seconds.device})", f"{seconds.dense:.4g}", f"{seconds.cascade:.4g}",
                         f"{seconds.speedup:.2f}x"))
        rows.append(f"  {m}: fewer MACs than dense for the first {macs.break_even_queries} of "
                    f"{macs.queries} queries (random order)")
    return rows


def _pruning_lines(pruning: PruningRecord) -> list[str]:
    """Kept units, the latency budget (the table's prediction and what timing measured) and the chain of steps."""
    last = pruning.last
    lines = [f"  kept {int((last.head_mask != 0).sum())} heads, {int((last.neuron_mask != 0).sum())} neurons"]
    predicted = pruning.predicted_latency_ratio()
    if predicted is not None:
        table = pruning.widths.latency
        budget = f"the table predicts {predicted:.3f}"
        if last.budget_loop is not None:
            searches = len(last.budget_loop.rounds)
            budget = (f"measured {last.budget_loop.measured_ratio:.3f} of the dense tower after {searches} "
                      f"search{'es' if searches > 1 else ''}, {budget}")
        else:
            budget += " of the dense tower"
        lines.append(f"  latency budget: {budget} (batch {table.key['batch_size']}, {table.key['device']})")
    if len(pruning.steps) > 1:
        steps = ", ".join(f"{pruning.macs_ratio(step):.2f} ({int((step.head_mask != 0).sum())} h, "
                          f"{int((step.neuron_mask != 0).sum())} n)" for step in pruning.steps)
        lines.append(f"  {len(pruning.steps)} steps, MACs kept: {steps}")
    return lines


def _sensitivity_lines(sensitivity: SensitivityRecord) -> list[str]:
    """A sensitivity run's rounds (the layer reduced, its head kept, MACs left, the watched metric) and why it ended."""
    lines = [f"  round {entry.round:2d}: layer {entry.layer:2d} keeps head {entry.head:2d}, "
             f"MACs {entry.macs_ratio:.3f}" + (f", metric {entry.metric:.2f}" if entry.metric is not None else "")
             for entry in sensitivity.rounds]
    return [*lines, f"clip-prune sensitivity: {sensitivity.stop_reason()}"]
