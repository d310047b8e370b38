"""What `import clip_prune` costs a user who only loads a pruned model, against the imports it cannot avoid.

Each statement runs in a fresh interpreter, the statements taking turns `--repeats` times (a drift of the machine's
speed touches all alike); the table gives their median seconds and their ratio to `import torch, transformers`.
`transformers.modeling_utils` is what any model class of transformers imports: `import clip_prune` registers the
pruned classes (so that `AutoModel.from_pretrained` opens a pruned directory) without it, and pays it only when a
model is loaded (`clip_prune/registration.py`).

Run:
    python benchmarks/bench_import.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

STATEMENTS = {
    "import torch, transformers": "import torch, transformers",
    "import torch, transformers.modeling_utils": "import torch, transformers.modeling_utils",
    "import clip_prune": "import clip_prune",
    "import clip_prune.lightning.cli (the CLI)": "import clip_prune.lightning.cli",
}
"""What is timed: the baseline first."""


def seconds(statement: str) -> float:
    """Wall seconds of a fresh interpreter that runs `statement` and exits."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", statement], check=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="fresh interpreters per statement (default: 5)")
    args = parser.parse_args(argv)
    times: dict[str, list[float]] = {name: [] for name in STATEMENTS}
    for _ in range(args.repeats):
        for name, statement in STATEMENTS.items():
            times[name].append(seconds(statement))
    baseline = statistics.median(times["import torch, transformers"])
    print(f"| statement | median s ({args.repeats} fresh interpreters each) | ratio to import torch, transformers |")
    print("|---|---|---|")
    for name, values in times.items():
        print(f"| `{name}` | {statistics.median(values):.2f} | {statistics.median(values) / baseline:.2f} |")


if __name__ == "__main__":
    main()
