"""Mask rescaling by layer-wise reconstruction (DESIGN.md, "Mask rescaling"; Kwon et al., arXiv 2204.09656).

Layer by layer, first to last, least squares fits real-valued scales for the kept heads and
then for the kept neurons so that the masked student's layer output matches the teacher's
(the dense model, or the model under the "teaching assistant" masks). CLIP is pre-LN,
x' = x + Attn(LN1(x)) and y = x' + MLP(LN2(x')). This module runs the layers and keeps the
hidden states; `least_squares` builds the normal equations in closed form and solves them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional
from tqdm.auto import tqdm
from transformers.models.clip.modeling_clip import CLIPEncoderLayer

from clip_prune.model.masking import VisionMasks, encoder_layers, vision_tower
from clip_prune.pruning.least_squares import (
    NormalEquations,
    ScaleSolveError,
    accumulate_head_equations,
    accumulate_neuron_equations,
    solve_scales,
    weight_gram,
)


@dataclass
class RescaleResult:
    """Masks after rescaling and what rescaling did, layer by layer."""

    head_mask: torch.Tensor
    """[L, H] float32; pruned heads stay exactly 0, kept heads carry their solved scales."""
    neuron_mask: torch.Tensor
    """[L, F] float32; pruned neurons stay exactly 0, kept neurons carry their solved scales."""
    error_before: torch.Tensor
    """[L] float64 squared error Σ‖y_teacher − y_student‖² of each layer's output on the calibration
    data, student input from the rescaled earlier layers, this layer under its incoming masks."""
    error_after: torch.Tensor
    """[L] float64 the same error with this layer rescaled. With `last_layer_cls_only` the last
    entry of both sums over the CLS token only."""
    warnings: list[str] = field(default_factory=list)
    """One line per layer and stage that kept its incoming (binary) mask, with the reason."""




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
class _Run:
    """State shared by the layers of one `rescale_masks` call."""

    masks: VisionMasks
    teacher_head_mask: torch.Tensor
    teacher_neuron_mask: torch.Tensor
    head_mask: torch.Tensor
    neuron_mask: torch.Tensor
    teacher_states: list[torch.Tensor]
    student_states: list[torch.Tensor]
    damping: float
    max_abs_scale: float
    all_reduce: Callable[[torch.Tensor], torch.Tensor]
    warnings: list[str]

    def use_teacher(self) -> None:
        self.masks.set(head_mask=self.teacher_head_mask, neuron_mask=self.teacher_neuron_mask)

    def use_student(self) -> None:
        self.masks.set(head_mask=self.head_mask, neuron_mask=self.neuron_mask)

    def solve(self, equations: NormalEquations, current: torch.Tensor, where: str) -> torch.Tensor | None:
        """Scales for one layer and stage, or None (with a warning) when the binary mask must stay."""
        gram, moment = self.all_reduce(equations.gram), self.all_reduce(equations.moment)
        try:
            return solve_scales(gram, moment, current, damping=self.damping, max_abs_scale=self.max_abs_scale)
        except ScaleSolveError as error:
            message = f"{where}: kept the incoming (binary) mask because {error}"
            self.warnings.append(message)
            warnings.warn(message, RuntimeWarning, stacklevel=6)
            return None


def _zero_equations(units: int, like: torch.Tensor) -> NormalEquations:
    return NormalEquations(like.new_zeros(units, units), like.new_zeros(units))


def _squared_error(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    return torch.sum((teacher - student) ** 2, dtype=torch.float64)


def _mid_residual(layer: CLIPEncoderLayer, hidden: torch.Tensor) -> torch.Tensor:
    """x' = x + Attn(LN1(x)) (CLIP is pre-LN), under whatever head mask the hooks apply."""
    attention, _ = layer.self_attn(hidden_states=layer.layer_norm1(hidden), attention_mask=None)
    return hidden + attention


@dataclass
class _KeptMLP:
    """fc1 rows and fc2 columns of the kept neurons of one layer, sliced once per layer."""

    kept: torch.Tensor
    fc1_weight: torch.Tensor
    fc1_bias: torch.Tensor
    fc2_weight: torch.Tensor

    @classmethod
    def of(cls, layer: CLIPEncoderLayer, kept: torch.Tensor) -> _KeptMLP:
        mlp = layer.mlp
        return cls(kept, mlp.fc1.weight[kept], mlp.fc1.bias[kept], mlp.fc2.weight[:, kept])

    def activations(self, layer: CLIPEncoderLayer, mid: torch.Tensor) -> torch.Tensor:
        """(B, T, K) post-activation values of the kept neurons for the mid-layer residual `mid`."""
        hidden = functional.linear(layer.layer_norm2(mid), self.fc1_weight, self.fc1_bias)
        return layer.mlp.activation_fn(hidden)

    def output(self, layer: CLIPEncoderLayer, mid: torch.Tensor, scales: torch.Tensor,
               activations: torch.Tensor | None = None) -> torch.Tensor:
        """y = x' + fc2(scales ∘ a): the layer output when only the kept neurons remain."""
        if not len(self.kept):
            return mid + layer.mlp.fc2.bias  # an MLP without neurons outputs fc2's bias
        if activations is None:
            activations = self.activations(layer, mid)
        scaled = activations * scales.to(activations.dtype)
        return mid + functional.linear(scaled, self.fc2_weight, layer.mlp.fc2.bias)


