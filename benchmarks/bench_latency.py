"""Latency of a physically pruned ViT-B/16 vision tower against the dense one (CPU or GPU), and latency budgets.

For each FLOP constraint c, two pruned copies of one random-weight ViT-B/16 tower: a
uniform one (every layer keeps round(c·H) heads and round(c·F) neurons) and a random
one with the same totals spread over the layers at random, so both have the same
analytic FLOPs (docs/design.md, "FLOP-constrained search"). Prints the analytic FLOP ratio of
the encoder, the ideal speedup 1/ratio, the measured speedup and measured/ideal. The models are
timed round-robin, so load from other processes slows them alike. Example:

    python benchmarks/bench_latency.py --constraints 0.4 0.5 0.75 --runs 5 --threads 2
    python benchmarks/bench_latency.py --device cuda --dtype bfloat16 --batch-size 128 --runs 10 --warmup 3

`--device` and `--dtype` place the models and pixels (default: CPU, float32); every forward is
timed with `clip_prune.core.pruning.latency_table.timed_call`, which synchronises a GPU before and after.

Latency-budget rows (`--latency-constraints`): a latency table is measured for this device and dtype
at the benchmark's batch (core/pruning/latency_table.py, cached), masks are searched within c times the dense
latency by the table (core/pruning/search.py) from synthetic log-normal scores with per-layer scales
(a stand-in for Fisher scores: this machine cannot download a trained ViT-B/16), and the pruned
towers are timed against the dense one. Each latency-budget row is paired with the FLOP-constrained
masks (search_masks) whose table latency is the same, found by bisection on the FLOP constraint,
to compare the objective at equal latency; `--multiple-of` adds rows with widths held to multiples:

    python benchmarks/bench_latency.py --constraints --latency-constraints 0.75 0.5 --multiple-of 64
"""

import argparse
import os
import statistics
from functools import partial

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from clip_prune.core.deploy.saving import cut_pruned_model
from clip_prune.core.pruning.costs import mac_costs
from clip_prune.core.pruning.latency_table import LatencyTable, cached_latency_table
from clip_prune.core.pruning.masks import mask_shapes
from clip_prune.core.pruning.search import search_layer_latency, search_masks
from clip_prune.core.timing import timed_call

DTYPES = {"float32": (torch.float32, "fp32"), "bfloat16": (torch.bfloat16, "bf16"), "float16": (torch.float16, "fp16")}


def uniform_masks(config: CLIPVisionConfig, constraint: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks ([L, H], [L, F]) keeping the first round(c·H) heads and round(c·F) neurons of every layer."""
    layers, heads, neurons = config.num_hidden_layers, config.num_attention_heads, config.intermediate_size
    head_mask, neuron_mask = torch.zeros(layers, heads), torch.zeros(layers, neurons)
    head_mask[:, : round(constraint * heads)] = 1
    neuron_mask[:, : round(constraint * neurons)] = 1
    return head_mask, neuron_mask


def random_widths(total: int, layers: int, cap: int, generator: torch.Generator) -> list[int]:
    """`layers` random widths in [0, cap] summing to `total` (Dirichlet(1) shares, then topped up)."""
    shares = -torch.rand(layers, generator=generator).log()
    widths = (shares / shares.sum() * total).floor().long().clamp(max=cap)
    while (missing := total - int(widths.sum())) > 0:
        room = torch.nonzero(widths < cap).flatten()
        picks = room[torch.randint(len(room), (min(missing, len(room)),), generator=generator)].unique()
        widths[picks] += 1
    return widths.tolist()


def random_masks(head_mask: torch.Tensor, neuron_mask: torch.Tensor,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks with as many heads and neurons in all as the given ones, at random per-layer widths and units."""
    masks = []
    for mask in (head_mask, neuron_mask):
        layers, units = mask.shape
        random_mask = torch.zeros_like(mask)
        for layer, width in enumerate(random_widths(int(mask.count_nonzero()), layers, units, generator)):
            random_mask[layer, torch.randperm(units, generator=generator)[:width]] = 1
        masks.append(random_mask)
    return masks[0], masks[1]


@torch.inference_mode()
def forward_seconds(model: torch.nn.Module, pixel_values: torch.Tensor) -> float:
    """Wall-clock seconds of one forward pass (on a GPU, synchronised before and after)."""
    return timed_call(partial(model, pixel_values=pixel_values), pixel_values.device)[0]


def interleaved_seconds(models: dict[str, torch.nn.Module], pixel_values: torch.Tensor, warmup: int,
                        runs: int) -> dict[str, list[float]]:
    """Forward times of each model, timed round-robin so that load from other processes hits all alike."""
    for model in models.values():
        for _ in range(warmup):
            forward_seconds(model, pixel_values)
    seconds: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(runs):
        for name, model in models.items():
            seconds[name].append(forward_seconds(model, pixel_values))
    return seconds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--constraints", type=float, nargs="*", default=[0.4, 0.5, 0.75],
                        help="FLOP constraints c in (0, 1] to prune to (default: 0.4 0.5 0.75; none to skip)")
    parser.add_argument("--latency-constraints", type=float, nargs="*", default=[],
                        help="latency constraints for the latency-budget rows (e.g. 0.75 0.5; default: none)")
    parser.add_argument("--multiple-of", type=int, default=None,
                        help="also search the latency-budget rows with widths at multiples of this (e.g. 64)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default: 8)")
    parser.add_argument("--image-size", type=int, default=224, help="image side in pixels (default: 224)")
    parser.add_argument("--runs", type=int, default=5, help="timed forward passes per model (default: 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed forward passes first (default: 2)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice, usually the core count)")
    parser.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa", help="attention implementation")
    parser.add_argument("--device", default="cpu", help="where the models run, e.g. cuda (default: cpu)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32",
                        help="parameter and pixel dtype (default: float32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and masks")
    return parser.parse_args(argv)


