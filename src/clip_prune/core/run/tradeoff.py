"""The trade-off of a run over several constraints: one row per point (the dense model first) of what it costs and
what it keeps, as a table (`tradeoff.csv`, `tradeoff.json`, the console) and a picture (`tradeoff.png`).

The rows are read from the points' own reports, so the table and each `OUTPUT_DIR/cX/report.json` cannot disagree.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from clip_prune.core.run.report import RunReport

RECALLS = ("t2i_R@1", "t2i_R@5", "t2i_R@10", "i2t_R@1", "i2t_R@5", "i2t_R@10")
"""Retrieval recalls of a row, in percent."""
PLOTTED = ("t2i_R@1", "t2i_R@10")
"""The recalls drawn against cost: text-to-image search, the job a pruned first stage does."""


def point_folder(constraint: float) -> str:
    """The folder of one point of a run over several constraints, e.g. `c0.75`."""
    return f"c{constraint:g}"


def tradeoff_rows(reports: dict[float, RunReport]) -> list[dict[str, Any]]:
    """The dense row and one row per point (by falling constraint) from each point's report."""
    first = next(iter(reports.values()))
    rows = [_row(first, "dense", 1.0)]
    for constraint in sorted(reports, reverse=True):
        rows.append(_row(reports[constraint], "pruned", constraint))
    return rows


def _row(report: RunReport, model: str, constraint: float) -> dict[str, Any]:
    pruned = model == "pruned"
    costs = None if report.export is None else report.export.costs  # none where the model was not saved
    latency = None if costs is None else costs.latency
    metrics = report.metrics
    scores = {} if metrics is None else (metrics.dense if not pruned else metrics.pruned or {})
    row: dict[str, Any] = {
        "model": model,
        "constraint": constraint,
        "macs_ratio": report.pruning.macs_kept().ratio if pruned else 1.0,
        "parameters": None if costs is None else getattr(costs.parameters, model),
        "latency_ms": None if latency is None else 1e3 * getattr(latency, model),
        "latency_spread": None if latency is None else latency.spread[model],
        "speedup": None if latency is None else (latency.speedup if pruned else 1.0),
        "speedup_error": latency.speedup_error if latency is not None and pruned else None,
        "latency_reliable": None if latency is None else latency.reliable,
    }
    row |= {name: scores.get("retrieval", {}).get(name) for name in RECALLS}
    row["zero_shot_top1"] = scores.get("zero_shot", {}).get("top1")
    agreement = None if metrics is None else metrics.cosine_to_dense
    row["cosine_to_dense"] = (None if agreement is None else agreement.mean) if pruned else 1.0
    for entry in metrics.cascade if metrics is not None and pruned else []:
        prefix = f"cascade_M{entry.top_m}"
        row |= {f"{prefix}_{name}": value for name, value in entry.retrieval.items()}
        row[f"{prefix}_gallery_macs_ratio"] = entry.macs.ratio
        row[f"{prefix}_reranked_fraction"] = entry.reranked_images / entry.images
    return row


def tradeoff_csv(rows: list[dict[str, Any]]) -> str:
    """The rows as CSV, one column per key any row has (empty where a row has none, e.g. the dense cascade)."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    text = io.StringIO()
    writer = csv.DictWriter(text, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def cascade_names(rows: list[dict[str, Any]]) -> list[str]:
    """The cascades the rows measured, by M: `M10`, `M50`."""
    names = {key.split("_")[1] for row in rows for key in row if key.startswith("cascade_M")}
    return sorted(names, key=lambda name: int(name[1:]))


def format_tradeoff(rows: list[dict[str, Any]]) -> str:
    """The console's table: per row MACs, parameters, speedup and the headline recalls."""
    cascades = cascade_names(rows)
    head = ["constraint", "MACs", "params M", "speedup", "t2i R@1", "t2i R@10", "i2t R@1", "zero-shot",
            "cos dense", *(f"{m} t2i R@1" for m in cascades)]
    lines = ["", "clip-prune trade-off", "  " + "".join(f"{name:>12}" for name in head)]
    for row in rows:
        speedup = row["speedup"]
        cells = [
            "dense" if row["model"] == "dense" else f"{row['constraint']:g}", _cell(row["macs_ratio"], "{:.3f}"),
            _cell(None if row["parameters"] is None else row["parameters"] / 1e6, "{:.3f}"),
            "unreliable" if row["latency_reliable"] is False and row["model"] != "dense"
            else _cell(speedup, "{:.2f}x") + ("" if row["speedup_error"] is None else f" ±{row['speedup_error']:.0%}"),
            _cell(row["t2i_R@1"], "{:.1f}"), _cell(row["t2i_R@10"], "{:.1f}"), _cell(row["i2t_R@1"], "{:.1f}"),
            _cell(row["zero_shot_top1"], "{:.1f}"), _cell(row["cosine_to_dense"], "{:.4f}"),
            *(_cell(row.get(f"cascade_{m}_t2i_R@1"), "{:.1f}") for m in cascades),
        ]
        lines.append("  " + "".join(f"{cell:>12}" for cell in cells))
    return "\n".join(lines)


def _cell(value: float | None, form: str) -> str:
    return "-" if value is None else form.format(value)


def plot_tradeoff(rows: list[dict[str, Any]], path: Path) -> str | None:
    """Draw text-to-image recall (and each cascade's) against MACs kept and against measured speedup into `path`;
    return why not where it cannot be drawn (matplotlib, an optional extra, is not installed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display is needed or wanted
        from matplotlib import pyplot
    except ImportError:
        return "tradeoff.png needs matplotlib: pip install 'clip-prune[plot]'"
    points = [row for row in rows if row["model"] == "pruned"]
    dense = rows[0]
    cascades = cascade_names(points)
    # (the rows' key, the dense row's, label, style): every curve starts at the dense model, a cascade's too (its
    # first stage dense, it is the dense model)
    series = [(name, name, name, "-o") for name in PLOTTED if dense.get(name) is not None]
    series += [(f"cascade_{m}_{name}", name, f"{name}, cascade {m}", "--s") for m in cascades for name in PLOTTED]
    figure, axes = pyplot.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for axis, x_key, label in ((axes[0], "macs_ratio", "encoder MACs kept (fraction of dense)"),
                               (axes[1], "speedup", "measured speedup over dense (batch, this device)")):
        for key, dense_key, name, style in series:
            shown = [(row[x_key], row[key]) for row in points
                     if row.get(x_key) is not None and row.get(key) is not None]
            if shown and dense.get(dense_key) is not None and dense.get(x_key) is not None:
                shown.append((dense[x_key], dense[dense_key]))
            if shown:
                axis.plot(*zip(*sorted(shown), strict=True), style, label=name)
        for name in PLOTTED:
            if dense.get(name) is not None and dense.get(x_key) is not None:
                axis.plot([dense[x_key]], [dense[name]], "k*", markersize=12)
        axis.plot([], [], "k*", markersize=12, label="dense")
        axis.set_xlabel(label)
        axis.set_ylabel("recall (%)")
        axis.grid(alpha=0.3)
    axes[0].invert_xaxis()  # left to right: more pruning
    axes[0].legend(fontsize=8)
    figure.suptitle("text-to-image retrieval against cost")
    figure.savefig(path, dpi=120)
    pyplot.close(figure)
    return None