@dataclass
class _KeptHeads:
    """Kept heads of one layer and their out_proj columns, sliced once per layer."""

    kept: torch.Tensor
    columns: torch.Tensor
    out_proj_weight: torch.Tensor
    head_dim: int

    @classmethod
    def of(cls, layer: CLIPEncoderLayer, kept: torch.Tensor) -> _KeptHeads:
        head_dim = layer.self_attn.head_dim
        columns = (kept[:, None] * head_dim + torch.arange(head_dim, device=kept.device)).reshape(-1)
        return cls(kept, columns, layer.self_attn.out_proj.weight[:, columns], head_dim)

    def shift(self, context: torch.Tensor, change: torch.Tensor) -> torch.Tensor:
        """(B, T, D) change of the attention output when the kept heads' scales change by `change` [K]."""
        scale = change.to(context.dtype).repeat_interleave(self.head_dim)
        return functional.linear(context * scale, self.out_proj_weight)


def _head_pass(run: _Run, index: int, layer: CLIPEncoderLayer, heads: _KeptHeads, mlp: _KeptMLP,
               tokens: slice) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Pass A: teacher layer, student layer under its incoming masks, head scales.

    Leaves the teacher's layer outputs and the student's mid-layer residuals x' in the run and returns
    the error before rescaling and the kept heads' outputs before out_proj, (B, T, K·d) per batch.
    """
    gram_of_weight = weight_gram(heads.out_proj_weight)
    equations = _zero_equations(len(heads.kept), gram_of_weight)
    error = gram_of_weight.new_zeros(())
    contexts = []
    for batch, (teacher, student) in enumerate(zip(run.teacher_states, run.student_states, strict=True)):
        run.use_teacher()
        with _recording_inputs(layer.layer_norm2) as (teacher_mid,):
            run.teacher_states[batch] = teacher_output = layer(teacher, None)
        run.use_student()
        with _recording_inputs(layer.self_attn.out_proj) as (context,):
            run.student_states[batch] = student_mid = _mid_residual(layer, student)
        student_output = mlp.output(layer, student_mid, run.neuron_mask[index, mlp.kept])
        error += _squared_error(teacher_output[:, tokens], student_output[:, tokens])
        if len(heads.kept):
            contexts.append(context.value[..., heads.columns])
            residual = (teacher_mid.value - student_mid)[:, tokens]
            equations += accumulate_head_equations(contexts[-1][:, tokens], heads.out_proj_weight, residual,
                                                   heads.head_dim, gram_of_weight)
    if len(heads.kept):
        scales = run.solve(equations, run.head_mask[index, heads.kept], f"layer {index} heads")
        if scales is not None:
            run.head_mask[index, heads.kept] = scales.to(run.head_mask.dtype)
    return error, contexts


def _neuron_pass(run: _Run, index: int, layer: CLIPEncoderLayer, mlp: _KeptMLP, tokens: slice,
                 mid_shifts: Iterator[torch.Tensor] | None) -> None:
    """Pass B: the student's x' moved by the new head scales (`mid_shifts`, one per batch), neuron scales."""
    units = len(mlp.kept)
    gram_of_weight = weight_gram(mlp.fc2_weight)
    equations = _zero_equations(units, gram_of_weight)
    for batch, mid in enumerate(run.student_states):
        if mid_shifts is not None:
            run.student_states[batch] = mid = mid + next(mid_shifts)
        if units:
            activations = mlp.activations(layer, mid)
            current = mlp.output(layer, mid, run.neuron_mask[index, mlp.kept], activations)
            residual = (run.teacher_states[batch] - current)[:, tokens]
            equations += accumulate_neuron_equations(activations[:, tokens], mlp.fc2_weight, residual,
                                                     gram_of_weight)
    if units:
        scales = run.solve(equations, run.neuron_mask[index, mlp.kept], f"layer {index} neurons")
        if scales is not None:
            run.neuron_mask[index, mlp.kept] = scales.to(run.neuron_mask.dtype)


def _output_pass(run: _Run, index: int, layer: CLIPEncoderLayer, mlp: _KeptMLP,
                 tokens: slice) -> torch.Tensor:
    """Pass C: the student's layer output under the new scales (kept); returns the error after."""
    error = torch.zeros((), dtype=torch.float64, device=run.head_mask.device)
    for batch, mid in enumerate(run.student_states):
        run.student_states[batch] = output = mlp.output(layer, mid, run.neuron_mask[index, mlp.kept])
        error += _squared_error(run.teacher_states[batch][:, tokens], output[:, tokens])
    return error


