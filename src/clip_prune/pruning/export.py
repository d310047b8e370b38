"""Pruned CLIP models that load with `from_pretrained`, and saving, loading and reading their inputs.

DESIGN.md, "Physical pruning and the saved model": a Hugging Face-style directory with
safetensors weights, a config recording each layer's head and neuron counts, the
processor files and the plan (`plan.json`). transformers 5 cannot load per-layer widths
into `CLIPModel`, so the config subclasses below record them and the model subclasses
resize the dense structure before `from_pretrained` fills in the weights.
"""

import copy
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.dataclasses import strict
from transformers import (
    AutoConfig,
    AutoModel,
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPVisionConfig,
    CLIPVisionModel,
)
from transformers import initialization as init
from transformers.initialization import no_init_weights

from clip_prune.model.masking import mask_shapes, vision_tower
from clip_prune.pruning.refit import RefitWeights, write_refit
from clip_prune.pruning.structural import (
    Bias,
    ConstantAttention,
    ConstantMLP,
    LayerPlan,
    check_masks,
    plan_from_masks,
    slice_vision_tower,
    write_plan,
)

PLAN_FILE = "plan.json"
"""Name of the pruning plan inside a saved pruned-model directory."""


@strict
class PrunedCLIPVisionConfig(CLIPVisionConfig):
    r"""
    Configuration of a CLIP vision tower whose encoder layers keep their own numbers of heads and neurons.

    Takes every argument of [`CLIPVisionConfig`], which describe the dense model the pruned one was cut
    from (`num_attention_heads` H and `intermediate_size` F stay the dense sizes, and the head size stays
    `hidden_size // num_attention_heads`), plus:

    Args:
        heads_per_layer (`list[int]`, *optional*, defaults to `num_attention_heads` for every layer):
            Number of attention heads kept by each of the `num_hidden_layers` encoder layers, from 0 to H.
        neurons_per_layer (`list[int]`, *optional*, defaults to `intermediate_size` for every layer):
            Number of MLP neurons kept by each encoder layer, from 0 to F.
    """

    model_type = "clip_pruned_vision_model"

    heads_per_layer: list[int] | None = None
    neurons_per_layer: list[int] | None = None

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


@strict
class PrunedCLIPConfig(CLIPConfig):
    r"""
    Configuration of a CLIP model whose vision tower is pruned: a [`CLIPConfig`] with a pruned vision config.

    Args:
        text_config (`dict` or `CLIPTextConfig`, *optional*):
            Options of the text tower, which pruning leaves untouched; CLIPTextConfig's defaults if None.
        vision_config (`dict` or `PrunedCLIPVisionConfig`, *optional*):
            Options of the vision tower, with its per-layer widths; a dense ViT-B/32 layout if None.
        projection_dim (`int`, *optional*, defaults to 512):
            Dimensionality of the text and vision projection layers.
        logit_scale_init_value (`float`, *optional*, defaults to 2.6592):
            Initial value of the *logit_scale* parameter.
        initializer_factor (`float`, *optional*, defaults to 1.0):
            Factor applied to all weight initialisations.
    """

    model_type = "clip_pruned"
    sub_configs_defaults = {"vision_config": PrunedCLIPVisionConfig, "text_config": CLIPTextConfig}

    def validate_pruned_vision(self) -> None:
        """Part of `@strict` validation: the vision config must record the per-layer widths."""
        if not isinstance(self.vision_config, PrunedCLIPVisionConfig):
            raise TypeError(
                "vision_config must be a PrunedCLIPVisionConfig (or a dict), got "
                f"{type(self.vision_config).__name__}; build it with config_from_plan"
            )


def _resize_layers(vision: CLIPVisionModel, config: PrunedCLIPVisionConfig) -> None:
    """Give each layer of the dense `vision` the widths recorded in `config`, with new (unset) weights."""
    for layer, heads, neurons in zip(vision.encoder.layers, config.heads_per_layer, config.neurons_per_layer,
                                     strict=True):
        attention, mlp = layer.self_attn, layer.mlp
        hidden, head_dim = attention.embed_dim, attention.head_dim
        if heads == 0:
            layer.self_attn = ConstantAttention(torch.empty(hidden))
        elif heads != attention.num_heads:
            attention.q_proj = torch.nn.Linear(hidden, heads * head_dim)
            attention.k_proj = torch.nn.Linear(hidden, heads * head_dim)
            attention.v_proj = torch.nn.Linear(hidden, heads * head_dim)
            attention.out_proj = torch.nn.Linear(heads * head_dim, hidden)
            attention.num_heads = heads
        if neurons == 0:
            layer.mlp = ConstantMLP(torch.empty(hidden))
        elif neurons != mlp.fc1.out_features:
            mlp.fc1 = torch.nn.Linear(hidden, neurons)
            mlp.fc2 = torch.nn.Linear(neurons, hidden)


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

    def _init_weights(self, module: torch.nn.Module) -> None:
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


