"""Head and neuron masks on a vision encoder, applied with forward pre-hooks.

transformers 5.x dropped `head_mask` (docs/design.md, "Facts about transformers 5.x"), so the
masks multiply the input of each layer's attention output projection (the concatenated head outputs,
(B, T, H·d)) and the input of its MLP output projection (the post-activation neurons, (B, T, F)). Both
hooks work under `eager` and `sdpa` attention and leave the model's modules untouched.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import PretrainedConfig

from clip_prune.towers import tower_of


def mask_shapes(config: PretrainedConfig) -> tuple[tuple[int, int], tuple[int, int]]:
    """Shapes ([L, H], [L, F]) of the head and neuron masks of a dense vision encoder."""
    layers = config.num_hidden_layers
    return (layers, config.num_attention_heads), (layers, config.intermediate_size)


class VisionMasks:
    """Multiplicative head [L, H] and neuron [L, F] masks hooked into a vision encoder.

    With `per_sample_grads()` the hooks scale each sample by its own copy of the mask, a
    leaf of shape (B, H) or (B, F) per layer: autograd then yields the per-sample mask
    gradients g_{n,i} of docs/design.md ("Fisher information") from the batch's single backward
    pass, and their sum over n is the batch gradient of the shared mask.
    """

    def __init__(self, model: nn.Module, head_mask: torch.Tensor | None = None,
                 neuron_mask: torch.Tensor | None = None) -> None:
        tower = tower_of(model)
        self.layers = tower.layers
        config = tower.config
        head_shape, neuron_shape = mask_shapes(config)
        self.head_dim = tower.head_dim
        device = tower.part(self.layers[0], "mlp_output").weight.device
        self.head_mask = _checked(head_mask, head_shape, "head_mask", device)
        self.neuron_mask = _checked(neuron_mask, neuron_shape, "neuron_mask", device)
        self._per_sample: dict[str, list[torch.Tensor | None]] | None = None
        self._handles: list[RemovableHandle] = []
        for index, layer in enumerate(self.layers):
            self._handles.append(tower.part(layer, "attention_output").register_forward_pre_hook(
                self._head_hook(index)))
            self._handles.append(tower.part(layer, "mlp_output").register_forward_pre_hook(self._neuron_hook(index)))

    def remove(self) -> None:
        """Detach the hooks: the model computes its dense outputs again."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def set(self, head_mask: torch.Tensor | None = None, neuron_mask: torch.Tensor | None = None) -> None:
        """Replace the masks in place (shapes are checked)."""
        if head_mask is not None:
            self.head_mask = _checked(head_mask, tuple(self.head_mask.shape), "head_mask", self.head_mask.device)
        if neuron_mask is not None:
            self.neuron_mask = _checked(
                neuron_mask, tuple(self.neuron_mask.shape), "neuron_mask", self.neuron_mask.device
            )

    @contextmanager
    def tracking_samples(self) -> Iterator[None]:
        """Within the block, each forward pass records per-sample mask leaves for `per_sample_grads`."""
        self._per_sample = {"head": [None] * len(self.layers), "neuron": [None] * len(self.layers)}
        try:
            yield
        finally:
            self._per_sample = None

    def per_sample_grads(self, loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample gradients of `loss` w.r.t. the masks, ([B, L, H], [B, L, F]), from one backward pass.

        Must be called inside `tracking_samples()` after the forward pass that produced `loss`.
        """
        assert self._per_sample is not None, "call per_sample_grads inside tracking_samples()"
        leaves = self._per_sample["head"] + self._per_sample["neuron"]
        if any(leaf is None for leaf in leaves):
            raise RuntimeError("the forward pass did not run through every encoder layer")
        grads = torch.autograd.grad(loss, leaves)
        layers = len(self.layers)
        return torch.stack(grads[:layers], dim=1), torch.stack(grads[layers:], dim=1)

    def _scale(self, kind: str, index: int, mask_row: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The (B, N) scale of one layer on `like`'s device: the shared mask row, or a per-sample leaf when tracking.

        The move is a no-op once the masks sit where the model runs; it keeps the hooks right
        when Lightning has moved the model but not yet the masks.
        """
        mask_row = mask_row.to(like.device)
        batch = like.shape[0]
        if self._per_sample is None:
            return mask_row.expand(batch, -1)
        leaf = mask_row.detach().expand(batch, -1).clone().requires_grad_(True)
        self._per_sample[kind][index] = leaf
        return leaf

    def _head_hook(self, index: int):
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            context = args[0]
            batch, tokens, width = context.shape
            scale = self._scale("head", index, self.head_mask[index], context)
            heads = context.view(batch, tokens, -1, self.head_dim) * scale[:, None, :, None].to(context.dtype)
            return (heads.view(batch, tokens, width), *args[1:])

        return hook

    def _neuron_hook(self, index: int):
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            neurons = args[0]
            scale = self._scale("neuron", index, self.neuron_mask[index], neurons)
            return (neurons * scale[:, None, :].to(neurons.dtype), *args[1:])

        return hook


def _checked(mask: torch.Tensor | None, shape: tuple[int, int], name: str, device: torch.device) -> torch.Tensor:
    """`mask` as a float32 tensor on `device` after checking its shape and values (ones if None)."""
    if mask is None:
        return torch.ones(shape, device=device)
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(
            f"{name} has shape {list(mask.shape)} but this model needs {list(shape)} "
            "(layers x heads for head_mask, layers x MLP neurons for neuron_mask): "
            "were the masks made for another model?"
        )
    if not torch.isfinite(mask).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return mask.detach().to(device=device, dtype=torch.float32)


def head_columns(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Indices of the attention output's input columns (q, k, v output rows) of `heads`, the kept heads' indices
    (of a mask row: `row.nonzero().flatten()`)."""
    return (heads[:, None] * head_dim + torch.arange(head_dim, device=heads.device)).flatten()



def check_masks(head_mask: torch.Tensor, neuron_mask: torch.Tensor,
                shapes: tuple[tuple[int, int], tuple[int, int]] | None = None) -> None:
    """Raise one ValueError listing every problem with `head_mask` [L, H] and `neuron_mask` [L, F].

    Args:
        head_mask: per-head scales, 0 = pruned.
        neuron_mask: per-neuron scales, 0 = pruned.
        shapes: the ([L, H], [L, F]) shapes the model needs (`mask_shapes`); None checks only
            that both masks are 2-D with the same number of layers.
    """
    problems = []
    for name, mask in (("head_mask", head_mask), ("neuron_mask", neuron_mask)):
        if not isinstance(mask, torch.Tensor):
            problems.append(f"{name} must be a tensor, got {type(mask).__name__}")
        elif mask.dim() != 2:
            problems.append(f"{name} must be 2-D (layers x units), got shape {list(mask.shape)}")
        elif not torch.isfinite(mask).all():
            problems.append(f"{name} contains NaN or infinite values; recompute or repair the mask")
    if problems:
        raise ValueError("invalid masks:\n  " + "\n  ".join(problems))
    if shapes is not None:
        named = (("head_mask", head_mask, shapes[0]), ("neuron_mask", neuron_mask, shapes[1]))
        for name, mask, shape in named:
            if tuple(mask.shape) != tuple(shape):
                problems.append(
                    f"{name} has shape {list(mask.shape)} but the model needs {list(shape)}: "
                    "were the masks made for another model (check --model.pretrained)?"
                )
    elif head_mask.shape[0] != neuron_mask.shape[0]:
        problems.append(
            f"head_mask has {head_mask.shape[0]} layers but neuron_mask has {neuron_mask.shape[0]}"
        )
    if not problems and not (head_mask != 0).any() and not (neuron_mask != 0).any():
        problems.append(
            "the masks prune every head and every neuron of every layer, which leaves no encoder; "
            "use a larger FLOP constraint"
        )
    if problems:
        raise ValueError("invalid masks:\n  " + "\n  ".join(problems))


def mask_value_notes(head_mask: torch.Tensor, neuron_mask: torch.Tensor, binary: bool) -> list[str]:
    """Refuse mask values the masks' kind cannot hold; describe the unusual ones it may.

    Args:
        head_mask: [L, H] per-head values, 0 = pruned.
        neuron_mask: [L, F] per-neuron values, 0 = pruned.
        binary: the masks come with refit columns (a `weights` reconstruction), so they hold 0 and 1 only.
            Scale masks (`scales`, the original tool's) may hold any kept value, negative ones too: a least-squares
            scale below zero turns a unit's output round, which the solve may find best.
    """
    named = (("head_mask", head_mask), ("neuron_mask", neuron_mask))
    if binary:
        odd = [name for name, mask in named if not bool(((mask == 0) | (mask == 1)).all())]
        if odd:
            raise ValueError(f"{' and '.join(odd)} hold values other than 0 and 1, but the refit columns beside them "
                             "belong to binary masks (a `weights` reconstruction): were the mask files replaced?")
        return []
    return [f"{name} holds {int((mask < 0).sum())} negative scales (down to {float(mask.min()):.3g}): kept units whose "
            "output the reconstruction turned round (the original tool writes such masks); applied as they are"
            for name, mask in named if bool((mask < 0).any())]