def _rescale_layer(run: _Run, index: int, layer: CLIPEncoderLayer,
                   tokens: slice) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale the heads, then the neurons of one layer; advance both states; return the errors."""
    heads = _KeptHeads.of(layer, run.head_mask[index].nonzero().squeeze(1))
    mlp = _KeptMLP.of(layer, run.neuron_mask[index].nonzero().squeeze(1))
    incoming = run.head_mask[index, heads.kept].clone()
    error_before, contexts = _head_pass(run, index, layer, heads, mlp, tokens)
    change = run.head_mask[index, heads.kept] - incoming
    # x'_new = x'_old + out_proj_kept(ctx ∘ Δs): the contexts of pass A spare a second attention pass.
    shifts = (heads.shift(context, change) for context in contexts) if bool(change.any()) else None
    _neuron_pass(run, index, layer, mlp, tokens, shifts)
    return error_before, _output_pass(run, index, layer, mlp, tokens)


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
def rescale_masks(
    model: nn.Module,
    head_mask: torch.Tensor,
    neuron_mask: torch.Tensor,
    pixel_batches: Sequence[torch.Tensor],
    *,
    teacher_head_mask: torch.Tensor | None = None,
    teacher_neuron_mask: torch.Tensor | None = None,
    damping: float = 1e-2,
    max_abs_scale: float = 10.0,
    last_layer_cls_only: bool = False,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    progress: bool = False,
) -> RescaleResult:
    """Rescale the kept heads and neurons of `model`'s vision tower, layer by layer (DESIGN.md).

    Per layer, first the heads, then (with the new head scales) the neurons are fitted by damped
    least squares to the teacher's mid-layer residual and layer output; the student's inputs come
    from the already rescaled earlier layers. A layer and stage whose solve fails keeps its
    incoming mask, with a warning, and the later layers go on. Only the current layer's states are
    cached on the model's device: the hidden states of teacher and student, 2 × (N, T, D), and the
    kept heads' outputs of the student, at most (N, T, D), which spare a second attention pass.

    Args:
        model: a CLIPModel or CLIPVisionModel; mask hooks it already carries must be all ones (they
            multiply before these masks). Its train/eval mode is restored.
        head_mask: [L, H] the student's heads, 0 = pruned, otherwise the current scale (1 if binary).
        neuron_mask: [L, F] the student's neurons, same convention.
        pixel_batches: calibration images, each (B, 3, image size, image size) on the model's device.
        teacher_head_mask: [L, H] mask of the teacher (the √c "teaching assistant"); None = dense.
        teacher_neuron_mask: [L, F] likewise; None = dense.
        damping: λ, the pull towards the incoming scales relative to the mean diagonal of AᵀA.
        max_abs_scale: a solved |scale| above this keeps the layer's incoming mask for that stage.
        last_layer_cls_only: at the last layer, reconstruct the CLS token (t = 0) only.
        all_reduce: returns the sum of a tensor across DDP ranks (None: one process); applied to the
            normal equations (AᵀA, Aᵀb) of every stage and to the reported errors, in the same order
            on every rank, so that all ranks solve the same scales.
        progress: show a tqdm bar over the layers.

    Returns:
        The rescaled masks (float32, on `head_mask`'s device), the warnings and the per-layer errors.
    """
    if not len(pixel_batches):
        raise ValueError("pixel_batches is empty: pass at least one batch of calibration images")
    layers = encoder_layers(model)
    tower = vision_tower(model)
    masks = VisionMasks(model, head_mask, neuron_mask)  # checks the shapes of the student's masks
    reduce = all_reduce if all_reduce is not None else (lambda tensor: tensor)
    was_training = model.training
    model.eval()
    try:
        states = [tower.pre_layrnorm(tower.embeddings(pixels)) for pixels in pixel_batches]
        run = _Run(
            masks=masks,
            teacher_head_mask=_checked_teacher(teacher_head_mask, masks.head_mask, "teacher_head_mask"),
            teacher_neuron_mask=_checked_teacher(
                teacher_neuron_mask, masks.neuron_mask, "teacher_neuron_mask"
            ),
            head_mask=masks.head_mask.clone(), neuron_mask=masks.neuron_mask.clone(),
            teacher_states=states, student_states=list(states), damping=damping,
            max_abs_scale=max_abs_scale, all_reduce=reduce, warnings=[],
        )
        errors = torch.zeros(2, len(layers), dtype=torch.float64, device=masks.head_mask.device)
        for index in tqdm(range(len(layers)), desc="rescale", disable=not progress):
            cls_only = last_layer_cls_only and index == len(layers) - 1
            tokens = slice(0, 1) if cls_only else slice(None)
            errors[:, index] = torch.stack(_rescale_layer(run, index, layers[index], tokens))
    finally:
        masks.remove()
        model.train(was_training)
    errors = reduce(errors)
    return RescaleResult(
        head_mask=run.head_mask.to(head_mask.device), neuron_mask=run.neuron_mask.to(neuron_mask.device),
        error_before=errors[0].cpu(), error_after=errors[1].cpu(), warnings=run.warnings,
    )
