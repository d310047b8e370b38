"""Cost of Fisher collection vs a plain forward+backward, and its memory at two sample counts.

    python benchmarks/bench_fisher.py                 # ViT-B/16 shapes, random weights, CPU
    python benchmarks/bench_fisher.py --layers 4      # quicker

The baseline is what the original tool did per batch: one forward pass and one backward pass
to a single shared mask (the batch gradient). Fisher collection adds per-sample mask leaves
and the float64 diagonal and Gram updates. Both run on the same batches, interleaved, in one
process; memory is the peak RSS of fresh processes that collect over N and 4N samples.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from clip_prune.core.pruning.fisher import FisherInformation
from clip_prune.core.pruning.losses import distill_loss
from clip_prune.core.pruning.masks import VisionMasks, mask_shapes


def build(layers: int, image_size: int) -> CLIPVisionModel:
    torch.manual_seed(0)
    config = CLIPVisionConfig(image_size=image_size, patch_size=16, num_hidden_layers=layers)
    return CLIPVisionModel(config).eval().requires_grad_(False)


def baseline_step(model: CLIPVisionModel, masks: VisionMasks, pixels: torch.Tensor, ids: torch.Tensor) -> None:
    """Forward + backward to one shared head and neuron mask (the batch gradient)."""
    masks.head_mask.requires_grad_(True)
    masks.neuron_mask.requires_grad_(True)
    loss = distill_loss(model(pixel_values=pixels).pooler_output, ids, seed=0)
    torch.autograd.grad(loss, [masks.head_mask, masks.neuron_mask])
    masks.head_mask.requires_grad_(False)
    masks.neuron_mask.requires_grad_(False)


def fisher_step(model: CLIPVisionModel, masks: VisionMasks, fisher: FisherInformation, pixels: torch.Tensor,
                ids: torch.Tensor) -> None:
    """What MaskedCLIPModule.validation_step does: per-sample gradients, then the float64 sums."""
    with masks.tracking_samples():
        loss = distill_loss(model(pixel_values=pixels).pooler_output, ids, seed=0)
        head_grads, neuron_grads = masks.per_sample_grads(loss)
    fisher.update(head_grads, neuron_grads)


def time_both(args: argparse.Namespace) -> None:
    model = build(args.layers, args.image_size)
    masks = VisionMasks(model)
    (layers, heads), (_, neurons) = mask_shapes(model.config)
    fisher = FisherInformation(layers, heads, neurons)
    pixels = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    ids = torch.arange(args.batch_size)
    baseline_step(model, masks, pixels, ids)  # warm-up
    fisher_step(model, masks, fisher, pixels, ids)
    times: dict[str, list[float]] = {"baseline": [], "fisher": []}
    for _ in range(args.repeats):
        for name, step in (("baseline", lambda: baseline_step(model, masks, pixels, ids)),
                           ("fisher", lambda: fisher_step(model, masks, fisher, pixels, ids))):
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    base, ours = statistics.median(times["baseline"]), statistics.median(times["fisher"])
    print(f"L={args.layers} batch={args.batch_size} image={args.image_size}px threads={torch.get_num_threads()}, "
          f"median of {args.repeats} interleaved batches")
    print(f"  forward+backward (batch gradient): {base:.3f} s/batch")
    print(f"  Fisher collection (per-sample + Gram): {ours:.3f} s/batch")
    print(f"  ratio: {ours / base:.3f}  (target <= 1.15)")


def peak_memory(args: argparse.Namespace) -> None:
    """Run in a child process: collect over `--samples` samples and print the peak RSS in MiB."""
    model = build(args.layers, args.image_size)
    masks = VisionMasks(model)
    (layers, heads), (_, neurons) = mask_shapes(model.config)
    fisher = FisherInformation(layers, heads, neurons)
    for start in range(0, args.samples, args.batch_size):
        ids = torch.arange(start, min(start + args.batch_size, args.samples))
        fisher_step(model, masks, fisher, torch.randn(len(ids), 3, args.image_size, args.image_size), ids)
    state_bytes = sum(getattr(fisher, name).nbytes for name in fisher._defaults)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"samples": int(fisher.num_samples), "peak_rss_mib": peak, "state_mib": state_bytes / 2**20}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12, help="encoder layers (ViT-B/16: 12)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="timed batches per method")
    parser.add_argument("--samples", type=int, default=16, help="memory: the smaller sample count N (also 4N)")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        peak_memory(args)
        return
    time_both(args)
    for samples in (args.samples, 4 * args.samples):
        command = [sys.executable, __file__, "--memory-child", "--samples", str(samples), "--layers",
                   str(args.layers), "--image-size", str(args.image_size), "--batch-size", str(args.batch_size)]
        result = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
        print(f"  {result['samples']:5d} samples: peak RSS {result['peak_rss_mib']:.0f} MiB, "
              f"statistics {result['state_mib']:.1f} MiB")


if __name__ == "__main__":
    main()