def register_pruned_models() -> None:
    """Let `AutoConfig` and `AutoModel` load pruned directories (called when `clip_prune` is imported)."""
    AutoConfig.register(PrunedCLIPVisionConfig.model_type, PrunedCLIPVisionConfig, exist_ok=True)
    AutoConfig.register(PrunedCLIPConfig.model_type, PrunedCLIPConfig, exist_ok=True)
    AutoModel.register(PrunedCLIPVisionConfig, PrunedCLIPVisionModel, exist_ok=True)
    AutoModel.register(PrunedCLIPConfig, PrunedCLIPModel, exist_ok=True)


def _pruned_vision_config(config: CLIPVisionConfig, plan: list[LayerPlan]) -> PrunedCLIPVisionConfig:
    values = config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "heads_per_layer",
                "neurons_per_layer"):
        values.pop(key, None)
    return PrunedCLIPVisionConfig(**values, heads_per_layer=[len(layer.heads) for layer in plan],
                                  neurons_per_layer=[len(layer.neurons) for layer in plan])


def config_from_plan(config: CLIPConfig | CLIPVisionConfig,
                     plan: list[LayerPlan]) -> PrunedCLIPConfig | PrunedCLIPVisionConfig:
    """The pruned counterpart of the dense `config` with the per-layer widths of `plan`."""
    if isinstance(config, CLIPVisionConfig):
        return _pruned_vision_config(config, plan)
    values = config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "vision_config"):
        values.pop(key, None)
    return PrunedCLIPConfig(**values, vision_config=_pruned_vision_config(config.vision_config, plan))


def prune_model(model: CLIPModel | CLIPVisionModel, head_mask: torch.Tensor, neuron_mask: torch.Tensor,
                refit: RefitWeights | None = None) -> PrunedCLIPModel | PrunedCLIPVisionModel:
    """A physically pruned copy of `model`, which saves and reloads with `from_pretrained`.

    `model` itself is left unchanged.

    Args:
        model: a dense CLIPModel or CLIPVisionModel.
        head_mask: [L, H] head scales, 0 = pruned.
        neuron_mask: [L, F] neuron scales, 0 = pruned.
        refit: refit out_proj/fc2 columns of the kept units (`pruning.refit`), written in before slicing.
    """
    match model:
        case CLIPModel():
            pruned_class = PrunedCLIPModel
        case CLIPVisionModel():
            pruned_class = PrunedCLIPVisionModel
        case _:
            raise TypeError(f"prune_model takes a CLIPModel or CLIPVisionModel, got {type(model).__name__}")
    check_masks(head_mask, neuron_mask, mask_shapes(vision_tower(model).config))
    config = config_from_plan(model.config, plan_from_masks(head_mask, neuron_mask))
    dense = copy.deepcopy(model)
    if refit:
        write_refit(dense, head_mask, neuron_mask, refit)
    sliced = slice_vision_tower(dense, head_mask, neuron_mask)
    parameter = next(model.parameters())
    # The weights come from `sliced`: skip initialising them.
    with no_init_weights():
        pruned = pruned_class._from_config(config, attn_implementation=model.config._attn_implementation,
                                           dtype=parameter.dtype)
    pruned.load_state_dict(sliced.state_dict(), strict=True, assign=True)
    return pruned.to(parameter.device).train(model.training)


