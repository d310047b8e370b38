"""The Fisher pass of `MaskedCLIPModule` under Lightning's precision plugins, and its host-side noise."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from clip_prune.core.pruning.fisher import FISHER_KEYS
from clip_prune.core.pruning.losses import distill_loss, distill_noise
from clip_prune.lightning.data import CocoDataModule
from clip_prune.lightning.module import MaskedCLIPModule


def _fisher_pass(model_dir, data_root, precision: str, loss: str):
    module = MaskedCLIPModule(str(model_dir), loss=loss)
    data = CocoDataModule(str(data_root), str(model_dir), num_samples=12, batch_size=4, num_workers=0)
    trainer = L.Trainer(accelerator="cpu", devices=1, precision=precision, inference_mode=False, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.validate(module, datamodule=data, verbose=False)
    return module.fisher.compute()


@pytest.mark.parametrize("loss", ["contrastive", "distill"])
def test_bf16_autocast_keeps_float64_statistics_close_to_float32(loss, tiny_clip_dir, tiny_coco_root) -> None:
    full = _fisher_pass(tiny_clip_dir, tiny_coco_root, "32-true", loss)
    mixed = _fisher_pass(tiny_clip_dir, tiny_coco_root, "bf16-mixed", loss)
    assert mixed.num_samples == full.num_samples == 12
    for key in FISHER_KEYS:
        ours, reference = getattr(mixed, key), getattr(full, key)
        assert ours.dtype == torch.float64 and torch.isfinite(ours).all()
        # bf16 keeps 8 mantissa bits: squared gradients of a 3-layer model agree to a few percent.
        assert (ours - reference).norm() / reference.norm() < 0.05, key
    # The ranking that the search uses is the same for the units that matter most.
    top = full.neuron_fisher.flatten().topk(20).indices
    assert len(set(top.tolist()) & set(mixed.neuron_fisher.flatten().topk(20).indices.tolist())) >= 16


def test_distill_noise_drawn_on_the_host_equals_the_loss_own() -> None:
    ids = torch.tensor([3, 0, 7])
    embeds = torch.randn(3, 5, requires_grad=True)
    noise = distill_noise(ids, 5, seed=2)
    assert noise.shape == (3, 5) and torch.equal(noise[0], distill_noise(torch.tensor([3]), 5, seed=2)[0])
    torch.testing.assert_close(distill_loss(embeds, ids, 2, noise), distill_loss(embeds, ids, 2), rtol=0, atol=0)


def test_a_failed_later_fisher_pass_leaves_the_dense_model(tiny_clip_dir) -> None:
    """A pass on the model pruned so far sees its masks and refit columns, and the dense model again afterwards,
    even when the pass fails."""
    from clip_prune.core.pruning.costs import mac_costs
    from clip_prune.core.pruning.fisher import FisherStatistics
    from clip_prune.core.pruning.options import PruningOptions
    from clip_prune.core.pruning.step import prune_step

    module = MaskedCLIPModule(str(tiny_clip_dir))
    generator = torch.Generator().manual_seed(0)
    grads = [torch.randn(8, 3, units, generator=generator, dtype=torch.float64) for units in (4, 37)]
    stats = FisherStatistics(grads[0].square().sum(0), grads[1].square().sum(0),
                             torch.einsum("nli,nlj->lij", grads[0], grads[0]),
                             torch.einsum("nli,nlj->lij", grads[1], grads[1]), 8)
    pixels = [torch.randn(4, 3, 30, 30, generator=generator)]
    step = prune_step(module.model, stats, mac_costs(module.vision_config), 0.6, PruningOptions(), pixels)
    dense = {name: value.clone() for name, value in module.model.state_dict().items()}

    pruned_so_far = module.masked_as(step.head_mask, step.neuron_mask, step.refit)
    with pytest.raises(RuntimeError, match="the pass failed"), pruned_so_far:
        changed = [name for name, value in module.model.state_dict().items() if not torch.equal(value, dense[name])]
        assert changed and all("out_proj" in name or "fc2" in name for name in changed)
        assert torch.equal(module.masks.neuron_mask.cpu(), step.neuron_mask)
        raise RuntimeError("the pass failed")
    assert all(torch.equal(value, dense[name]) for name, value in module.model.state_dict().items())
    assert bool((module.masks.head_mask == 1).all()) and bool((module.masks.neuron_mask == 1).all())
