"""Physical pruning of a vision encoder: pruning plans and weight slicing.

Follows docs/design.md, "Physical pruning and the saved model": keep the query, key and value rows and the attention
output columns of the kept heads, and the MLP input rows and output columns of the kept neurons, and fold each kept
unit's mask scale into its output columns, so the sliced model computes what the hook-masked model
(`core/pruning/masks.py`) computes. A layer left with no heads (or no neurons) gets a constant module that outputs the
output projection's bias (docs/design.md, "Facts about transformers 5.x"). Modules are reached through the family's
tower (`VisionTower.part`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from clip_prune.core.pruning.masks import check_masks, head_columns, mask_shapes
from clip_prune.hub.pruned_layers import ConstantAttention, ConstantMLP
from clip_prune.towers import VisionTower, tower_of


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


def _slice_attention(tower: VisionTower, layer: nn.Module, plan: LayerPlan) -> None:
    """Keep the heads of `plan` in `layer`'s attention, their scales folded into its output projection; no head left:
    a constant (the output projection's bias)."""
    output = tower.part(layer, "attention_output")
    if not plan.heads:
        tower.replace_part(layer, "attention", ConstantAttention(output.bias.detach().clone()))
        return
    device = output.weight.device
    rows = head_columns(torch.tensor(plan.heads, device=device), tower.head_dim)
    scales = torch.tensor(plan.head_scales, dtype=torch.float64, device=device).repeat_interleave(tower.head_dim)
    for name in ("queries", "keys", "values"):
        tower.replace_part(layer, name, _slice_rows(tower.part(layer, name), rows))
    tower.replace_part(layer, "attention_output", _slice_columns(output, rows, scales))
    # forward reshapes by the head size, so only the bookkeeping of the head count changes; the layer's input and
    # output width stays D.
    tower.set_head_count(layer, len(plan.heads))


def _slice_mlp(tower: VisionTower, layer: nn.Module, plan: LayerPlan) -> None:
    """Keep the neurons of `plan` in `layer`'s MLP, their scales folded into its output projection; no neuron left: a
    constant (the output projection's bias)."""
    output = tower.part(layer, "mlp_output")
    if not plan.neurons:
        tower.replace_part(layer, "mlp", ConstantMLP(output.bias.detach().clone()))
        return
    neurons = torch.tensor(plan.neurons, device=output.weight.device)
    scales = torch.tensor(plan.neuron_scales, dtype=torch.float64, device=output.weight.device)
    tower.replace_part(layer, "mlp_input", _slice_rows(tower.part(layer, "mlp_input"), neurons))
    tower.replace_part(layer, "mlp_output", _slice_columns(output, neurons, scales))


def _check_dense(tower: VisionTower, num_heads: int, num_neurons: int) -> None:
    """Raise if a layer is already narrower than the dense config (slicing twice is not supported)."""
    for index, layer in enumerate(tower.layers):
        sliced_away = isinstance(tower.part(layer, "attention"), ConstantAttention) or isinstance(
            tower.part(layer, "mlp"), ConstantMLP)
        if (sliced_away or tower.head_count(layer) != num_heads
                or tower.part(layer, "mlp_input").out_features != num_neurons):
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
    tower = tower_of(model)
    config = tower.config
    check_masks(head_mask, neuron_mask, mask_shapes(config))
    _check_dense(tower, config.num_attention_heads, config.intermediate_size)
    for layer, layer_plan in zip(tower.layers, plan_from_masks(head_mask, neuron_mask), strict=True):
        _slice_attention(tower, layer, layer_plan)
        _slice_mlp(tower, layer, layer_plan)
    return model
