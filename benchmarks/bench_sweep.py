"""One run over several constraints against one run per constraint, on the demo: wall time and each point's quality.

The sweep walks one chain of steps through every constraint (`PruningOptions.step_constraints`) and saves a model at
each; separate runs each walk their own chain from the dense model. Both are the real `clip-prune prune` command,
timed from start to exit (imports and loading included, as a user waits for them). The sweep and the single run at
the lowest constraint take turns `--rounds` times (the machine's drifts touch both alike) and the ratio is of their
medians; its target is at most 1.15. The points differ from the separate runs only by their step schedule, and the
table says by how much.

Run (after `clip-prune make-demo-data --root demo_data`):
    python benchmarks/bench_sweep.py [--constraints 0.6 0.4 0.2] [--samples 1024]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from clip_prune.core.run.tradeoff import point_folder

REPO = Path(__file__).resolve().parents[1]
COMPARED = ("macs_ratio", "t2i_R@1", "t2i_R@10", "i2t_R@1", "zero_shot_top1", "cosine_to_dense")
"""What the table sets side by side for each point: the MACs kept and what the model keeps of the dense one."""


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    parser.add_argument("--model", default=str(REPO / "demo" / "clip-tiny-synthetic"))
    parser.add_argument("--data", default="demo_data", help="COCO-format root (make-demo-data)")
    parser.add_argument("--constraints", type=float, nargs="+", default=[0.6, 0.4, 0.2])
    parser.add_argument("--samples", type=int, default=1024, help="calibration images")
    parser.add_argument("--reconstruct-samples", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3, help="turns of the sweep and the run at the lowest constraint")
    return parser.parse_args()


def prune(args: argparse.Namespace, constraint: str, output: Path) -> float:
    """Seconds of one `clip-prune prune` run from start to exit."""
    command = [sys.executable, "-m", "clip_prune", "prune", "--config", args.config, "--model.pretrained", args.model,
               "--data.root", args.data, "--data.zero_shot_root", str(Path(args.data) / "zeroshot"),
               "--data.num_samples", str(args.samples), "--options.reconstruct_samples",
               str(args.reconstruct_samples), "--constraint", constraint, "--output_dir", str(output),
               "--trainer.logger", "false"]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env={**os.environ, "CLIP_PRUNE_DEBUG": "1"})
    return time.perf_counter() - start


def quality(report: dict) -> dict[str, float | None]:
    """The compared figures of one run's report.json."""
    pruned = report.get("metrics", {}).get("pruned", {})
    return {"macs_ratio": report["macs"]["ratio"],
            **{name: pruned.get("retrieval", {}).get(name) for name in ("t2i_R@1", "t2i_R@10", "i2t_R@1")},
            "zero_shot_top1": pruned.get("zero_shot", {}).get("top1"),
            "cosine_to_dense": report.get("metrics", {}).get("cosine_to_dense", {}).get("mean")}


def main() -> None:
    args = _parse_args()
    constraints = sorted(args.constraints, reverse=True)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        lowest = constraints[-1]
        separate = {c: prune(args, str(c), folder / f"single-{c}") for c in constraints[:-1]}
        lowest_runs, sweeps = [], []
        for round_ in range(args.rounds):
            lowest_runs.append(prune(args, str(lowest), folder / f"single-{lowest}-{round_}"))
            sweeps.append(prune(args, json.dumps(constraints), folder / f"sweep-{round_}"))
        separate[lowest] = statistics.median(lowest_runs)
        sweep = statistics.median(sweeps)
        print(f"wall time, {args.samples} calibration images, {os.cpu_count()} CPU cores "
              f"(1-minute load {os.getloadavg()[0]:.1f} at the end)")
        for constraint, seconds in separate.items():
            print(f"  separate run at {constraint:g}: {seconds:7.1f} s")
        print(f"  separate runs, all:     {sum(separate.values()):7.1f} s")
        print(f"  run at {lowest:g}, each round: {', '.join(f'{t:.1f}' for t in lowest_runs)} s; sweep, each round: "
              f"{', '.join(f'{t:.1f}' for t in sweeps)} s")
        print(f"  one sweep over {', '.join(f'{c:g}' for c in constraints)}: {sweep:7.1f} s (median) = "
              f"{sweep / separate[lowest]:.2f} x the run at {lowest:g} (target <= 1.15), "
              f"{sweep / sum(separate.values()):.2f} x all separate runs")
        stages = {name: json.loads((folder / run / "report.json").read_text())["timings_s"]
                  for name, run in ((f"run at {lowest:g}", f"single-{lowest}-0"), ("sweep", "sweep-0"))}
        print("  seconds per stage in the first round (the report's timings_s; the rest of the wall time is start-up):")
        for name, timings in stages.items():
            print(f"    {name:>10}: " + ", ".join(f"{stage} {seconds:.1f}" for stage, seconds in timings.items()))
        print("\nper point: separate run | sweep | sweep - separate")
        print(f"  {'constraint':>10} " + "".join(f"{name:>30}" for name in COMPARED))
        for constraint in constraints:
            alone_dir = folder / (f"single-{constraint}" if constraint != lowest else f"single-{constraint}-0")
            alone = quality(json.loads((alone_dir / "report.json").read_text()))
            chained = quality(json.loads((folder / "sweep-0" / point_folder(constraint) / "report.json").read_text()))
            cells = [f"{alone[name]:.4g} | {chained[name]:.4g} | {chained[name] - alone[name]:+.3g}"
                     if alone[name] is not None else "-" for name in COMPARED]
            print(f"  {constraint:>10g} " + "".join(f"{cell:>30}" for cell in cells))


if __name__ == "__main__":
    main()
