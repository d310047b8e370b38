"""Every benchmark runs, at its smallest size: a renamed option or module fails here, not in a user's run.

The figures of these runs mean nothing (tiny shapes, a few images); `docs/benchmarks.md` holds the measured ones.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from clip_prune.data.synthetic import write_synthetic_coco

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
DATA = "{data}"
"""Stands for a tiny demo data set (`make-demo-data`'s format), written once for the tests that need one."""
TMP = "{tmp}"
"""Stands for a scratch folder of the test's own."""

SMALLEST = {
    "bench_fisher.py": ["--layers", "1", "--image-size", "32", "--batch-size", "2", "--repeats", "1",
                        "--samples", "2"],
    "bench_import.py": ["--repeats", "1"],
    "bench_latency.py": ["--image-size", "32", "--batch-size", "2", "--runs", "1", "--warmup", "0",
                         "--constraints", "0.5"],
    "bench_latency_budget.py": ["--budgets", "0.5", "--rounds", "1", "--samples", "2", "--batch-size", "2",
                                "--pairs", "1", "--image-size", "32", "--layers", "1"],
    "bench_pipeline.py": ["--samples", "2", "--eval-images", "2", "--batch-size", "2", "--image-size", "32",
                          "--layers", "1"],
    "bench_quality.py": ["--data", DATA, "--constraints", "0.5", "--samples", "8", "--batch-size", "8",
                         "--stages", "search", "steps", "baselines"],
    "bench_reconstruct.py": ["--samples", "2", "--batch-size", "2", "--image-size", "32", "--layers", "1"],
    "bench_scale.py": ["--samples", "2", "--eval-images", "2", "--batch-size", "2", "--workers", "1",
                       "--image-size", "32", "--layers", "1", "--cache", TMP],
    "bench_search.py": ["--samples", "4", "--layers", "1", "--constraints", "0.5"],
    "bench_sweep.py": ["--data", DATA, "--constraints", "0.6", "0.5", "--samples", "4", "--reconstruct-samples", "4",
                       "--rounds", "1"],
}
"""Each benchmark's options for its smallest run."""


def test_every_benchmark_has_a_smallest_run() -> None:
    assert sorted(path.name for path in BENCHMARKS.glob("bench_*.py")) == sorted(SMALLEST)


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_coco(tmp_path_factory.mktemp("bench") / "demo_data", num_train=16, num_val=10,
                                image_size=64, seed=0, zero_shot_per_class=2)


@pytest.mark.parametrize("script", sorted(SMALLEST))
def test_the_benchmark_runs_at_its_smallest_size(script: str, demo_data: Path, tmp_path: Path) -> None:
    args = [arg.replace(DATA, str(demo_data)).replace(TMP, str(tmp_path)) for arg in SMALLEST[script]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CLIP_PRUNE_DEBUG": "1"}
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True,
                            cwd=REPO, env=env, timeout=600)
    assert result.returncode == 0, f"{script} {' '.join(args)}:\n{result.stderr[-3000:]}"
    assert result.stdout.strip(), f"{script} printed nothing"
