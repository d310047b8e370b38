"""Peer baseline for the quality benchmark: head and neuron masks chosen by Torch-Pruning's Taylor importance.

Torch-Pruning (`pip install clip-prune[bench]`, VainF/Torch-Pruning) prunes a deep copy of the vision tower
with `tp.pruner.BasePruner` and `tp.importance.GroupTaylorImportance` (|w·∂L/∂w| summed over each
dependency group, tp's default mean normalisation), global ranking across layers, no fine-tuning:

- attention: one group per layer (q/k/v rows + out_proj columns, traced by tp's DependencyGraph),
  whole heads only (`num_heads`, `prune_num_heads=True`, `prune_head_dims=False`), ranked globally
  with `head_pruning_ratio`;
- MLP: one group per layer (fc1 rows + fc2 columns), ranked globally in one scope
  (`pruning_ratio_dict={(fc1, ...): ratio}`);
- the hidden size never changes (embeddings, layer norms, out_proj and fc2 outputs are ignored);
  the text tower and projections are outside the pruned module.

The two ratios are set so that the kept MACs of the project's analytic model (`mac_costs`, docs/design.md
"FLOP-constrained search") are at most `constraint` times the dense ones and as close to it as the unit
sizes allow: heads keep the constraint's fraction, neurons fill the remaining budget, and the counts tp
actually kept are read back and the neuron request corrected. tp never empties a layer (a layer whose heads
all rank below the global threshold is kept whole), so it may keep more heads than asked; the excess MACs come
out of the neurons, and if even the heads do not fit, the nearest other head requests are tried.
The returned masks are those of the units tp kept, in the format of docs/design.md, "Masks".

Run: python benchmarks/torch_pruning_peer.py [--model demo/clip-tiny-synthetic] [--images demo_data/train2017]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch_pruning as tp
from torch import nn
from transformers import CLIPModel, CLIPVisionModel

from clip_prune.core.pruning.costs import MacCosts, mac_costs
from clip_prune.core.pruning.masks import VisionMasks
from clip_prune.towers import tower_of

LossFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]
MAX_TRIALS = 24
MAX_NEURON_FIXES = 4


@dataclass
class TorchPruningResult:
    """What one Torch-Pruning run kept."""

    head_mask: torch.Tensor
    """[L, H] float, 1 where tp kept the head."""
    neuron_mask: torch.Tensor
    """[L, F] float, 1 where tp kept the MLP neuron."""
    pruned_vision: CLIPVisionModel
    """The vision tower physically pruned by tp (a copy; the input model is untouched)."""
    macs: int
    """Kept encoder MACs per image by `mac_costs`."""
    budget: int
    """floor(constraint · dense MACs)."""


def torch_pruning_masks(model: nn.Module, pixel_batches: Sequence[torch.Tensor], loss_fn: LossFn,
                        constraint: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Head mask [L, H] and neuron mask [L, F] (1 = kept) chosen by Torch-Pruning's Taylor importance.

    `loss_fn(model_copy, pixels)` is backpropagated on a deep copy of `model` over `pixel_batches`; the
    kept encoder MACs are <= `constraint` · dense. `model` is left unchanged.
    """
    result = torch_pruning_prune(model, pixel_batches, loss_fn, constraint)
    return result.head_mask, result.neuron_mask


def torch_pruning_prune(model: nn.Module, pixel_batches: Sequence[torch.Tensor], loss_fn: LossFn,
                        constraint: float) -> TorchPruningResult:
    """Run Torch-Pruning to the MAC budget; return its masks and its pruned copy of the vision tower."""
    if not 0.0 < constraint <= 1.0:
        raise ValueError(f"constraint must be in (0, 1], got {constraint}")
    if not pixel_batches:
        raise ValueError("pixel_batches is empty: Taylor importance needs at least one batch for gradients")
    work = copy.deepcopy(model)
    work.eval()
    grads = _taylor_gradients(work, pixel_batches, loss_fn)
    tower = tower_of(work).vision
    macs = mac_costs(tower.config)
    budget = math.floor(constraint * macs.dense)
    example = pixel_batches[0][:1]

    total_neurons = macs.num_layers * macs.num_neurons
    trials = 0
    for heads in _nearest_first(_initial_heads(macs, budget, constraint), macs.num_layers * macs.num_heads):
        best: TorchPruningResult | None = None
        neurons = _neurons_that_fit(macs, budget, heads)
        for _ in range(MAX_NEURON_FIXES):
            if trials == MAX_TRIALS:
                break
            trials += 1
            head_mask, neuron_mask, pruned = _prune_once(tower, grads, example, heads, neurons)
            kept_heads, kept_neurons = int(head_mask.sum()), int(neuron_mask.sum())
            if kept_heads * macs.per_head > budget:
                break  # tp kept more heads than fit (it never empties a layer): try the next head request
            kept = macs.of_counts(kept_heads, kept_neurons)
            if kept <= budget and (best is None or kept > best.macs):
                best = TorchPruningResult(head_mask, neuron_mask, pruned, kept, budget)
            if kept <= budget and (budget - kept < macs.per_neuron or kept_neurons == total_neurons):
                return best
            # ask for as many more (or fewer) neurons as tp's kept count missed what fits
            neurons = min(max(neurons + _neurons_that_fit(macs, budget, kept_heads) - kept_neurons, 0), total_neurons)
        if best is not None:
            return best
        if trials == MAX_TRIALS:
            break
    raise RuntimeError(
        f"Torch-Pruning found no pruning within {constraint:.3f} of the dense MACs in {trials} runs: it never "
        "empties a layer (a layer whose heads or neurons all rank below its threshold is kept whole)"
    )