def save_pruned(model: PrunedCLIPModel | PrunedCLIPVisionModel, output_dir: str | Path, plan: list[LayerPlan],
                processor: Any = None, overwrite: bool = False) -> Path:
    """Write `model` (safetensors + config), `plan.json` and the processor files to `output_dir`, atomically.

    Everything is written to a hidden sibling directory first, which then takes the place of
    `output_dir`, so an interrupted save leaves no half-written model behind.

    Args:
        model: the pruned model (`prune_model`'s output or a loaded one).
        output_dir: directory to create; its parents are created as needed.
        plan: the pruning plan the model was cut with (`plan_from_masks`).
        processor: a CLIP processor, image processor or tokenizer to save alongside, or None.
        overwrite: replace an existing non-empty `output_dir` instead of refusing.

    Returns:
        The output directory.
    """
    if not isinstance(model, PrunedCLIPModel | PrunedCLIPVisionModel):
        raise TypeError(f"save_pruned needs a pruned model from prune_model, got {type(model).__name__}")
    config = vision_tower(model).config
    if ([len(layer.heads) for layer in plan] != list(config.heads_per_layer)
            or [len(layer.neurons) for layer in plan] != list(config.neurons_per_layer)):
        raise ValueError(
            f"the plan does not match the model: it keeps {[len(layer.heads) for layer in plan]} heads and "
            f"{[len(layer.neurons) for layer in plan]} neurons per layer, the model has "
            f"{config.heads_per_layer} and {config.neurons_per_layer}"
        )
    output = Path(output_dir).resolve()
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not overwrite:
        raise FileExistsError(f"{output} already exists and is not empty; pass --overwrite to replace it")
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.with_name(f".{output.name}.tmp-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        model.save_pretrained(staging)
        write_plan(plan, staging / PLAN_FILE)
        if processor is not None:
            processor.save_pretrained(staging)
        _replace(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output


def _replace(source: Path, target: Path) -> None:
    """Rename `source` to `target`, removing what was at `target` only once `source` is in place."""
    if not target.exists():
        os.rename(source, target)
        return
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(target, old)
    try:
        os.rename(source, target)
    except OSError:
        os.rename(old, target)
        raise
    if old.is_dir():
        shutil.rmtree(old)
    else:
        old.unlink()


def load_pruned(path: str | Path, **kwargs: Any) -> PrunedCLIPModel | PrunedCLIPVisionModel:
    """Load a directory written by `save_pruned`; `kwargs` go to `from_pretrained` (e.g. `dtype`)."""
    directory = Path(path)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{directory} has no config.json, so it is not a pruned model directory; point it at the output "
            "directory of clip-prune prune/apply (save_pruned)"
        )
    model_type = json.loads(config_file.read_text()).get("model_type")
    classes = {PrunedCLIPConfig.model_type: PrunedCLIPModel,
               PrunedCLIPVisionConfig.model_type: PrunedCLIPVisionModel}
    if model_type not in classes:
        raise ValueError(
            f"{directory} holds a model of type {model_type!r}, not a pruned CLIP model "
            f"({' or '.join(classes)}); load a dense checkpoint with transformers.CLIPModel.from_pretrained, "
            "or prune it first"
        )
    return classes[model_type].from_pretrained(directory, **kwargs)


def _read_mask(path: Path) -> torch.Tensor:
    """A float32 mask tensor read from `path` without unpickling arbitrary objects."""
    try:
        mask = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(
            f"could not read {path} as a tensor with torch.load(weights_only=True): {error}"
        ) from error
    if not isinstance(mask, torch.Tensor):
        raise ValueError(
            f"{path} holds a {type(mask).__name__}, expected a tensor (the original tool's format)"
        )
    return mask.float()


def read_masks(location: str | Path,
               vision_config: CLIPVisionConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Read `head_mask.pt` [L, H] and `neuron_mask.pt` [L, F], the original tool's mask files.

    Args:
        location: folder holding the masks, or one head-mask file (e.g. a sensitivity run's
            `head_mask_3.pt`) whose folder holds the `neuron_mask.pt`.
        vision_config: the dense model's vision config: the masks are checked against its shapes,
            and a missing `neuron_mask.pt` means every neuron is kept (all ones). Without it,
            `neuron_mask.pt` is required.

    Returns:
        (head_mask, neuron_mask) as float32 CPU tensors.
    """
    path = Path(location)
    if path.suffix == ".pt":
        if not path.is_file():
            raise FileNotFoundError(f"mask file {path} does not exist")
        folder, head_path = path.parent, path
    else:
        if not path.is_dir():
            raise FileNotFoundError(f"mask directory {path} does not exist")
        folder, head_path = path, path / "head_mask.pt"
    neuron_path = folder / "neuron_mask.pt"
    if not head_path.is_file():
        present = sorted(path.name for path in folder.iterdir())
        raise FileNotFoundError(f"{folder} has no head_mask.pt (found: {present or 'nothing'})")
    head_mask = _read_mask(head_path)
    if neuron_path.is_file():
        neuron_mask = _read_mask(neuron_path)
    elif vision_config is not None:
        neuron_mask = torch.ones(mask_shapes(vision_config)[1])
    else:
        raise FileNotFoundError(
            f"{folder} has no neuron_mask.pt; pass the model's vision_config to keep all neurons"
        )
    check_masks(head_mask, neuron_mask, None if vision_config is None else mask_shapes(vision_config))
    return head_mask, neuron_mask
