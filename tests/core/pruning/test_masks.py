"""Hook masks vs physically sliced layers, and per-sample mask gradients vs autograd."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_vision_config
from transformers import CLIPVisionModel

from clip_prune.core.pruning.losses import distill_loss
from clip_prune.core.pruning.masks import VisionMasks
from clip_prune.towers import tower_of


def _tiny_vision(attn: str, seed: int = 0) -> CLIPVisionModel:
    torch.manual_seed(seed)
    config = tiny_vision_config()
    config._attn_implementation = attn
    return CLIPVisionModel(config).eval()


def _slice_by_hand(model: CLIPVisionModel, layer: int, head: int, neuron: int) -> CLIPVisionModel:
    """An independent reference: drop one head's q/k/v rows and out_proj columns and one neuron by indexing."""
    sliced = copy.deepcopy(model)
    attn = sliced.encoder.layers[layer].self_attn
    d = attn.head_dim
    keep = [i for i in range(attn.embed_dim) if i // d != head]
    for name in ("q_proj", "k_proj", "v_proj"):
        proj = getattr(attn, name)
        new = torch.nn.Linear(proj.in_features, len(keep))
        new.weight.data, new.bias.data = proj.weight.data[keep].clone(), proj.bias.data[keep].clone()
        setattr(attn, name, new)
    out = torch.nn.Linear(len(keep), attn.embed_dim)
    out.weight.data, out.bias.data = attn.out_proj.weight.data[:, keep].clone(), attn.out_proj.bias.data.clone()
    attn.out_proj = out
    mlp = sliced.encoder.layers[layer].mlp
    kept = [i for i in range(mlp.fc1.out_features) if i != neuron]
    fc1 = torch.nn.Linear(mlp.fc1.in_features, len(kept))
    fc1.weight.data, fc1.bias.data = mlp.fc1.weight.data[kept].clone(), mlp.fc1.bias.data[kept].clone()
    fc2 = torch.nn.Linear(len(kept), mlp.fc2.out_features)
    fc2.weight.data, fc2.bias.data = mlp.fc2.weight.data[:, kept].clone(), mlp.fc2.bias.data.clone()
    mlp.fc1, mlp.fc2 = fc1, fc2
    return sliced


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_hook_masked_equals_sliced(attn: str) -> None:
    model = _tiny_vision(attn)
    pixels = torch.randn(3, 3, 30, 30)
    head_mask, neuron_mask = torch.ones(3, 4), torch.ones(3, 37)
    head_mask[1, 2] = 0
    neuron_mask[1, 5] = 0
    reference = _slice_by_hand(model, layer=1, head=2, neuron=5)(pixel_values=pixels).last_hidden_state
    masks = VisionMasks(model, head_mask, neuron_mask)
    masked = model(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(masked, reference, atol=1e-5, rtol=0)
    masks.remove()
    dense = model(pixel_values=pixels).last_hidden_state
    assert (dense - reference).abs().max() > 1e-4, "the zeroed head must change the output"


def test_per_sample_grads_sum_to_batch_grad() -> None:
    model = _tiny_vision("sdpa")
    pixels = torch.randn(5, 3, 30, 30)
    target = torch.randn(5, 32)
    masks = VisionMasks(model)
    with masks.tracking_samples():
        loss = (model(pixel_values=pixels).pooler_output - target).square().sum(-1).mean()
        head_grads, neuron_grads = masks.per_sample_grads(loss)
    assert head_grads.shape == (5, 3, 4) and neuron_grads.shape == (5, 3, 37)
    # Reference: autograd w.r.t. one shared mask leaf per kind, through the same hooks.
    head_leaf = torch.ones(3, 4, requires_grad=True)
    neuron_leaf = torch.ones(3, 37, requires_grad=True)
    masks.head_mask, masks.neuron_mask = head_leaf, neuron_leaf
    loss = (model(pixel_values=pixels).pooler_output - target).square().sum(-1).mean()
    head_batch, neuron_batch = torch.autograd.grad(loss, [head_leaf, neuron_leaf])
    torch.testing.assert_close(head_grads.sum(0), head_batch, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(neuron_grads.sum(0), neuron_batch, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_distill_per_sample_grads_equal_one_at_a_time(attn: str) -> None:
    model = _tiny_vision(attn)
    pixels = torch.randn(4, 3, 30, 30)
    ids = torch.tensor([7, 3, 11, 0])
    masks = VisionMasks(model)
    with masks.tracking_samples():
        loss = distill_loss(model(pixel_values=pixels).pooler_output, ids, seed=5)
        batch_heads, batch_neurons = masks.per_sample_grads(loss)
    for n in range(4):
        with masks.tracking_samples():
            loss = distill_loss(model(pixel_values=pixels[n : n + 1]).pooler_output, ids[n : n + 1], seed=5)
            heads, neurons = masks.per_sample_grads(loss)
        torch.testing.assert_close(batch_heads[n], heads[0], atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(batch_neurons[n], neurons[0], atol=1e-6, rtol=1e-4)
    assert batch_heads.abs().sum() > 0


def test_a_padding_item_gets_zero_mask_gradients() -> None:
    """A DDP rank whose share of the last global batch is a padding item: left out of the loss, its
    per-sample mask gradients are zero (and the module does not count it)."""
    model = _tiny_vision("sdpa")
    masks = VisionMasks(model)
    real = torch.tensor([False])
    with masks.tracking_samples():
        loss = distill_loss(model(pixel_values=torch.randn(1, 3, 30, 30)).pooler_output[real], torch.tensor([]), 5)
        heads, neurons = masks.per_sample_grads(loss)
    assert heads.shape == (1, 3, 4) and heads.abs().sum() == 0 and neurons.abs().sum() == 0


def test_mask_of_wrong_shape_is_refused() -> None:
    model = _tiny_vision("sdpa")
    with pytest.raises(ValueError, match=r"head_mask has shape \[12, 12\] but this model needs \[3, 4\]"):
        VisionMasks(model, head_mask=torch.ones(12, 12))
    assert len(tower_of(model).layers) == 3
