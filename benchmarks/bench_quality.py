"""What each stage of the pipeline buys, on the demo model: recall, zero-shot accuracy and cosine to dense.

For each constraint (fraction of the encoder MACs kept) the table has one row per stage: search only;
+ rearrange; + scales (the original tool's reconstruction); + weights (refit columns); + weights in K
steps (Fisher collected again on the refit model after each step); two variants of the weight refit
(biases refit too; all tokens, not only CLS, at the last layer). Baselines keep the same per-layer
counts as the search: magnitude (L2 norm of a unit's weights) and random units; and the peer a user would
try, Torch-Pruning's Taylor importance on whole heads and neurons at the same MACs (no fine-tuning), when
`torch-pruning` is installed (`pip install -e ".[bench]"`). Every model is the dense one under hook masks
plus refit columns, which the tests show equal the saved models.

Run (after `clip-prune make-demo-data --root demo_data`):
    python benchmarks/bench_quality.py [--constraints 0.6 0.4 0.3 0.2 0.1] [--samples 256]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from clip_prune.core.pruning.chain import prune_in_steps
from clip_prune.core.pruning.costs import mac_costs
from clip_prune.core.pruning.fisher import FisherStatistics
from clip_prune.core.pruning.options import PruningOptions
from clip_prune.core.pruning.refit import RefitWeights, refit_applied
from clip_prune.lightning.data import CocoDataModule
from clip_prune.lightning.module import MaskedCLIPModule
from clip_prune.towers import image_embeds, inputs_to, tower_of

sys.path.insert(0, str(Path(__file__).parent))  # the Torch-Pruning peer beside this script


STAGES: dict[str, tuple[str, PruningOptions]] = {
    "search": ("search", PruningOptions(rearrange=False, reconstruct="none", steps=1)),
    "rearrange": ("+ rearrange", PruningOptions(reconstruct="none", steps=1)),
    "scales": ("+ scales", PruningOptions(reconstruct="scales", steps=1)),
    "weights": ("+ weights", PruningOptions(reconstruct="weights", steps=1, fit_bias=False)),
    "bias": ("+ weights, bias refit too", PruningOptions(reconstruct="weights", steps=1, fit_bias=True)),
    "all-tokens": ("+ weights, all tokens at the last layer",
                   PruningOptions(reconstruct="weights", steps=1, fit_bias=False, last_layer_pooled_only=False)),
    "steps": ("+ weights, K steps", PruningOptions(reconstruct="weights", fit_bias=False)),
    "steps-no-rearrange": ("weights, K steps, no rearrangement", PruningOptions(rearrange=False, fit_bias=False)),
    "steps-bias": ("weights, K steps, bias refit too", PruningOptions(fit_bias=True)),
}
"""Rows of the table: name and pipeline options (steps None: the default, automatic number of steps)."""


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo/clip-tiny-synthetic")
    parser.add_argument("--data", default="demo_data", help="COCO-format root (make-demo-data)")
    parser.add_argument("--constraints", type=float, nargs="+", default=[0.6, 0.4, 0.3, 0.2, 0.1])
    parser.add_argument("--samples", type=int, default=256, help="calibration images (Fisher and reconstruction)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random baseline")
    parser.add_argument("--stages", nargs="+", default=[*STAGES, "baselines"], choices=[*STAGES, "baselines"],
                        help="rows to run (baselines: magnitude, random and Torch-Pruning at the search's counts)")
    return parser.parse_args()


class Bench:
    """The demo model, its calibration batches and an evaluator; scores masked (+ refit) models."""

    def __init__(self, args: argparse.Namespace) -> None:
        torch.manual_seed(0)
        self.module = MaskedCLIPModule(args.model)
        self.data = CocoDataModule(args.data, args.model, num_samples=args.samples, batch_size=args.batch_size,
                                   num_workers=0, zero_shot_root=f"{args.data}/zeroshot",
                                   zero_shot_templates=["a {}", "a picture of a {}", "there is a {}"])
        self.data.setup("validate")
        tower = self.module.tower  # batches normalised once here (their pixels arrive as uint8)
        self.batches = [{name: value for name, value in batch.items() if name not in ("pixel_mean", "pixel_std")}
                        | inputs_to(tower.vision_inputs(batch), "cpu") for batch in self.data.val_dataloader()]
        self.pixels = [batch["pixel_values"] for batch in self.batches]
        self.macs = mac_costs(self.module.vision_config)
        self.evaluator = self.data.evaluator(torch.device("cpu"), progress=False)
        self.images = DataLoader(self.data.retrieval_split().images, batch_size=args.batch_size)
        self.dense_embeddings = self._embeddings()
        self.dense = self._metrics("dense")

    @torch.no_grad()
    def _embeddings(self) -> torch.Tensor:
        tower = self.module.tower
        return torch.cat([F.normalize(image_embeds(self.module.model, inputs_to(tower.vision_inputs(batch), "cpu")),
                                      dim=-1) for batch in self.images])

    def _metrics(self, name: str) -> dict[str, float]:
        metrics = self.evaluator(self.module.model, name)
        return {"recall": sum(metrics["retrieval"].values()) / len(metrics["retrieval"]),
                "zero_shot": metrics["zero_shot"]["top1"]}

    def score(self, head_mask: torch.Tensor, neuron_mask: torch.Tensor, refit: RefitWeights | None = None
              ) -> dict[str, float]:
        """Mean recall, zero-shot top-1 and mean cosine to the dense embeddings of the masked (+ refit) model."""
        self.module.masks.set(head_mask, neuron_mask)
        try:
            with refit_applied(self.module.model, head_mask, neuron_mask, refit or {}):
                scores = self._metrics("pruned")
                scores["cosine"] = float((self._embeddings() * self.dense_embeddings).sum(-1).mean())
        finally:
            self.module.masks.set(torch.ones_like(head_mask), torch.ones_like(neuron_mask))
        return scores

    def fisher(self, head_mask: torch.Tensor | None = None, neuron_mask: torch.Tensor | None = None,
               refit: RefitWeights | None = None) -> FisherStatistics:
        """Fisher statistics of the model under the masks (+ refit columns), as the Lightning loop gathers them."""
        module = self.module
        module.fisher.reset()
        module.fisher.set_dtype(torch.float64)
        if head_mask is not None:
            module.masks.set(head_mask, neuron_mask)
        with refit_applied(module.model, module.masks.head_mask, module.masks.neuron_mask, refit or {}):
            for index, batch in enumerate(self.batches):
                module.validation_step(batch, index)
        module.masks.set(torch.ones_like(module.masks.head_mask), torch.ones_like(module.masks.neuron_mask))
        return module.fisher.compute()

    def loss(self, model: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        """CLIP's contrastive loss of one calibration batch (for the Torch-Pruning peer's Taylor scores)."""
        batch = next(batch for batch in self.batches if batch["pixel_values"] is pixels)
        with torch.no_grad():
            texts = model.get_text_features(input_ids=batch["input_ids"],
                                            attention_mask=batch["attention_mask"]).pooler_output
        return tower_of(model).loss(image_embeds(model, pixels), texts)


def magnitude_masks(module: MaskedCLIPModule, counts: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Per layer, the heads / neurons with the largest L2 norm of their weights, as many as `counts` keeps."""
    head_scores, neuron_scores = [], []
    for layer in module.model.vision_model.encoder.layers:
        attention, mlp, head_dim = layer.self_attn, layer.mlp, layer.self_attn.head_dim
        rows = torch.stack([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight])
        per_head = rows.view(3, -1, head_dim, rows.shape[-1]).square().sum(dim=(0, 2, 3))
        per_head += attention.out_proj.weight.view(rows.shape[-1], -1, head_dim).square().sum(dim=(0, 2))
        head_scores.append(per_head)
        neuron_scores.append(mlp.fc1.weight.square().sum(1) + mlp.fc2.weight.square().sum(0))
    return _top_per_layer(torch.stack(head_scores), counts[0]), _top_per_layer(torch.stack(neuron_scores), counts[1])


