"""Layer-wise reconstruction of a pruned vision encoder (docs/design.md, "Mask rescaling" and "Weight refit";
Kwon et al., arXiv 2204.09656).

Layer by layer, first to last, the kept heads and then the kept neurons are fitted by damped least
squares so that the student's mid-layer residual x' and layer output y match the teacher's (the dense
model, or the model under the "teaching assistant" masks). The student's inputs come from the already
reconstructed earlier layers, so later layers compensate earlier errors. Every family is pre-LN:
x' = x + Attn(LN1(x)), y = x' + MLP(LN2(x')). Two methods:

- `weights`: refit the out_proj columns of the kept heads and the fc2 columns of the kept neurons
  (masks stay binary; the columns go to `refit.safetensors`);
- `scales`: one real-valued scale per kept unit, folded into the masks (the original tool's format).

The student is computed here explicitly from the recorded unit inputs (kept heads' context vectors,
kept neurons' activations); the teacher runs the model's own layers under hook masks. The tower adapter
(`clip_prune.towers`) says what enters the first layer, which tokens are padding, and which tokens of the last
layer its pooling reads.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional
from tqdm.auto import tqdm

from clip_prune.core.pruning.least_squares import (
    Moments,
    SolveError,
    accumulate_moments,
    refit_columns,
    rescale_columns,
    solve_bounded,
    squared_error,
)
from clip_prune.core.pruning.masks import VisionMasks, check_masks, head_columns, mask_shapes
from clip_prune.core.pruning.refit import RefitWeights
from clip_prune.towers import VisionInputs, VisionTower, as_inputs, tower_of

Method = Literal["weights", "scales"]
ERROR_NAMES = ("heads_before", "heads_after", "neurons_before", "neurons_after")


@dataclass
class Reconstruction:
    """Masks and refit columns after reconstruction, and what it did, layer by layer."""

    head_mask: torch.Tensor
    """[L, H] float32; pruned heads stay 0; binary with `weights` (incoming scales are folded into the refit
    columns), the solved scales with `scales`."""
    neuron_mask: torch.Tensor
    """[L, F] float32, same convention."""
    refit: RefitWeights
    """Refit out_proj/fc2 columns (and biases) of the kept units; empty with `scales`."""
    errors: dict[str, torch.Tensor]
    """[L] float64 squared errors Σ‖teacher − student‖² on the calibration tokens, for each of `ERROR_NAMES`:
    the mid-layer residual x' before/after the head stage, the layer output y before/after the neuron stage
    (before = incoming weights, student input from the reconstructed earlier layers). With
    `last_layer_pooled_only` the last entries sum over the tokens the pooling reads only (CLIP: the CLS token)."""
    damping: torch.Tensor
    """[L, 2] damping λ that solved the heads and the neurons of each layer (NaN where nothing was solved)."""
    warnings: list[str] = field(default_factory=list)
    """Stages that kept their incoming weights even at the strongest damping, with the reason."""
    notes: list[str] = field(default_factory=list)
    """Stages solved only with a raised damping."""

    def report(self) -> dict[str, Any]:
        """JSON-ready per-layer errors and dampings (None where a stage had nothing to solve)."""
        dampings = [[None if value != value else value for value in column] for column in self.damping.T.tolist()]
        return {**{name: values.tolist() for name, values in self.errors.items()},
                "damping_heads": dampings[0], "damping_neurons": dampings[1], "notes": self.notes}


class _Recorded:
    """The first input of a module's latest call (see `_recording_inputs`)."""

    value: torch.Tensor


@contextmanager
def _recording_inputs(*modules: nn.Module) -> Iterator[list[_Recorded]]:
    """Record the first input of each module; prepended, so it sees the input before any mask hook."""
    records = [_Recorded() for _ in modules]

    def recorder(record: _Recorded):
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            record.value = args[0]

        return hook

    handles = [module.register_forward_pre_hook(recorder(record), prepend=True)
               for record, module in zip(records, modules, strict=True)]
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class _Stage:
    """The kept units of one layer and stage: their input columns, dense output columns and incoming scales."""

    name: str
    """`heads` or `neurons`."""
    layer: int
    """Index of the encoder layer."""
    linear: nn.Linear
    """The attention or MLP output projection."""
    key: str
    """State-dict prefix of `linear` inside the encoder (`VisionTower.part_path`)."""
    units: torch.Tensor
    """[K] kept unit indices."""
    columns: torch.Tensor
    """[C] input columns of the kept units (C = K·d for heads, K for neurons)."""
    scales: torch.Tensor
    """[K] incoming mask values of the kept units."""

    @property
    def group(self) -> int:
        return len(self.columns) // len(self.units) if len(self.units) else 1

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The dense columns W₀ [D, C] and bias [D]."""
        return self.linear.weight[:, self.columns], self.linear.bias

    def incoming(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The effective columns [D, C] and bias [D] under the incoming mask values."""
        weight, bias = self.dense()
        return weight * self.scales.to(weight).repeat_interleave(self.group), bias


