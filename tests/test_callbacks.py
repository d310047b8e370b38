"""PruningCallback between Fisher passes: the model pruned so far is written in for a pass, and taken out again."""

from __future__ import annotations

from pathlib import Path

import torch

from clip_prune.core.pruning.costs import mac_costs
from clip_prune.core.pruning.fisher import FisherStatistics
from clip_prune.core.pruning.options import PruningOptions
from clip_prune.core.pruning.step import prune_step
from clip_prune.core.run.outputs import RunDirectory
from clip_prune.lightning.callbacks import PruningCallback
from clip_prune.lightning.module import MaskedCLIPModule


def test_a_failed_later_fisher_pass_leaves_the_dense_model(tiny_clip_dir: Path, tmp_path: Path) -> None:
    module = MaskedCLIPModule(str(tiny_clip_dir))
    config = module.vision_config
    generator = torch.Generator().manual_seed(0)
    grads = [torch.randn(8, 3, units, generator=generator, dtype=torch.float64) for units in (4, 37)]
    stats = FisherStatistics(grads[0].square().sum(0), grads[1].square().sum(0),
                             torch.einsum("nli,nlj->lij", grads[0], grads[0]),
                             torch.einsum("nli,nlj->lij", grads[1], grads[1]), 8)
    pixels = [torch.randn(4, 3, 30, 30, generator=generator)]
    step = prune_step(module.model, stats, mac_costs(config), 0.6, PruningOptions(), pixels)
    dense = {name: value.clone() for name, value in module.model.state_dict().items()}
    callback = PruningCallback(RunDirectory(tmp_path / "run"), 0.4, PruningOptions())
    callback.steps.append(step)

    callback.on_validation_start(None, module)  # the second step's Fisher pass starts on the pruned model
    changed = [name for name, value in module.model.state_dict().items() if not torch.equal(value, dense[name])]
    assert changed and all("out_proj" in name or "fc2" in name for name in changed)
    assert torch.equal(module.masks.neuron_mask.cpu(), step.neuron_mask)

    callback.on_exception(None, module, RuntimeError("the pass failed"))
    assert all(torch.equal(value, dense[name]) for name, value in module.model.state_dict().items())
    assert bool((module.masks.head_mask == 1).all()) and bool((module.masks.neuron_mask == 1).all())
