"""The vision-tower adapter: what the pruning core needs to know about one model family.

Every family (CLIP, SigLIP, SigLIP2) keeps the same pre-LN encoder layer, `self_attn.{q,k,v,out_proj}` and
`mlp.{fc1,fc2}` (docs/design.md, "Vision-tower families"), so masks, Fisher, search, reconstruction and slicing
are family-free. What differs lives in one subclass of `VisionTower` per family: where the tower sits, what
enters the first layer, which tokens the pooling reads, how many tokens a layer sees, which loss the family
was trained with, how it scores image-text pairs, and which pruned classes save it. Nothing outside
`clip_prune.towers` tests a model's class.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

VisionInputs = Mapping[str, torch.Tensor]
"""What a vision tower takes: `pixel_values`, and for SigLIP2 its attention mask and spatial shapes."""


PIXEL_NORMALIZATION = ("pixel_mean", "pixel_std")
"""Batch keys that come with uint8 `pixel_values` ([B, 3] float32, in grey levels: the image processor's mean and
std over its rescale factor, `clip_prune.data.pixels.PixelLoader`); `normalize_pixels` consumes them."""


def normalize_pixels(inputs: VisionInputs) -> dict[str, torch.Tensor]:
    """`inputs` with uint8 `pixel_values` [B, 3, S, S] turned into the float32 pixels the model takes,
    (pixels − pixel_mean) / pixel_std on their device, the image processor's fused rescale and normalisation;
    inputs with float pixels as they are. The normalisation keys are dropped either way."""
    inputs = dict(inputs)
    mean, std = (inputs.pop(name, None) for name in PIXEL_NORMALIZATION)
    pixels = inputs.get("pixel_values")
    if pixels is None or pixels.is_floating_point():
        return inputs
    if mean is None or std is None:
        raise ValueError(f"uint8 pixel_values [{', '.join(map(str, pixels.shape))}] need the batch's pixel_mean and "
                         "pixel_std to be normalised (clip_prune.data.pixels.PixelLoader gives them)")
    mean, std = mean.to(pixels.device, torch.float32), std.to(pixels.device, torch.float32)
    shape = (*mean.shape, *([1] * (pixels.ndim - mean.ndim)))
    inputs["pixel_values"] = pixels.to(torch.float32).sub_(mean.view(shape)).div_(std.view(shape))
    return inputs


def as_inputs(inputs: torch.Tensor | VisionInputs) -> VisionInputs:
    """A pixel batch as the tower's inputs (`{"pixel_values": pixels}`); the tower's inputs as they are."""
    return {"pixel_values": inputs} if isinstance(inputs, torch.Tensor) else inputs


def inputs_to(inputs: VisionInputs, device: torch.device | str, dtype: torch.dtype | None = None,
              non_blocking: bool = False) -> dict[str, torch.Tensor]:
    """`inputs` on `device`, uint8 pixels normalised there (`normalize_pixels`), then the floating-point ones (the
    pixels) in `dtype` if given (masks and shapes keep theirs): every consumer of batches gets its model inputs here.
    """
    moved = normalize_pixels({name: value.to(device, non_blocking=non_blocking) for name, value in inputs.items()})
    if dtype is None:
        return moved
    return {name: value.to(dtype) if value.is_floating_point() else value for name, value in moved.items()}


class VisionTower:
    """One family's vision tower inside a loaded model: a full image-text model or its vision model alone.

    Subclasses set the class attributes and implement the methods marked family-specific.
    """

    family: ClassVar[str]
    """Short name, e.g. `clip`."""
    model_classes: ClassVar[dict[str, type[PreTrainedModel]]]
    """Dense `config.model_type` → the transformers class that loads it (full and vision-only)."""
    pruned_classes: ClassVar[dict[str, type[PreTrainedModel]]]
    """Dense `config.model_type` → the `clip_prune.hub` class of its pruned counterpart."""
    vision_model_type: ClassVar[str]
    """`model_type` of the family's vision-only config, e.g. `clip_vision_model`."""
    processor_class: ClassVar[type]
    """The transformers processor that joins the family's image processor and tokenizer."""
    input_names: ClassVar[tuple[str, ...]] = ("pixel_values",)
    """Batch keys the vision tower takes (the data path produces them)."""
    text_padding: ClassVar[str] = "longest"
    """How captions are padded for the text tower (SigLIP was trained on `max_length` padding)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @classmethod
    def model_types(cls) -> set[str]:
        """Every `model_type` of this family, dense and pruned."""
        return set(cls.model_classes) | {pruned.config_class.model_type for pruned in cls.pruned_classes.values()}

    @property
    def vision(self) -> nn.Module:
        """The vision model holding `embeddings`, `encoder.layers` and `post_layernorm`."""
        return getattr(self.model, "vision_model", self.model)

    @property
    def config(self) -> PretrainedConfig:
        """The vision config (per-layer widths included for a pruned model)."""
        return self.vision.config

    @property
    def layers(self) -> list[nn.Module]:
        """The L encoder layers, first to last."""
        return list(self.vision.encoder.layers)

    @property
    def has_text(self) -> bool:
        """Whether the model holds the text tower (and so can score captions)."""
        return hasattr(self.model, "text_model")

    def vision_inputs(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The entries of `batch` the vision tower takes, with `pixel_mean` and `pixel_std` where the pixels are
        uint8 (`inputs_to` normalises them on the device)."""
        return {name: batch[name] for name in (*self.input_names, *PIXEL_NORMALIZATION) if name in batch}

    def model_inputs(self, inputs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The entries of `inputs` the vision model's forward takes (no normalisation keys)."""
        return {name: inputs[name] for name in self.input_names if name in inputs}

    def example_inputs(self, batch_size: int, image_size: int | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
        """Random inputs of the tower's shape on its device and in its dtype (for counting, timing, ONNX export)."""
        config = self.config
        size = config.image_size if image_size is None else image_size
        parameter = next(self.vision.parameters())
        generator = torch.Generator().manual_seed(seed)
        pixels = torch.randn(batch_size, config.num_channels, size, size, generator=generator)
        return {"pixel_values": pixels.to(parameter.device, parameter.dtype)}

    # The parts of an encoder layer that pruning reads, hooks and cuts, under clip-prune's own names: the core
    # reaches a module only through these, so a family whose modules are named otherwise overrides `part_paths`.

    part_paths: ClassVar[dict[str, str]] = {
        "attention": "self_attn",
        "queries": "self_attn.q_proj",
        "keys": "self_attn.k_proj",
        "values": "self_attn.v_proj",
        "attention_output": "self_attn.out_proj",
        "mlp": "mlp",
        "mlp_input": "mlp.fc1",
        "mlp_output": "mlp.fc2",
        "norm_before_attention": "layer_norm1",
        "norm_before_mlp": "layer_norm2",
    }
    """Part → its path inside an encoder layer. `attention_output` takes the heads' outputs side by side (head h:
    input columns h·d … (h+1)·d − 1), `mlp_input` has a row and `mlp_output` a column per neuron."""

    def part(self, layer: nn.Module, name: str) -> nn.Module:
        """The part `name` of one encoder layer (`part_paths`)."""
        return layer.get_submodule(self.part_paths[name])

    def replace_part(self, layer: nn.Module, name: str, module: nn.Module) -> None:
        """Put `module` in the place of the part `name` of one encoder layer (slicing swaps them)."""
        parent, _, attribute = self.part_paths[name].rpartition(".")
        setattr(layer.get_submodule(parent) if parent else layer, attribute, module)

    def part_path(self, index: int, name: str) -> str:
        """State-dict path of part `name` of layer `index`, relative to the encoder (e.g. `layers.3.mlp.fc2`): the
        keys of refit files."""
        return f"layers.{index}.{self.part_paths[name]}"

    def head_count(self, layer: nn.Module) -> int:
        """The heads one layer's attention computes."""
        return self.part(layer, "attention").num_heads

    def set_head_count(self, layer: nn.Module, count: int) -> None:
        """Record that one layer's attention now computes `count` heads (its projections sliced to them)."""
        self.part(layer, "attention").num_heads = count

    def mlp_activation(self, layer: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """The activation between the MLP's input and output projections."""
        return self.part(layer, "mlp").activation_fn

    @property
    def head_dim(self) -> int:
        """d, the width of one attention head."""
        return self.config.hidden_size // self.config.num_attention_heads

    @property
    def encoder_name(self) -> str:
        """The encoder's name as `torch.utils.flop_counter` reports it (the vision model's class, then `.encoder`)."""
        return f"{type(self.vision).__name__}.encoder"

    # Family-specific.

    @classmethod
    def num_tokens(cls, config: PretrainedConfig) -> int:
        """T, the tokens every encoder layer sees for one image at the config's size."""
        raise NotImplementedError

    def embed(self, inputs: VisionInputs) -> torch.Tensor:
        """The hidden states [B, T, D] that enter the first encoder layer."""
        raise NotImplementedError

    def layer_attention_mask(self, inputs: VisionInputs) -> torch.Tensor | None:
        """The attention mask every encoder layer is called with (None: all tokens attend to all)."""
        return None

    def token_mask(self, inputs: VisionInputs) -> torch.Tensor | None:
        """[B, T] True for real tokens, False for padding (None: all tokens are real)."""
        return None

    pooled_tokens: ClassVar[slice | None] = None
    """The tokens of the last layer's output that the pooling reads (None: all of them)."""

    @classmethod
    def pooling_needs_attention(cls) -> bool:
        """Whether the image reaches the pooled output only through attention heads: the pooling reads tokens no
        patch enters but by attention (CLIP's CLS token), so with no head left the embedding ignores the image."""
        return cls.pooled_tokens is not None

    def image_embeds(self, inputs: VisionInputs) -> torch.Tensor:
        """The image embeddings [B, E] the family compares with text (projected if the model has a projection)."""
        raise NotImplementedError

    def text_embeds(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """The text embeddings [B, E] of tokenized captions."""
        raise NotImplementedError

    @property
    def embed_dim(self) -> int:
        """E, the width of `image_embeds`."""
        raise NotImplementedError

    def logits(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """[N_img, N_txt] pair scores as the family computes them from unnormalised embeddings."""
        raise NotImplementedError

    def loss(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """The image-text loss the family was trained with, over in-batch pairs (row i matches column i)."""
        raise NotImplementedError

    # Pruned counterparts.

    def pruned_class(self) -> type[PreTrainedModel]:
        """The `clip_prune.hub` class that saves and loads this model with per-layer widths."""
        model_type = self.model.config.model_type
        return self.pruned_classes[model_type] if model_type in self.pruned_classes else type(self.model)

    @classmethod
    def pruned_vision_config(cls, config: PretrainedConfig, heads_per_layer: list[int],
                             neurons_per_layer: list[int]) -> PretrainedConfig:
        """The pruned vision config with the fields of the vision `config` and these per-layer widths."""
        values = _dense_values(config) | {"num_hidden_layers": len(heads_per_layer)}
        return cls.pruned_classes[cls.vision_model_type].config_class(
            **values, heads_per_layer=heads_per_layer, neurons_per_layer=neurons_per_layer)

    @classmethod
    def pruned_config(cls, config: PretrainedConfig, heads_per_layer: list[int],
                      neurons_per_layer: list[int]) -> PretrainedConfig:
        """The pruned counterpart of a dense config (full or vision-only), recording the per-layer widths."""
        if config.model_type == cls.vision_model_type:
            return cls.pruned_vision_config(config, heads_per_layer, neurons_per_layer)
        vision = cls.pruned_vision_config(config.vision_config, heads_per_layer, neurons_per_layer)
        return cls.pruned_classes[config.model_type].config_class(**_dense_values(config, "vision_config"),
                                                                  vision_config=vision)


def _dense_values(config: PretrainedConfig, *dropped: str) -> dict[str, Any]:
    """The fields of `config` that a pruned config takes over (identity and per-layer widths left out)."""
    values = config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "auto_map", "heads_per_layer",
                "neurons_per_layer", *dropped):
        values.pop(key, None)
    return values