def random_masks(counts: tuple[torch.Tensor, torch.Tensor], shapes: tuple[torch.Size, torch.Size],
                 generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    return tuple(_top_per_layer(torch.rand(shape, generator=generator), count)
                 for shape, count in zip(shapes, counts, strict=True))


def _top_per_layer(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros_like(scores)
    for layer, count in enumerate(counts.tolist()):
        mask[layer, scores[layer].argsort(descending=True)[:count]] = 1.0
    return mask


def run_pipeline(bench: Bench, stats: FisherStatistics, constraint: float, options: PruningOptions
                 ) -> tuple[torch.Tensor, torch.Tensor, RefitWeights, int]:
    """The CLI's loop in `options.step_constraints(constraint)` steps; returns the masks, refit and the step count."""
    steps = list(prune_in_steps(bench.module.model, stats, options.step_constraints(constraint), options,
                                bench.pixels, lambda step: bench.fisher(step.head_mask, step.neuron_mask, step.refit)))
    return steps[-1].head_mask, steps[-1].neuron_mask, steps[-1].refit, len(steps)


def _row(constraint: float, name: str, scores: dict[str, float], seconds: float) -> str:
    cosine = f"{scores['cosine']:.3f}" if "cosine" in scores else "1.000"
    return (f"| {constraint:.1f} | {name} | {scores['recall']:.1f} | {scores['zero_shot']:.1f} | {cosine} "
            f"| {seconds:.1f} |")


def main() -> None:
    args = _parse_args()
    bench = Bench(args)
    try:
        from torch_pruning_peer import torch_pruning_masks
    except ImportError as error:
        print(f"(no Torch-Pruning row: {error}; pip install -e '.[bench]')")
        torch_pruning_masks = None
    generator = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    dense_stats = bench.fisher()
    fisher_s = time.perf_counter() - start
    print(f"calibration {args.samples} images, evaluation {len(bench.images.dataset)} images; one Fisher pass "
          f"{fisher_s:.1f} s")
    print("| MACs kept | method | mean recall | zero-shot top-1 | cosine to dense | seconds |")
    print("|---|---|---|---|---|---|")
    print(_row(1.0, "dense", bench.dense, 0.0))
    for constraint in args.constraints:
        searched = None
        for key, (name, options) in STAGES.items():
            if key not in args.stages:
                continue
            begin = time.perf_counter()
            head_mask, neuron_mask, refit, steps = run_pipeline(bench, dense_stats, constraint, options)
            seconds = time.perf_counter() - begin  # includes the Fisher passes of later steps
            if key == "search":
                searched = ((head_mask != 0).sum(1), (neuron_mask != 0).sum(1))
            label = name.replace("K steps", f"{steps} steps")
            print(_row(constraint, label, bench.score(head_mask, neuron_mask, refit), seconds), flush=True)
        if "baselines" not in args.stages or searched is None:
            continue
        shapes = (bench.module.masks.head_mask.shape, bench.module.masks.neuron_mask.shape)
        print(_row(constraint, "magnitude (search's counts)", bench.score(*magnitude_masks(bench.module, searched)),
                   0.0))
        print(_row(constraint, "random (search's counts)", bench.score(*random_masks(searched, shapes, generator)),
                   0.0))
        if torch_pruning_masks is not None:
            begin = time.perf_counter()
            try:
                masks = torch_pruning_masks(bench.module.model, bench.pixels, bench.loss, constraint)
            except RuntimeError as error:  # tp never empties a layer, so low budgets can be out of its reach
                print(f"| {constraint:.1f} | Torch-Pruning Taylor | {error} | | | |")
                continue
            ratio = bench.macs.of_masks(*masks) / bench.macs.dense
            print(_row(constraint, f"Torch-Pruning Taylor ({ratio:.3f} MACs)", bench.score(*masks),
                       time.perf_counter() - begin), flush=True)


if __name__ == "__main__":
    main()