def synthetic_scores(config: CLIPVisionConfig, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-normal head [L, H] and neuron [L, F] scores with per-layer scales; a head weighs about as much as
    the 144 neurons of its MACs."""
    generator = torch.Generator().manual_seed(seed)
    layers, heads, neurons = config.num_hidden_layers, config.num_attention_heads, config.intermediate_size
    layer_heads = torch.randn(layers, 1, generator=generator).exp()
    layer_neurons = torch.randn(layers, 1, generator=generator).exp()
    head_scores = 144 * layer_heads * (torch.randn(layers, heads, generator=generator) * 0.8).exp()
    neuron_scores = layer_neurons * (torch.randn(layers, neurons, generator=generator) * 1.2).exp()
    return head_scores, neuron_scores


def flop_masks_at_latency(scores: tuple[torch.Tensor, torch.Tensor], macs, table: LatencyTable, latency: float):
    """FLOP-constrained masks whose table latency is `latency` (bisection on the FLOP constraint)."""
    low, high = 1e-3, 1.0
    for _ in range(40):
        middle = (low + high) / 2
        result = search_masks(*scores, macs, middle)
        widths = (result.head_mask.sum(1).long().tolist(), result.neuron_mask.sum(1).long().tolist())
        low, high = (middle, high) if table.latency_of(*widths) <= latency else (low, middle)
    result = search_masks(*scores, macs, low)
    return result.head_mask, result.neuron_mask, result.objective, low


def latency_budget_rows(args: argparse.Namespace, config: CLIPVisionConfig) -> tuple[dict, dict]:
    """Masks of the latency-budget rows, and what each row reports beside its timing.

    The `--multiple-of` rows use a table timed at the widths they may choose (multiples, as the CLI does)."""
    tables = {}
    for multiple in [1] + ([args.multiple_of] if args.multiple_of else []):
        table, source = cached_latency_table(config, args.batch_size, torch.device(args.device),
                                             DTYPES[args.dtype][0], attn_implementation=args.attn,
                                             multiple_of=multiple)
        print(f"latency table (widths at multiples of {multiple}) {source.describe()}: "
              f"{table.key['device']}; dense {table.dense_s:.3f} s, empty tower {table.fixed_s:.3f} s, layer scale "
              f"{table.scale:.2f}; attention fit {table.attention_fit}; MLP fit {table.mlp_fit}")
        tables[multiple] = table
    scores = synthetic_scores(config, args.seed)
    macs = mac_costs(config)
    head_dim = config.hidden_size // config.num_attention_heads
    masks, notes = {}, {}
    for constraint in args.latency_constraints:
        for multiple, table in tables.items():
            result = search_layer_latency(*scores, table, constraint, head_dim, multiple)
            name = "latency" if multiple == 1 else f"lat x{multiple}"
            masks[(name, constraint)] = (result.head_mask, result.neuron_mask)
            notes[(name, constraint)] = (result.objective, (table.fixed_s + result.cost) / table.dense_latency)
            if multiple == 1:
                head_mask, neuron_mask, objective, _ = flop_masks_at_latency(
                    scores, macs, table, table.fixed_s + result.cost)
                masks[("macs@lat", constraint)] = (head_mask, neuron_mask)
                widths = (head_mask.sum(1).long().tolist(), neuron_mask.sum(1).long().tolist())
                notes[("macs@lat", constraint)] = (objective, table.latency_of(*widths) / table.dense_latency)
    return masks, notes


def print_latency_budget_rows(notes: dict, masks: dict, seconds: dict[tuple, list[float]]) -> None:
    header = (f"{'masks':<10} {'c':>5} {'heads':>5} {'neurons':>7} {'objective':>10} {'table ratio':>11} "
              f"{'measured ratio':>14} {'measured/c':>10} {'neurons per layer'}")
    print(header)
    print("-" * len(header))
    for (name, constraint), (objective, predicted) in notes.items():
        head_mask, neuron_mask = masks[(name, constraint)]
        measured = statistics.median(p / d for d, p in zip(seconds[("dense", 1.0)], seconds[(name, constraint)],
                                                             strict=True))
        widths = ",".join(str(int(row.count_nonzero())) for row in neuron_mask)
        kept = f"{int(head_mask.count_nonzero()):>5} {int(neuron_mask.count_nonzero()):>7}"
        print(f"{name:<10} {constraint:>5.2f} {kept} "
              f"{objective:>10.1f} {predicted:>11.3f} {measured:>14.3f} {measured / constraint:>10.3f} {widths}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device, (dtype, dtype_name) = torch.device(args.device), DTYPES[args.dtype]
    config = CLIPVisionConfig(patch_size=16, image_size=args.image_size)
    dense = CLIPVisionModel._from_config(config, attn_implementation=args.attn).to(device, dtype).eval()
    pixel_values = torch.randn(args.batch_size, 3, args.image_size, args.image_size).to(device, dtype)
    budget_masks, budget_notes = latency_budget_rows(args, config) if args.latency_constraints else ({}, {})
    macs = mac_costs(config)
    generator = torch.Generator().manual_seed(args.seed)

    rows = {("dense", 1.0): (torch.ones(mask_shapes(config)[0]), torch.ones(mask_shapes(config)[1]))}
    for constraint in args.constraints:
        uniform = uniform_masks(config, constraint)
        rows[("uniform", constraint)] = uniform
        rows[("random", constraint)] = random_masks(*uniform, generator)
    rows |= budget_masks
    models = {key: dense if key[0] == "dense" else cut_pruned_model(dense, *masks) for key, masks in rows.items()}
    load_before = os.getloadavg()[0]
    seconds = interleaved_seconds(models, pixel_values, args.warmup, args.runs)

    where = (f"{torch.cuda.get_device_name(device)} ({device})" if device.type == "cuda"
             else f"{device.type.upper()}, {torch.get_num_threads()} threads")
    print(f"ViT-B/16 vision tower, {args.image_size} px, batch {args.batch_size}, {dtype_name}, {where}, "
          f"{args.attn} attention; {args.runs} round-robin runs after "
          f"{args.warmup} warm-up; load average {load_before:.1f} -> {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs")
    print(f"FLOP ratio = analytic encoder MACs / dense ({macs.dense / 1e9:.2f} G per image); measured x = "
          "median over runs of dense time / pruned time in the same run")
    header = (f"{'masks':<8} {'c':>5} {'heads':>5} {'neurons':>7} {'per-layer heads':<38} "
              f"{'FLOP ratio':>10} {'ideal x':>7} {'median s':>8} {'measured x':>10} {'meas/ideal':>10}")
    print(header)
    print("-" * len(header))
    for (name, constraint), (head_mask, neuron_mask) in rows.items():
        if (name, constraint) in budget_notes:
            continue
        ratio = macs.of_masks(head_mask, neuron_mask) / macs.dense
        widths = ",".join(str(int(row.count_nonzero())) for row in head_mask) if name != "dense" else ""
        times = seconds[(name, constraint)]
        measured = statistics.median(d / p for d, p in zip(seconds[("dense", 1.0)], times, strict=True))
        print(f"{name:<8} {constraint:>5.2f} {int(head_mask.count_nonzero()):>5} "
              f"{int(neuron_mask.count_nonzero()):>7} {widths:<38} {ratio:>10.3f} {1 / ratio:>7.2f} "
              f"{statistics.median(times):>8.3f} {measured:>10.2f} {measured * ratio:>10.2f}")

    if budget_notes:
        print(f"\nLatency budgets: measured ratio = median over runs of pruned time / dense time; table ratio = "
              f"the latency table's prediction; objective = sum of kept scores; macs@lat = MAC-constrained masks "
              f"at the latency-budget row's table latency; load average now {os.getloadavg()[0]:.1f}")
        print_latency_budget_rows(budget_notes, rows, seconds)


if __name__ == "__main__":
    main()
