"""Does a latency budget hold on this machine? The real `clip-prune prune --constraint_type latency` on ViT-B/16 shapes.

A random-weight CLIP with ViT-B/16's vision tower is pruned from real Fisher statistics (synthetic COCO-format
images) at each budget, first with a freshly measured latency table, then with the cached table made stale on
purpose (every timing scaled by `--stale-factor`, as if measured on a slower or busier machine). Each saved tower is
then timed again in this process, apart from the run, both loaded from disk as a user would load them (interleaved
pairs at the table's batch, median ratio), and the ratio to the budget is printed beside what the run measured and
what its table predicted:

    python benchmarks/bench_latency_budget.py                      # budgets 0.75 and 0.5, 4 searches at most
    python benchmarks/bench_latency_budget.py --rounds 1           # the table alone, no timed correction
    python benchmarks/bench_latency_budget.py --accelerator gpu --batch-size 64 --samples 256   # on a GPU

Times on a 2-core CPU: a few minutes per run (the table, three Fisher passes at 0.5, the timed searches).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_pipeline import save_vit_b16_clip  # noqa: E402

from clip_prune.core.deploy.saving import load_pruned  # noqa: E402
from clip_prune.core.timing import interleaved_seconds  # noqa: E402
from clip_prune.data.synthetic import write_synthetic_coco  # noqa: E402
from clip_prune.towers import load_model, tower_of  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.75, 0.5], help="latency constraints")
    parser.add_argument("--rounds", type=int, default=4, help="--options.latency_rounds of the runs (default: 4)")
    parser.add_argument("--stale-factor", type=float, default=1.5, help="timings of the stale table x this")
    parser.add_argument("--samples", type=int, default=16, help="calibration images (default: 16)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per batch and per timing (default: 8)")
    parser.add_argument("--pairs", type=int, default=7, help="timed dense/pruned pairs of the check (default: 7)")
    parser.add_argument("--image-size", type=int, default=224, help="ViT-B/16 input size (smaller: a quick try)")
    parser.add_argument("--layers", type=int, default=12, help="encoder layers (ViT-B/16: 12; fewer: a quick try)")
    parser.add_argument("--accelerator", choices=["cpu", "gpu"], default="cpu", help="where the runs and the check run")
    return parser.parse_args(argv)


def prune(model: Path, data: Path, output: Path, budget: float, args: argparse.Namespace,
          environment: dict[str, str]) -> dict:
    """One `clip-prune prune` run in its own process; its report."""
    command = [sys.executable, "-m", "clip_prune", "prune", "--model.pretrained", str(model), "--data.root", str(data),
               "--data.num_samples", str(args.samples), "--data.batch_size", str(args.batch_size),
               "--data.num_workers", "1", "--options.reconstruct_samples", str(args.samples),
               "--trainer.accelerator", args.accelerator,
               "--constraint", str(budget), "--constraint_type", "latency", "--options.latency_rounds",
               str(args.rounds), "--output_dir", str(output), "--trainer.logger", "false",
               "--trainer.enable_progress_bar", "false"]
    finished = subprocess.run(command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if finished.returncode != 0:
        sys.exit(f"clip-prune failed at budget {budget}:\n{finished.stderr}")
    return json.loads((output / "report.json").read_text())


@torch.inference_mode()
def measured_ratio(model: Path, pruned: Path, batch_size: int, pairs: int, device: torch.device) -> float:
    """The saved tower's latency over the dense one's, timed here in interleaved pairs: the median ratio."""
    dense = tower_of(load_model(str(model)).eval().to(device))
    small = tower_of(load_pruned(str(pruned)).eval().to(device))
    inputs = dense.example_inputs(batch_size)
    times = interleaved_seconds([lambda: dense.vision(**inputs), lambda: small.vision(**inputs)],
                                device, warmup=1, repeats=pairs)
    return statistics.median(p / d for d, p in zip(*times, strict=True))


def make_stale(cache: Path, factor: float) -> None:
    """Scale every timing of the cached tables by `factor`, as if they had been measured on a slower machine."""
    for path in (cache / "clip_prune" / "latency").glob("*.json"):
        table = json.loads(path.read_text())
        for name in ("attention_s", "mlp_s"):
            table[name] = [factor * seconds for seconds in table[name]]
        table["dense_s"], table["empty_s"] = factor * table["dense_s"], factor * table["empty_s"]
        path.write_text(json.dumps(table))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        save_vit_b16_clip(root / "model", image_size=args.image_size, layers=args.layers)
        write_synthetic_coco(root / "data", num_train=args.samples, num_val=8, image_size=args.image_size)
        environment = {**os.environ, "XDG_CACHE_HOME": str(root / "cache")}
        for table in ("fresh", "stale"):
            if table == "stale":
                make_stale(root / "cache", args.stale_factor)
            for budget in args.budgets:
                output = root / f"{table}-{budget}"
                report = prune(root / "model", root / "data", output, budget, args, environment)
                latency = report["latency"]
                check = measured_ratio(root / "model", output / "pruned", args.batch_size, args.pairs,
                                       torch.device("cuda" if args.accelerator == "gpu" else "cpu"))
                rows.append((table, latency["table_source"]["how"], budget, latency["predicted_ratio"],
                             latency.get("measured_ratio", float("nan")),
                             len(latency.get("budget_loop", {}).get("rounds", [])), check))
                if table == "stale":  # each run re-measures the stale table: make it stale again for the next
                    make_stale(root / "cache", args.stale_factor)
    print(f"\nViT-B/16-shaped CLIP (random weights), {args.samples} calibration images, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, latency_rounds {args.rounds}")
    print(f"{'table':<6} {'source':<12} {'budget':>6} {'table ratio':>11} {'run measured':>12} {'searches':>8} "
          f"{'check':>6} {'check/budget':>12}")
    for table, source, budget, predicted, run_measured, searches, check in rows:
        print(f"{table:<6} {source:<12} {budget:>6.2f} {predicted:>11.3f} {run_measured:>12.3f} {searches:>8d} "
              f"{check:>6.3f} {check / budget:>12.3f}")


if __name__ == "__main__":
    main()
