"""CPU latency of a physically pruned ViT-B/16 vision tower against the dense one.

For each FLOP constraint c, two pruned copies of one random-weight ViT-B/16 tower: a
uniform one (every layer keeps round(c·H) heads and round(c·F) neurons) and a random
one with the same totals spread over the layers at random, so both have the same
analytic FLOPs (DESIGN.md, "FLOP-constrained search"). Prints the analytic FLOP ratio of
the encoder, the ideal speedup 1/ratio, the measured speedup and measured/ideal. The models are
timed round-robin, so load from other processes slows them alike. Example:

    python benchmarks/bench_latency.py --constraints 0.4 0.5 0.75 --runs 5 --threads 2
"""

import argparse
import os
import statistics
import time

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from clip_prune.model.masking import mask_shapes
from clip_prune.pruning.export import prune_model
from clip_prune.pruning.flops import count_encoder_macs


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
    """Wall-clock seconds of one forward pass."""
    start = time.perf_counter()
    model(pixel_values=pixel_values)
    return time.perf_counter() - start


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
    parser.add_argument("--constraints", type=float, nargs="+", default=[0.4, 0.5, 0.75],
                        help="FLOP constraints c in (0, 1] to prune to (default: 0.4 0.5 0.75)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default: 8)")
    parser.add_argument("--image-size", type=int, default=224, help="image side in pixels (default: 224)")
    parser.add_argument("--runs", type=int, default=5, help="timed forward passes per model (default: 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed forward passes first (default: 2)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice, usually the core count)")
    parser.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa", help="attention implementation")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and masks")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config = CLIPVisionConfig(patch_size=16, image_size=args.image_size)
    dense = CLIPVisionModel._from_config(config, attn_implementation=args.attn).eval()
    pixel_values = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    macs = count_encoder_macs(config)
    generator = torch.Generator().manual_seed(args.seed)

    rows = {("dense", 1.0): (torch.ones(mask_shapes(config)[0]), torch.ones(mask_shapes(config)[1]))}
    for constraint in args.constraints:
        uniform = uniform_masks(config, constraint)
        rows[("uniform", constraint)] = uniform
        rows[("random", constraint)] = random_masks(*uniform, generator)
    models = {key: dense if key[0] == "dense" else prune_model(dense, *masks) for key, masks in rows.items()}
    load_before = os.getloadavg()[0]
    seconds = interleaved_seconds(models, pixel_values, args.warmup, args.runs)

    print(f"ViT-B/16 vision tower, {args.image_size} px, batch {args.batch_size}, fp32, CPU, "
          f"{torch.get_num_threads()} threads, {args.attn} attention; {args.runs} round-robin runs after "
          f"{args.warmup} warm-up; load average {load_before:.1f} -> {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs")
    print(f"FLOP ratio = analytic encoder MACs / dense ({macs.dense / 1e9:.2f} G per image); measured x = "
          "median over runs of dense time / pruned time in the same run")
    header = (f"{'masks':<8} {'c':>5} {'heads':>5} {'neurons':>7} {'per-layer heads':<38} "
              f"{'FLOP ratio':>10} {'ideal x':>7} {'median s':>8} {'measured x':>10} {'meas/ideal':>10}")
    print(header)
    print("-" * len(header))
    for (name, constraint), (head_mask, neuron_mask) in rows.items():
        ratio = macs.of_masks(head_mask, neuron_mask) / macs.dense
        widths = ",".join(str(int(row.count_nonzero())) for row in head_mask) if name != "dense" else ""
        times = seconds[(name, constraint)]
        measured = statistics.median(d / p for d, p in zip(seconds[("dense", 1.0)], times, strict=True))
        print(f"{name:<8} {constraint:>5.2f} {int(head_mask.count_nonzero()):>5} "
              f"{int(neuron_mask.count_nonzero()):>7} {widths:<38} {ratio:>10.3f} {1 / ratio:>7.2f} "
              f"{statistics.median(times):>8.3f} {measured:>10.2f} {measured * ratio:>10.2f}")


if __name__ == "__main__":
    main()
