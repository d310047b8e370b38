"""What every family's pruned classes share: per-layer widths in the vision config, narrower layers, and constant
modules for layers left with no heads or neurons.

transformers 5 cannot load per-layer widths into a dense model class (docs/design.md, "Facts about transformers 5.x"),
so each family's pruned model builds the dense structure, then swaps in narrower projections, or constant modules,
before `from_pretrained` fills in the weights. Part of the remote code of a pruned directory (see
`clip_prune/hub/__init__.py`), copied beside each family's configuration and modeling files: imports no clip_prune.
"""

from typing import Any

import torch
from torch import nn
from transformers import initialization as init


class PrunedWidths:
    """Mixin of a family's pruned vision config: fills in and checks `heads_per_layer` and `neurons_per_layer`.

    The config class itself declares both fields (so `@strict` checks their types); the dense sizes
    (`num_attention_heads` H, `intermediate_size` F) stay those of the model it was cut from.
    """

    heads_per_layer: list[int] | None
    neurons_per_layer: list[int] | None

    def __post_init__(self, **kwargs: Any) -> None:
        if self.heads_per_layer is None:
            self.heads_per_layer = [self.num_attention_heads] * self.num_hidden_layers
        if self.neurons_per_layer is None:
            self.neurons_per_layer = [self.intermediate_size] * self.num_hidden_layers
        super().__post_init__(**kwargs)

    def validate_widths(self) -> None:
        """Part of `@strict` validation: one width per layer, each within the dense size."""
        for name, widths, dense in (("heads_per_layer", self.heads_per_layer, self.num_attention_heads),
                                    ("neurons_per_layer", self.neurons_per_layer, self.intermediate_size)):
            if len(widths) != self.num_hidden_layers:
                raise ValueError(
                    f"{name} has {len(widths)} entries but num_hidden_layers is {self.num_hidden_layers}"
                )
            if not all(0 <= width <= dense for width in widths):
                raise ValueError(f"{name} must lie in [0, {dense}], got {widths}")


class PrunedFullConfig:
    """Mixin of a family's full pruned config: its vision config must record the per-layer widths."""

    def validate_pruned_vision(self) -> None:
        """Part of `@strict` validation."""
        if not isinstance(self.vision_config, PrunedWidths):
            raise TypeError(
                f"vision_config must be a pruned vision config (or a dict), got {type(self.vision_config).__name__}; "
                "build it with clip_prune's VisionTower.pruned_config"
            )


class Bias(nn.Module):
    """A bias vector alone, standing in for a Linear layer that lost all its inputs."""

    def __init__(self, bias: torch.Tensor) -> None:
        super().__init__()
        self.bias = nn.Parameter(bias)


class ConstantAttention(nn.Module):
    """Self-attention of a layer with no heads left: outputs its out_proj bias at every token.

    Keeps `out_proj.bias` so the state dict reads like the family's attention module.
    """

    def __init__(self, bias: torch.Tensor) -> None:
        super().__init__()
        self.out_proj = Bias(bias)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **kwargs) -> tuple[torch.Tensor, None]:
        """(B, T, D) copies of the bias, and no attention weights."""
        # A new tensor rather than an expanded view: a view of a parameter taken under no_grad
        # reports requires_grad without a grad_fn, which breaks torch's ModuleTracker (FLOP counting).
        return torch.zeros_like(hidden_states) + self.out_proj.bias, None


class ConstantMLP(nn.Module):
    """MLP of a layer with no neurons left: outputs its fc2 bias at every token (keeps `fc2.bias`)."""

    def __init__(self, bias: torch.Tensor) -> None:
        super().__init__()
        self.fc2 = Bias(bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, T, D) copies of the bias (a new tensor, as in ConstantAttention)."""
        return torch.zeros_like(hidden_states) + self.fc2.bias


def resize_layers(vision: nn.Module, config: PrunedWidths) -> None:
    """Give each encoder layer of the dense `vision` model the widths recorded in `config`, with new (unset) weights."""
    for layer, heads, neurons in zip(vision.encoder.layers, config.heads_per_layer, config.neurons_per_layer,
                                     strict=True):
        attention, mlp = layer.self_attn, layer.mlp
        hidden, head_dim = attention.embed_dim, attention.head_dim
        if heads == 0:
            layer.self_attn = ConstantAttention(torch.empty(hidden))
        elif heads != attention.num_heads:
            attention.q_proj = nn.Linear(hidden, heads * head_dim)
            attention.k_proj = nn.Linear(hidden, heads * head_dim)
            attention.v_proj = nn.Linear(hidden, heads * head_dim)
            attention.out_proj = nn.Linear(heads * head_dim, hidden)
            attention.num_heads = heads
        if neurons == 0:
            layer.mlp = ConstantMLP(torch.empty(hidden))
        elif neurons != mlp.fc1.out_features:
            mlp.fc1 = nn.Linear(hidden, neurons)
            mlp.fc2 = nn.Linear(neurons, hidden)


class PrunedVisionModel:
    """Mixin of a family's pruned vision model (listed before the dense class): the dense structure with the
    widths of `config.heads_per_layer` and `neurons_per_layer`; `from_pretrained` fills in the weights."""

    def __init__(self, config: PrunedWidths) -> None:
        super().__init__(config)
        resize_layers(self, config)
        # Again, so the swapped-in modules are initialised (from_pretrained skips this on the meta device).
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        # The Bias module itself, not ConstantAttention/ConstantMLP: transformers treats this
        # class as custom code and skips modules without parameters of their own.
        if isinstance(module, Bias):
            init.zeros_(module.bias)


class PrunedFullModel:
    """Mixin of a family's full pruned model (listed before the dense class): the dense model whose vision tower is
    `pruned_vision_class`; the text tower is the family's own."""

    pruned_vision_class: type[nn.Module]

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.vision_model = self.pruned_vision_class._from_config(config.vision_config)
        self.post_init()
