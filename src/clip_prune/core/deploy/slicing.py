"""Physical pruning of a vision encoder: pruning plans and weight slicing.

Follows docs/design.md, "Physical pruning and the saved model": keep the q/k/v rows and
out_proj columns of the kept heads and the fc1 rows and fc2 columns of the kept
neurons, and fold each kept unit's mask scale into its out_proj or fc2 columns, so the
sliced model computes what the hook-masked model (`model/masking.py`) computes.
A layer left with no heads (or no neurons) gets a constant module that outputs the
out_proj (or fc2) bias (docs/design.md, "Facts about transformers 5.x").
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from clip_prune.core.pruning.masks import check_masks, head_columns, mask_shapes
from clip_prune.hub.pruned_layers import ConstantAttention, ConstantMLP
from clip_prune.towers import tower_of


@dataclass
class LayerPlan:
    """What one encoder layer keeps, read off the masks (0 = pruned, other values = scale)."""

    heads: list[int]
    """Indices of the kept heads, ascending (into the dense layer's H heads)."""
    head_scales: list[float]
    """Mask value of each kept head, folded into its out_proj columns."""
    neurons: list[int]
    """Indices of the kept MLP neurons, ascending (into the dense layer's F neurons)."""
    neuron_scales: list[float]
    """Mask value of each kept neuron, folded into its fc2 column."""

    def __post_init__(self) -> None:
        if len(self.heads) != len(self.head_scales) or len(self.neurons) != len(self.neuron_scales):
            raise ValueError(
                f"a layer plan needs one scale per kept unit, got {len(self.heads)} heads with "
                f"{len(self.head_scales)} head_scales and {len(self.neurons)} neurons with "
                f"{len(self.neuron_scales)} neuron_scales"
            )


def plan_from_masks(head_mask: torch.Tensor, neuron_mask: torch.Tensor) -> list[LayerPlan]:
    """The per-layer plan of `head_mask` [L, H] and `neuron_mask` [L, F] (validated with `check_masks`)."""
    check_masks(head_mask, neuron_mask)
    plan = []
    for head_row, neuron_row in zip(head_mask.detach().cpu().double(), neuron_mask.detach().cpu().double(),
                                    strict=True):
        heads = torch.nonzero(head_row).flatten()
        neurons = torch.nonzero(neuron_row).flatten()
        plan.append(LayerPlan(heads=heads.tolist(), head_scales=head_row[heads].tolist(),
                              neurons=neurons.tolist(), neuron_scales=neuron_row[neurons].tolist()))
    return plan


def masks_from_plan(plan: list[LayerPlan], num_heads: int,
                    num_neurons: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 masks ([L, H], [L, F]) `plan` was read from, for H = `num_heads`, F = `num_neurons`."""
    head_mask = torch.zeros(len(plan), num_heads)
    neuron_mask = torch.zeros(len(plan), num_neurons)
    for index, layer in enumerate(plan):
        head_mask[index, layer.heads] = torch.tensor(layer.head_scales, dtype=torch.float32)
        neuron_mask[index, layer.neurons] = torch.tensor(layer.neuron_scales, dtype=torch.float32)
    return head_mask, neuron_mask


def write_plan(plan: list[LayerPlan], path: str | Path) -> None:
    """Write `plan` as JSON: one {"heads", "head_scales", "neurons", "neuron_scales"} object per layer."""
    Path(path).write_text(json.dumps([asdict(layer) for layer in plan], indent=1) + "\n")


def read_plan(path: str | Path) -> list[LayerPlan]:
    """Read a plan written by `write_plan` (`plan.json` of a pruned model directory)."""
    try:
        layers = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no pruning plan at {path}: is this a directory written by save_pruned?"
        ) from None
    keys = {"heads", "head_scales", "neurons", "neuron_scales"}
    if not (isinstance(layers, list)
            and all(isinstance(layer, dict) and set(layer) == keys for layer in layers)):
        raise ValueError(f"{path} is not a pruning plan: expected a list of objects with keys {sorted(keys)}")
    return [LayerPlan(**layer) for layer in layers]


def _new_linear(weight: torch.Tensor, bias: torch.Tensor | None, like: nn.Linear) -> nn.Linear:
    """An nn.Linear holding `weight` [out, in] and `bias`, built on meta so nothing is initialised twice."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=like.weight.requires_grad)
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=like.bias.requires_grad)
    return linear


def _slice_rows(linear: nn.Linear, rows: torch.Tensor) -> nn.Linear:
    """`linear` keeping only the output features `rows`."""
    bias = None if linear.bias is None else linear.bias.detach()[rows].clone()
    return _new_linear(linear.weight.detach()[rows].clone(), bias, linear)


def _slice_columns(linear: nn.Linear, columns: torch.Tensor, scales: torch.Tensor) -> nn.Linear:
    """`linear` keeping only the input features `columns`, each column multiplied by its scale."""
    weight = linear.weight.detach()[:, columns] * scales.to(linear.weight)
    bias = None if linear.bias is None else linear.bias.detach().clone()
    return _new_linear(weight, bias, linear)


def _slice_attention(attention: nn.Module, layer: LayerPlan) -> nn.Module:
    """`attention` keeping the heads of `layer`, their scales folded into out_proj."""
    if not layer.heads:
        return ConstantAttention(attention.out_proj.bias.detach().clone())
    device = attention.out_proj.weight.device
    head_dim = attention.head_dim
    heads = torch.tensor(layer.heads, device=device)
    rows = head_columns(heads, head_dim)
    scales = torch.tensor(layer.head_scales, dtype=torch.float64, device=device).repeat_interleave(head_dim)
    attention.q_proj = _slice_rows(attention.q_proj, rows)
    attention.k_proj = _slice_rows(attention.k_proj, rows)
    attention.v_proj = _slice_rows(attention.v_proj, rows)
    attention.out_proj = _slice_columns(attention.out_proj, rows, scales)
    # forward reshapes with view(*shape, -1, head_dim), so only the bookkeeping changes; embed_dim
    # stays D, the width of the layer's input and output.
    attention.num_heads = len(layer.heads)
    return attention


def _slice_mlp(mlp: nn.Module, layer: LayerPlan) -> nn.Module:
    """`mlp` keeping the neurons of `layer`, their scales folded into fc2."""
    if not layer.neurons:
        return ConstantMLP(mlp.fc2.bias.detach().clone())
    device = mlp.fc2.weight.device
    neurons = torch.tensor(layer.neurons, device=device)
    scales = torch.tensor(layer.neuron_scales, dtype=torch.float64, device=device)
    mlp.fc1 = _slice_rows(mlp.fc1, neurons)
    mlp.fc2 = _slice_columns(mlp.fc2, neurons, scales)
    return mlp


def _check_dense(layers: list[nn.Module], num_heads: int, num_neurons: int) -> None:
    """Raise if a layer is already narrower than the dense config (slicing twice is not supported)."""
    for index, layer in enumerate(layers):
        attention, mlp = layer.self_attn, layer.mlp
        # ConstantAttention/ConstantMLP (a layer sliced to nothing) have neither attribute.
        heads = getattr(attention, "num_heads", None)
        neurons = getattr(getattr(mlp, "fc1", None), "out_features", None)
        if heads != num_heads or neurons != num_neurons:
            raise ValueError(
                f"encoder layer {index} is already pruned: slice_vision_tower needs the dense model; "
                "to prune further, combine the masks and slice the dense model once"
            )


def slice_vision_tower(model: nn.Module, head_mask: torch.Tensor, neuron_mask: torch.Tensor) -> nn.Module:
    """Physically remove the pruned heads and neurons of `model`'s vision encoder, in place.

    Works on any supported family, full (the text tower is left alone) or vision-only
    (`clip_prune.towers`). The config is not changed, so the sliced model cannot be
    saved and reloaded as it is: `saving.cut_pruned_model` wraps this in a model class whose
    config records the per-layer widths.

    Args:
        model: a dense model; its encoder layers are replaced or modified in place.
        head_mask: [L, H] head scales, 0 = pruned.
        neuron_mask: [L, F] neuron scales, 0 = pruned.

    Returns:
        `model`, whose outputs now equal those of the hook-masked dense model.
    """
    config = tower_of(model).vision.config
    check_masks(head_mask, neuron_mask, mask_shapes(config))
    layers = tower_of(model).layers
    _check_dense(layers, config.num_attention_heads, config.intermediate_size)
    for layer, layer_plan in zip(layers, plan_from_masks(head_mask, neuron_mask), strict=True):
        layer.self_attn = _slice_attention(layer.self_attn, layer_plan)
        layer.mlp = _slice_mlp(layer.mlp, layer_plan)
    return model