def _nearest_first(start: int, stop: int) -> list[int]:
    """0..stop ordered by distance from `start` (start, start − 1, start + 1, ...)."""
    return sorted(range(stop + 1), key=lambda value: (abs(value - start), value))


def _taylor_gradients(work: nn.Module, pixel_batches: Sequence[torch.Tensor],
                      loss_fn: LossFn) -> dict[str, torch.Tensor]:
    """Weight gradients of the vision tower, summed over the batches, by parameter name."""
    tower_of(work).vision.requires_grad_(True)  # a frozen input model still needs weight gradients
    work.zero_grad(set_to_none=True)
    for pixels in pixel_batches:
        loss_fn(work, pixels).backward()
    return {name: param.grad.detach().clone() for name, param in tower_of(work).vision.named_parameters()
            if param.grad is not None}


def _neurons_that_fit(macs: MacCosts, budget: int, heads: int) -> int:
    """MLP neurons that fit in the budget next to `heads` heads, clipped to [0, L·F]."""
    room = (budget - heads * macs.per_head) // macs.per_neuron
    return int(min(max(room, 0), macs.num_layers * macs.num_neurons))


def _initial_heads(macs: MacCosts, budget: int, constraint: float) -> int:
    """Heads to ask for first: the constraint's fraction of them (tp's usual single ratio), if they fit."""
    return int(min(round(constraint * macs.num_layers * macs.num_heads), budget // macs.per_head))


def _ratio(kept: int, total: int) -> float:
    """A tp pruning ratio r with int(total · (1 − r)) == kept (r = 0 when all are kept)."""
    return 0.0 if kept >= total else 1.0 - (kept + 0.5) / total


def _prune_once(tower: CLIPVisionModel, grads: dict[str, torch.Tensor], example: torch.Tensor, heads: int,
                neurons: int) -> tuple[torch.Tensor, torch.Tensor, CLIPVisionModel]:
    """Prune a copy of `tower` with tp, asking to keep `heads` heads and `neurons` neurons in all.

    Returns the masks of what tp kept (read from the groups it pruned) and the pruned copy.
    """
    pruned = copy.deepcopy(tower)
    for name, param in pruned.named_parameters():
        param.grad = grads[name].clone() if name in grads else None
    layers = tower_of(pruned).layers
    num_layers = len(layers)
    num_heads = layers[0].self_attn.num_heads
    head_dim = layers[0].self_attn.head_dim
    num_neurons = layers[0].mlp.fc1.out_features
    head_ratio = _ratio(heads, num_layers * num_heads)
    neuron_ratio = _ratio(neurons, num_layers * num_neurons)

    attention = {}
    for layer in layers:
        for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            attention[projection] = num_heads
    ignored = [pruned.embeddings, pruned.pre_layrnorm, pruned.post_layernorm]
    ignored += [layer.self_attn.out_proj for layer in layers] + [layer.mlp.fc2 for layer in layers]
    pruner = tp.pruner.BasePruner(
        pruned,
        example_inputs={"pixel_values": example},
        importance=tp.importance.GroupTaylorImportance(),
        global_pruning=True,
        # tp prunes heads only inside the default ranking scope (the attention groups) and only when that
        # scope has a positive ratio; with prune_head_dims=False this ratio removes nothing by itself.
        pruning_ratio=0.5 if head_ratio > 0 else 0.0,
        pruning_ratio_dict={tuple(layer.mlp.fc1 for layer in layers): neuron_ratio},
        num_heads=attention,
        prune_num_heads=True,
        prune_head_dims=False,
        head_pruning_ratio=head_ratio,
        ignored_layers=ignored,
        root_module_types=[nn.Linear],
        unwrapped_parameters=[(pruned.embeddings.class_embedding, 0)],  # a list of pairs, despite its type hint
        output_transform=lambda output: output.pooler_output.sum(),
    )
    head_mask = torch.ones(num_layers, num_heads)
    neuron_mask = torch.ones(num_layers, num_neurons)
    q_index = {layer.self_attn.q_proj: i for i, layer in enumerate(layers)}
    fc1_index = {layer.mlp.fc1: i for i, layer in enumerate(layers)}
    for group in pruner.step(interactive=True):
        for dep, idxs in group:
            module, out = dep.target.module, pruner.DG.is_out_channel_pruning_fn(dep.handler)
            if out and module in q_index and idxs:
                head_mask[q_index[module], sorted({i // head_dim for i in idxs})] = 0
            elif out and module in fc1_index and idxs:
                neuron_mask[fc1_index[module], list(idxs)] = 0
        group.prune()
    pruned.zero_grad(set_to_none=True)
    for layer in layers:  # bookkeeping: transformers 5 reshapes with (-1, head_dim), num_heads is informative
        layer.self_attn.num_heads = layer.self_attn.q_proj.out_features // head_dim
        layer.self_attn.embed_dim = layer.self_attn.out_proj.out_features
    return head_mask, neuron_mask, pruned


def _demo_pixels(model_dir: str, images: str | None, batches: int, batch_size: int, seed: int) -> list[torch.Tensor]:
    """Pixel batches: processed images from `images` (a folder of .jpg) if given, else Gaussian noise."""
    if images is None:
        generator = torch.Generator().manual_seed(seed)
        size = CLIPModel.config_class.from_pretrained(model_dir).vision_config.image_size
        return [torch.randn(batch_size, 3, size, size, generator=generator) for _ in range(batches)]
    from PIL import Image
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor.from_pretrained(model_dir)
    files = sorted(Path(images).glob("*.jpg"))[: batches * batch_size]
    if len(files) < batches * batch_size:
        raise FileNotFoundError(f"{images} has {len(files)} .jpg files, {batches * batch_size} needed")
    pixels = processor(images=[Image.open(f).convert("RGB") for f in files], return_tensors="pt")["pixel_values"]
    return list(pixels.split(batch_size))


def _distill_loss_fn(seed: int) -> LossFn:
    """The project's label-free distillation loss (docs/design.md, the Fisher loss), fresh sample ids per batch."""
    from clip_prune.core.pruning.losses import distill_loss
    from clip_prune.towers import image_embeds

    counter = itertools.count()

    def loss_fn(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        start = next(counter) * len(pixels)
        return distill_loss(image_embeds(model, pixels), torch.arange(start, start + len(pixels)), seed)

    return loss_fn


def _check_against_masks(model: CLIPModel, result: TorchPruningResult, pixels: torch.Tensor) -> float:
    """Max |difference| between tp's pruned image embeddings and the dense model's hook-masked ones."""
    masks = VisionMasks(model, result.head_mask, result.neuron_mask)
    try:
        with torch.no_grad():
            masked = model.get_image_features(pixel_values=pixels).pooler_output
    finally:
        masks.remove()
    with torch.no_grad():
        pruned = model.visual_projection(result.pruned_vision(pixel_values=pixels).pooler_output)
    return float((masked - pruned).abs().max())


def main(args: list[str] | None = None) -> None:
    """Print tp's kept heads/neurons per layer and MAC ratio for a few constraints on the demo model."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo/clip-tiny-synthetic", help="CLIPModel folder")
    parser.add_argument("--images", default=None, help="folder of .jpg images (default: random pixels)")
    parser.add_argument("--constraints", type=float, nargs="+", default=[0.6, 0.4, 0.2])
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args(args)

    torch.manual_seed(options.seed)
    model = CLIPModel.from_pretrained(options.model).eval()
    reference = {name: value.clone() for name, value in model.state_dict().items()}
    pixel_batches = _demo_pixels(options.model, options.images, options.batches, options.batch_size, options.seed)
    macs = mac_costs(model.vision_model.config)
    print(f"L, H, F = {macs.num_layers}, {macs.num_heads}, {macs.num_neurons}; dense encoder MACs {macs.dense:,}")
    for constraint in options.constraints:
        result = torch_pruning_prune(model, pixel_batches, _distill_loss_fn(options.seed), constraint)
        ratio = result.macs / macs.dense
        print(f"constraint {constraint:.2f}: MAC ratio {ratio:.4f} (budget {result.budget / macs.dense:.4f}), "
              f"heads {int(result.head_mask.sum())}/{result.head_mask.numel()}, "
              f"neurons {int(result.neuron_mask.sum())}/{result.neuron_mask.numel()}")
        print(f"  heads per layer   {result.head_mask.sum(1).int().tolist()}")
        print(f"  neurons per layer {result.neuron_mask.sum(1).int().tolist()}")
        assert result.macs <= result.budget, "kept MACs over budget"
        assert result.macs == macs.of_masks(result.head_mask, result.neuron_mask)
        pruned_heads = [layer.self_attn.q_proj.out_features // layer.self_attn.head_dim
                        for layer in tower_of(result.pruned_vision).layers]
        pruned_neurons = [layer.mlp.fc1.out_features for layer in tower_of(result.pruned_vision).layers]
        assert pruned_heads == result.head_mask.sum(1).int().tolist(), "masks disagree with tp's q/k/v widths"
        assert pruned_neurons == result.neuron_mask.sum(1).int().tolist(), "masks disagree with tp's fc1 widths"
        error = _check_against_masks(model, result, torch.cat(pixel_batches))
        print(f"  max |tp-pruned − hook-masked image embedding| = {error:.2e}")
        assert error < 1e-4, "tp's pruned model is not the hook-masked dense model"
    unchanged = all(torch.equal(value, reference[name]) for name, value in model.state_dict().items())
    assert unchanged, "the input model was modified"
    print("input model unchanged; all checks passed")


if __name__ == "__main__":
    main()