@dataclass
class _Run:
    """State shared by the layers of one `reconstruct` call."""

    method: Method
    tower: VisionTower
    head_mask: torch.Tensor
    neuron_mask: torch.Tensor
    teacher_states: list[torch.Tensor]
    student_states: list[torch.Tensor]
    attention_masks: list[torch.Tensor | None]
    """Per batch, the attention mask the layers take (SigLIP2's padding; None elsewhere)."""
    token_masks: list[torch.Tensor | None]
    """Per batch, [B, T] True for real tokens (None: all real); padding never enters the moments."""
    damping: float
    max_abs_scale: float
    fit_bias: bool
    reduce: Callable[[torch.Tensor], torch.Tensor]
    refit: RefitWeights = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def solve(self, stage: _Stage, moments: Moments, where: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """New effective columns [D, C] and bias [D] of one stage, and the damping used (NaN if none)."""
        weight, bias, used = self._solve(stage, moments, where)
        solved = not math.isnan(used)
        if self.method == "weights":
            # The masks come out binary: the columns carry the incoming scales too, even where nothing was solved.
            if len(stage.columns) and (solved or bool((stage.scales != 1).any())):
                self.refit[f"{stage.key}.weight"] = weight.float()
            if self.fit_bias and solved:
                self.refit[f"{stage.key}.bias"] = bias.float()
        return weight, bias, used

    def _solve(self, stage: _Stage, moments: Moments, where: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        incoming = stage.incoming()
        weight0, bias0 = stage.dense()
        if self.method == "weights":
            if not len(stage.columns) and not self.fit_bias:
                return *incoming, float("nan")
            # Ridge towards the incoming effective columns (the dense ones for a binary mask).
            solve = partial(refit_columns, moments, *incoming, fit_bias=self.fit_bias,
                            max_growth=self.max_abs_scale)
        else:
            if not len(stage.units):
                return *incoming, float("nan")
            solve = partial(rescale_columns, moments, weight0, bias0, stage.scales, stage.group,
                            max_abs_scale=self.max_abs_scale)
        try:
            solution, used = solve_bounded(solve, self.damping)
        except SolveError as error:
            message = f"{where}: kept the incoming weights because {error}"
            self.warnings.append(message)
            warnings.warn(message, RuntimeWarning, stacklevel=5)
            return *incoming, float("nan")
        if used != self.damping:
            self.notes.append(f"{where}: solved with damping raised to {used:.3g}")
        if self.method == "scales":
            self.scale_mask(stage)[stage.layer, stage.units] = solution.to(self.head_mask.dtype)
            return weight0 * solution.to(weight0).repeat_interleave(stage.group), bias0, used
        return (*solution, used)

    def scale_mask(self, stage: _Stage) -> torch.Tensor:
        return self.head_mask if stage.name == "heads" else self.neuron_mask


def _solve_stage(run: _Run, stage: _Stage, moments: Moments, where: str
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Reduce the moments across ranks, solve; return (columns, bias, [before, after] errors, damping)."""
    moments = moments.map(lambda tensor, _: run.reduce(tensor))
    before = squared_error(moments, *stage.incoming())
    weight, bias, damping = run.solve(stage, moments, where)
    return weight, bias, torch.stack([before, squared_error(moments, weight, bias)]), damping


def _apply(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return functional.linear(inputs, weight.to(inputs.dtype), bias.to(inputs.dtype))


def _tokens(tensor: torch.Tensor, tokens: slice, real: torch.Tensor | None) -> torch.Tensor:
    """The rows of `tensor` [B, T, C] that enter the moments: `tokens` of each sample, padding left out."""
    if real is None:
        return tensor[:, tokens]
    return tensor[:, tokens][real[:, tokens]]


def _reconstruct_layer(run: _Run, index: int, layer: nn.Module, tokens: slice) -> tuple[torch.Tensor, list[float]]:
    """Reconstruct the heads, then the neurons of one layer; advance both states; return errors and dampings."""
    tower = run.tower
    attention, attention_output = tower.part(layer, "attention"), tower.part(layer, "attention_output")
    kept_heads = run.head_mask[index].nonzero().flatten()
    kept_neurons = run.neuron_mask[index].nonzero().flatten()
    heads = _Stage("heads", index, attention_output, tower.part_path(index, "attention_output"), kept_heads,
                   head_columns(kept_heads, tower.head_dim), run.head_mask[index, kept_heads])
    neurons = _Stage("neurons", index, tower.part(layer, "mlp_output"), tower.part_path(index, "mlp_output"),
                     kept_neurons, kept_neurons, run.neuron_mask[index, kept_neurons])
    norm_before_attention = tower.part(layer, "norm_before_attention")
    norm_before_mlp = tower.part(layer, "norm_before_mlp")

    # Pass A: the teacher's layer, the student's kept head contexts, the head stage's moments.
    contexts, moments = [], None
    for batch, (teacher, student) in enumerate(zip(run.teacher_states, run.student_states, strict=True)):
        attention_mask, real = run.attention_masks[batch], run.token_masks[batch]
        with _recording_inputs(norm_before_mlp) as (teacher_mid,):
            run.teacher_states[batch] = _output(layer(teacher, attention_mask))
        with _recording_inputs(attention_output) as (context,):
            attention(hidden_states=norm_before_attention(student), attention_mask=attention_mask)
        contexts.append(context.value[..., heads.columns])
        update = accumulate_moments(_tokens(contexts[-1], tokens, real),
                                    _tokens(teacher_mid.value - student, tokens, real))
        moments = update if moments is None else moments + update
    head_weight, head_bias, head_errors, head_damping = _solve_stage(run, heads, moments, f"layer {index} heads")

    # Pass B: the student's x' under the new head columns, the neuron stage's moments.
    mlp_input, activation = tower.part(layer, "mlp_input"), tower.mlp_activation(layer)
    input_weight, input_bias = mlp_input.weight[kept_neurons], mlp_input.bias[kept_neurons]

    def activations(mid: torch.Tensor) -> torch.Tensor:
        return activation(functional.linear(norm_before_mlp(mid), input_weight, input_bias))

    moments, kept_activations = None, []
    for batch, (student, context) in enumerate(zip(run.student_states, contexts, strict=True)):
        run.student_states[batch] = mid = student + _apply(context, head_weight, head_bias)
        kept_activations.append(activations(mid))
        real = run.token_masks[batch]
        update = accumulate_moments(_tokens(kept_activations[-1], tokens, real),
                                    _tokens(run.teacher_states[batch] - mid, tokens, real))
        moments = update if moments is None else moments + update
    del contexts
    neuron_weight, neuron_bias, neuron_errors, neuron_damping = _solve_stage(run, neurons, moments,
                                                                             f"layer {index} neurons")

    # Pass C: the student's layer output under the new neuron columns (the activations of pass B, kept: the MLP's
    # input does not change between the passes).
    for batch, mid in enumerate(run.student_states):
        run.student_states[batch] = mid + _apply(kept_activations[batch], neuron_weight, neuron_bias)
    return torch.cat([head_errors, neuron_errors]), [head_damping, neuron_damping]


def _output(result: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """An encoder layer's hidden states, whether it returns them alone or first in a tuple."""
    return result[0] if isinstance(result, tuple) else result


def _checked_teacher(mask: torch.Tensor | None, like: torch.Tensor, name: str) -> torch.Tensor:
    """The teacher's mask on the student mask's device (ones, i.e. dense, if None)."""
    if mask is None:
        return torch.ones_like(like)
    if mask.shape != like.shape:
        raise ValueError(
            f"{name} has shape {list(mask.shape)} but the student's mask has {list(like.shape)}: "
            "pass teacher masks of the same model (or None for the dense teacher)"
        )
    return mask.detach().to(like)


@torch.no_grad()
def reconstruct(
    model: nn.Module,
    head_mask: torch.Tensor,
    neuron_mask: torch.Tensor,
    batches: Sequence[torch.Tensor | VisionInputs],
    *,
    method: Method = "weights",
    teacher_head_mask: torch.Tensor | None = None,
    teacher_neuron_mask: torch.Tensor | None = None,
    damping: float = 1e-2,
    max_abs_scale: float = 10.0,
    fit_bias: bool = False,
    last_layer_pooled_only: bool = False,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    progress: bool = False,
) -> Reconstruction:
    """Reconstruct the kept heads and neurons of `model`'s vision encoder, layer by layer (docs/design.md).

    A stage whose solve fails (not positive definite, not finite, out of bounds) is solved again with ten
    times the damping, up to 10⁶ times (from 1e-6 if it is 0; noted in `notes`); only then does it keep its
    incoming weights, with a warning. Cached on the model's device: the hidden states of teacher and student,
    2 × (N, T, D), the kept heads' contexts of the current layer, at most (N, T, D), then the kept neurons'
    activations of the current layer, at most (N, T, F), computed once for the moments and the layer's output.

    Args:
        model: a dense model of a supported family (`clip_prune.towers`); mask hooks it already carries must be all
            ones (they multiply before these masks). Its weights and train/eval mode are left as they were.
        head_mask: [L, H] the student's heads, 0 = pruned, otherwise the current scale (1 if binary).
        neuron_mask: [L, F] the student's neurons, same convention.
        batches: calibration images on the model's device, each a pixel batch (B, 3, S, S) or the tower's
            inputs (`VisionTower.input_names`, e.g. SigLIP2's pixel attention mask and spatial shapes).
        method: `weights` refits the kept units' output columns; `scales` fits one scale per kept unit.
        teacher_head_mask: [L, H] mask of the teacher (the √c "teaching assistant"); None = dense.
        teacher_neuron_mask: [L, F] likewise; None = dense.
        damping: λ, the pull towards the incoming weights relative to the mean diagonal of the Gram matrix.
        max_abs_scale: bound on |scale| (`scales`) and on the growth ‖W‖/‖W₀‖ of a stage's columns (`weights`);
            a solution beyond it is solved again with more damping.
        fit_bias: with `weights`, also refit out_proj's and fc2's bias (unpenalised).
        last_layer_pooled_only: at the last layer, reconstruct only the tokens the tower's pooling reads (CLIP's
            CLS token; all tokens for SigLIP's attention-pooling head).
        all_reduce: returns the sum of a tensor across DDP ranks (None: one process); applied to the moments
            of every stage in the same order on every rank, so that all ranks solve the same system.
        progress: show a tqdm bar over the layers.
    """
    if not len(batches):
        raise ValueError("batches is empty: pass at least one batch of calibration images")
    tower = tower_of(model)
    layers = tower.layers
    check_masks(head_mask, neuron_mask, mask_shapes(tower.config))
    device = tower.part(layers[0], "mlp_output").weight.device
    student_heads, student_neurons = head_mask.detach().to(device).float(), neuron_mask.detach().to(device).float()
    masks = VisionMasks(model, _checked_teacher(teacher_head_mask, student_heads, "teacher_head_mask"),
                        _checked_teacher(teacher_neuron_mask, student_neurons, "teacher_neuron_mask"))
    was_training = model.training
    model.eval()
    try:
        inputs = [as_inputs(batch) for batch in batches]
        states = [tower.embed(batch) for batch in inputs]
        run = _Run(method=method, tower=tower, head_mask=student_heads.clone(), neuron_mask=student_neurons.clone(),
                   teacher_states=states, student_states=list(states),
                   attention_masks=[tower.layer_attention_mask(batch) for batch in inputs],
                   token_masks=[tower.token_mask(batch) for batch in inputs], damping=damping,
                   max_abs_scale=max_abs_scale, fit_bias=fit_bias and method == "weights",
                   reduce=all_reduce if all_reduce is not None else (lambda tensor: tensor))
        errors = torch.zeros(len(ERROR_NAMES), len(layers), dtype=torch.float64)
        dampings = torch.full((len(layers), 2), float("nan"), dtype=torch.float64)
        for index in tqdm(range(len(layers)), desc=f"reconstruct ({method})", disable=not progress):
            pooled = last_layer_pooled_only and index == len(layers) - 1 and tower.pooled_tokens is not None
            tokens = tower.pooled_tokens if pooled else slice(None)
            layer_errors, layer_dampings = _reconstruct_layer(run, index, layers[index], tokens)
            errors[:, index] = layer_errors.cpu()
            dampings[index] = torch.tensor(layer_dampings, dtype=torch.float64)
    finally:
        masks.remove()
        model.train(was_training)
    if method == "weights":  # the incoming scales live in the refit columns now
        run.head_mask, run.neuron_mask = (run.head_mask != 0).float(), (run.neuron_mask != 0).float()
    return Reconstruction(
        head_mask=run.head_mask.to(head_mask.device), neuron_mask=run.neuron_mask.to(neuron_mask.device),
        refit=run.refit, errors=dict(zip(ERROR_NAMES, errors, strict=True)), damping=dampings,
        warnings=run.warnings, notes=run.notes,
    )
