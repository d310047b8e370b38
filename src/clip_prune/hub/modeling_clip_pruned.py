"""CLIP models whose vision encoder layers keep their own numbers of heads and neurons.

transformers 5 cannot load per-layer widths into `CLIPModel` (DESIGN.md, "Facts about
transformers 5.x"), so these subclasses build the dense structure, then swap in narrower
projections, or constant modules for layers left with no heads or neurons, before
`from_pretrained` fills in the weights. Part of the remote code of a pruned directory (see
`clip_prune/hub/__init__.py`): imports no clip_prune.
"""

import torch
from torch import nn
from transformers import CLIPModel, CLIPVisionModel
from transformers import initialization as init

from .configuration_clip_pruned import PrunedCLIPConfig, PrunedCLIPVisionConfig


class Bias(nn.Module):
    """A bias vector alone, standing in for a Linear layer that lost all its inputs."""

    def __init__(self, bias: torch.Tensor) -> None:
        super().__init__()
        self.bias = nn.Parameter(bias)


class ConstantAttention(nn.Module):
    """Self-attention of a layer with no heads left: outputs its out_proj bias at every token.

    Keeps `out_proj.bias` so the state dict reads like CLIPAttention's.
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


def _resize_layers(vision: CLIPVisionModel, config: PrunedCLIPVisionConfig) -> None:
    """Give each layer of the dense `vision` the widths recorded in `config`, with new (unset) weights."""
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


class PrunedCLIPVisionModel(CLIPVisionModel):
    """A CLIPVisionModel whose layers have the widths of `config.heads_per_layer` and `neurons_per_layer`.

    Builds the dense structure, then swaps in narrower projections (or constant modules
    for layers with no heads or neurons); `from_pretrained` fills in the weights.
    """

    config: PrunedCLIPVisionConfig

    def __init__(self, config: PrunedCLIPVisionConfig) -> None:
        super().__init__(config)
        _resize_layers(self, config)
        # Again, so the swapped-in modules are initialised (from_pretrained skips this on the meta device).
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        # The Bias module itself, not ConstantAttention/ConstantMLP: transformers treats this
        # class as custom code and skips modules without parameters of their own.
        if isinstance(module, Bias):
            init.zeros_(module.bias)


class PrunedCLIPModel(CLIPModel):
    """A CLIPModel whose vision tower is a `PrunedCLIPVisionModel`; the text tower is CLIP's own."""

    config: PrunedCLIPConfig

    def __init__(self, config: PrunedCLIPConfig) -> None:
        super().__init__(config)
        self.vision_model = PrunedCLIPVisionModel._from_config(config.vision_config)
        self.post_init()
