"""The short table `clip-prune` prints at the end of a run: what pruning gained and what it cost."""

from __future__ import annotations

from typing import Any


def _row(name: str, dense: str, pruned: str, change: str = "") -> str:
    return f"  {name:<22}{dense:>14}{pruned:>14}{change:>12}"


def format_summary(report: dict[str, Any]) -> str:
    """A plain-text table of MACs, parameters, latency, metrics and stage timings from `report.json`."""
    lines: list[str] = []
    for key, name, scale, unit in (("macs", "encoder GMACs/image", 1e9, "{:.4f}"),
                                   ("macs_counted", "  counted (torch)", 1e9, "{:.4f}"),
                                   ("parameters", "vision params (M)", 1e6, "{:.3f}")):
        if key in report:
            values = report[key]
            lines.append(_row(name, unit.format(values["dense"] / scale), unit.format(values["pruned"] / scale),
                              f"{values['ratio']:.3f}"))
    if "latency_s" in report:
        latency = report["latency_s"]
        spread = latency.get("spread", {})
        dense, pruned = (f"{latency[key] * 1e3:.1f}" + (f" ±{spread[key]:.0%}" if key in spread else "")
                         for key in ("dense", "pruned"))
        error = f" ±{latency['speedup_error']:.0%}" if "speedup_error" in latency else ""
        speedup = f"{latency['speedup']:.2f}x{error}" if latency.get("reliable", True) else "unreliable"
        lines.append(_row(f"latency ms (batch {latency['batch']})", dense, pruned, speedup))
    metrics = report.get("metrics", {})
    for task, values in metrics.get("dense", {}).items():
        for name, dense in values.items():
            pruned = metrics.get("pruned", {}).get(task, {}).get(name)
            if pruned is None:
                lines.append(_row(f"{task} {name} (%)", f"{dense:.1f}", "-", "-"))
            else:
                lines.append(_row(f"{task} {name} (%)", f"{dense:.1f}", f"{pruned:.1f}", f"{pruned - dense:+.1f}"))
    if "cosine_to_dense" in metrics:
        agreement = metrics["cosine_to_dense"]
        lines.append(f"  image embeddings vs dense: cosine {agreement['mean']:.4f} on average, {agreement['min']:.4f} "
                     f"at worst ({agreement['images']} images)")
    lines += _cascade_rows(metrics)
    if lines:
        lines = ["", "clip-prune summary", _row("", "dense", "pruned", "ratio"), *lines]
    if "fisher_samples" in report:
        source = report.get("fisher_source")
        lines.append(f"  Fisher statistics of {report['fisher_samples']} samples"
                     + (f", reused from {source}" if source else ""))
    if "kept" in report:
        lines.append(f"  kept {report['kept']['heads']} heads, {report['kept']['neurons']} neurons")
    if "predicted_ratio" in report.get("latency", {}):
        budget = report["latency"]
        predicted = f"the table predicts {budget['predicted_ratio']:.3f}"
        if "measured_ratio" in budget:
            searches = len(budget["budget_loop"]["rounds"])
            predicted = (f"measured {budget['measured_ratio']:.3f} of the dense tower after {searches} "
                         f"search{'es' if searches > 1 else ''}, {predicted}")
        else:
            predicted += " of the dense tower"
        lines.append(f"  latency budget: {predicted} (batch {budget['batch_size']}, {budget['device']})")
    if len(report.get("steps", [])) > 1:
        steps = ", ".join(f"{step['macs_ratio']:.2f} ({step['kept_heads']} h, {step['kept_neurons']} n)"
                          for step in report["steps"])
        lines.append(f"  {len(report['steps'])} steps, MACs kept: {steps}")
    if "startup_s" in report:
        laps = {stage: seconds for stage, seconds in report["startup_s"].items() if stage != "total"}
        stages = ", ".join(f"{stage.replace('_', ' ')} {seconds:.1f}s" for stage, seconds in laps.items())
        lines.append(f"  before the first batch: {report['startup_s']['total']:.1f}s ({stages})")
    if "timings_s" in report:
        stages = ", ".join(f"{stage} {seconds:.1f}s" for stage, seconds in report["timings_s"].items())
        lines.append(f"  time: {stages}")
    if "unreliable" in report.get("latency_s", {}):
        lines.append(f"  latency not measured reliably: {report['latency_s']['unreliable']}")
    for warning in report.get("warnings", []):
        lines.append(f"  warning: {warning}")
    if "rounds" in report:
        lines += _sensitivity_rows(report)
    return "\n".join(lines)


def _sensitivity_rows(report: dict[str, Any]) -> list[str]:
    """A sensitivity run's rounds (the layer reduced, its head kept, MACs left, the watched metric) and why it ended."""
    lines = [f"  round {entry['round']:2d}: layer {entry['layer']:2d} keeps head {entry['head']:2d}, "
             f"MACs {entry['macs_ratio']:.3f}" + (f", metric {entry['metric']:.2f}" if "metric" in entry else "")
             for entry in report["rounds"]]
    return [*lines, f"clip-prune sensitivity: {stop_reason(report)}"]


def stop_reason(report: dict[str, Any]) -> str:
    """Why a sensitivity run ended, from its report: the early stop, or every layer reduced."""
    last = report["rounds"][-1]
    if "stopped" in last:
        return f"stopped after round {last['round']}: {last['stopped']}"
    if report["dense_metric"] is None:
        return f"all {len(report['rounds'])} layers reduced to one head (no evaluation data, so no early stop)"
    return (f"all {len(report['rounds'])} layers reduced to one head; {report['stop_metric']} stayed above "
            f"{report['stop_ratio']} x dense {report['dense_metric']:.2f}")


def _cascade_rows(metrics: dict[str, Any]) -> list[str]:
    """Per M: the cascade's text-to-image recall and its gallery encoding cost, beside the dense model alone."""
    entries = metrics.get("cascade", [])
    if not entries:
        return []
    dense = metrics.get("dense", {}).get("retrieval", {})
    lines = [_row("cascade: pruned top M", "dense", "cascade", "change")]
    for entry in entries:
        m = f"M={entry['top_m']}"
        for name, value in entry["retrieval"].items():
            lines.append(_row(f"{m} {name} (%)", f"{dense[name]:.1f}", f"{value:.1f}", f"{value - dense[name]:+.1f}"))
        lines.append(_row(f"{m} dense encodings", str(entry["images"]), str(entry["reranked_images"]),
                          f"{entry['reranked_images'] / entry['images']:.3f}"))
        macs, seconds = entry["macs"], entry["seconds"]
        lines.append(_row(f"{m} gallery GMACs", f"{macs['dense'] / 1e9:.4g}", f"{macs['cascade'] / 1e9:.4g}",
                          f"{macs['ratio']:.3f}"))
        lines.append(_row(f"{m} gallery s ({seconds['device']})", f"{seconds['dense']:.4g}",
                          f"{seconds['cascade']:.4g}", f"{seconds['speedup']:.2f}x"))
        lines.append(f"  {m}: fewer MACs than dense for the first {macs['break_even_queries']} of "
                     f"{macs['queries']} queries (random order)")
    return lines
