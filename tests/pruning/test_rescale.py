"""Mask rescaling by layer-wise reconstruction (DESIGN.md, "Mask rescaling"), on tiny random CLIPs."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

from clip_prune.model.masking import VisionMasks
from clip_prune.pruning.least_squares import (
    NormalEquations,
    ScaleSolveError,
    accumulate_head_equations,
    accumulate_neuron_equations,
    solve_scales,
    weight_gram,
)
from clip_prune.pruning.rescale import rescale_masks

LAYERS, HEADS, NEURONS, HIDDEN = 3, 4, 37, 32
HEAD_DIM = HIDDEN // HEADS


def _tiny_config() -> CLIPVisionConfig:
    """Odd sizes on purpose: 30 px images, patch 3 (T = 101), width 32, 4 heads, 37 neurons."""
    return CLIPVisionConfig(image_size=30, patch_size=3, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                            num_attention_heads=HEADS, intermediate_size=NEURONS)


def _tiny_model(seed: int = 0) -> CLIPVisionModel:
    torch.manual_seed(seed)
    return CLIPVisionModel(_tiny_config()).eval()


@pytest.fixture
def model() -> CLIPVisionModel:
    return _tiny_model()


@pytest.fixture
def pixel_batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(3, 3, 30, 30, generator=generator) for _ in range(4)]


def _random_masks(seed: int = 2, keep: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    head_mask = (torch.rand(LAYERS, HEADS, generator=generator) < keep).float()
    neuron_mask = (torch.rand(LAYERS, NEURONS, generator=generator) < keep).float()
    head_mask[:, 0] = 1.0  # at least one head per layer, so every layer has a head stage
    return head_mask, neuron_mask


def _ones() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ones(LAYERS, HEADS), torch.ones(LAYERS, NEURONS)


@torch.no_grad()
def _hidden_states(model: CLIPVisionModel, pixel_batches: list[torch.Tensor], head_mask: torch.Tensor | None,
                   neuron_mask: torch.Tensor | None) -> list[tuple[torch.Tensor, ...]]:
    """The L + 1 hidden states of each batch through CLIP's own forward, masked by VisionMasks hooks."""
    masks = VisionMasks(model, head_mask, neuron_mask)
    try:
        return [model(pixels, output_hidden_states=True).hidden_states for pixels in pixel_batches]
    finally:
        masks.remove()


def _layer_errors(model: CLIPVisionModel, pixel_batches: list[torch.Tensor], head_mask: torch.Tensor,
                  neuron_mask: torch.Tensor, teacher: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
                  cls_only_last: bool = False) -> torch.Tensor:
    """[L] Σ‖y_teacher − y_student‖² of each layer's output, from the masked model (the reference)."""
    teacher_states = _hidden_states(model, pixel_batches, *teacher)
    student_states = _hidden_states(model, pixel_batches, head_mask, neuron_mask)
    errors = torch.zeros(LAYERS, dtype=torch.float64)
    for teacher_batch, student_batch in zip(teacher_states, student_states, strict=True):
        for layer in range(LAYERS):
            tokens = slice(0, 1) if cls_only_last and layer == LAYERS - 1 else slice(None)
            difference = (teacher_batch[layer + 1] - student_batch[layer + 1])[:, tokens]
            errors[layer] += (difference.double() ** 2).sum()
    return errors


def _duplicate_head(model: CLIPVisionModel, layer: int, source: int, target: int, factor: float) -> None:
    """Make head `target` of `layer` compute head `source`'s output times `factor` (u_target = factor·u_source)."""
    attention = model.encoder.layers[layer].self_attn
    rows_from, rows_to = slice(source * HEAD_DIM, (source + 1) * HEAD_DIM), slice(target * HEAD_DIM,
                                                                                  (target + 1) * HEAD_DIM)
    with torch.no_grad():
        for projection in (attention.q_proj, attention.k_proj, attention.v_proj):
            projection.weight[rows_to] = projection.weight[rows_from]
            projection.bias[rows_to] = projection.bias[rows_from]
        attention.out_proj.weight[:, rows_to] = factor * attention.out_proj.weight[:, rows_from]


def _duplicate_neuron(model: CLIPVisionModel, layer: int, source: int, target: int, factor: float) -> None:
    """Make neuron `target` of `layer` add `factor` times what neuron `source` adds."""
    mlp = model.encoder.layers[layer].mlp
    with torch.no_grad():
        mlp.fc1.weight[target] = mlp.fc1.weight[source]
        mlp.fc1.bias[target] = mlp.fc1.bias[source]
        mlp.fc2.weight[:, target] = factor * mlp.fc2.weight[:, source]


def _design_matrix(inputs: torch.Tensor, weight: torch.Tensor, group: int) -> torch.Tensor:
    """Explicit (B·T·D, K) design matrix: column k is unit k's contribution W_k z_k(t), all tokens stacked."""
    units = inputs.shape[-1] // group
    columns = []
    for unit in range(units):
        block = slice(unit * group, (unit + 1) * group)
        columns.append((inputs[..., block] @ weight[:, block].T).reshape(-1))
    return torch.stack(columns, dim=1)


def test_head_equations_match_explicit_design_matrix() -> None:
    generator = torch.Generator().manual_seed(0)
    context = torch.randn(2, 7, 3 * HEAD_DIM, generator=generator, dtype=torch.float64)
    weight = torch.randn(HIDDEN, 3 * HEAD_DIM, generator=generator, dtype=torch.float64)
    residual = torch.randn(2, 7, HIDDEN, generator=generator, dtype=torch.float64)
    design = _design_matrix(context, weight, HEAD_DIM)
    equations = accumulate_head_equations(context, weight, residual, HEAD_DIM)
    torch.testing.assert_close(equations.gram, design.T @ design)
    torch.testing.assert_close(equations.moment, design.T @ residual.reshape(-1))


def test_neuron_equations_match_explicit_design_matrix() -> None:
    generator = torch.Generator().manual_seed(0)
    activations = torch.randn(2, 7, 5, generator=generator, dtype=torch.float64)
    weight = torch.randn(HIDDEN, 5, generator=generator, dtype=torch.float64)
    residual = torch.randn(2, 7, HIDDEN, generator=generator, dtype=torch.float64)
    design = _design_matrix(activations, weight, 1)
    equations = accumulate_neuron_equations(activations, weight, residual, weight_gram(weight))
    torch.testing.assert_close(equations.gram, design.T @ design)
    torch.testing.assert_close(equations.moment, design.T @ residual.reshape(-1))


def test_equations_of_shards_add_up_to_the_whole() -> None:
    generator = torch.Generator().manual_seed(0)
    activations = torch.randn(6, 11, 9, generator=generator)
    weight = torch.randn(HIDDEN, 9, generator=generator)
    residual = torch.randn(6, 11, HIDDEN, generator=generator)
    whole = accumulate_neuron_equations(activations, weight, residual)
    shards = accumulate_neuron_equations(activations[:2], weight, residual[:2]) + accumulate_neuron_equations(
        activations[2:], weight, residual[2:]
    )
    # float32 products per shard, float64 sums: equal up to float32 rounding.
    torch.testing.assert_close(shards.gram, whole.gram, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shards.moment, whole.moment, rtol=1e-5, atol=1e-5)
    current = torch.ones(9, dtype=torch.float64)
    torch.testing.assert_close(solve_scales(shards.gram, shards.moment, current),
                               solve_scales(whole.gram, whole.moment, current), rtol=1e-5, atol=1e-6)


def test_solve_scales_is_damped_least_squares() -> None:
    generator = torch.Generator().manual_seed(0)
    design = torch.randn(50, 4, generator=generator, dtype=torch.float64)
    target = design @ torch.tensor([1.5, 0.5, 1.0, 2.0], dtype=torch.float64)
    current = torch.tensor([1.0, 1.0, 1.0, 0.5], dtype=torch.float64)
    equations = NormalEquations(design.T @ design, design.T @ (target - design @ current))
    exact = solve_scales(equations.gram, equations.moment, current, damping=0.0)
    torch.testing.assert_close(exact, torch.tensor([1.5, 0.5, 1.0, 2.0], dtype=torch.float64))
    # A heavy damping (relative to the mean diagonal) pulls the scales back to the current ones.
    damped = solve_scales(equations.gram, equations.moment, current, damping=1e8)
    torch.testing.assert_close(damped, current, atol=1e-6, rtol=0)


def test_solve_scales_reports_failures() -> None:
    gram, moment, current = torch.ones(2, 2), torch.ones(2), torch.ones(2)
    with pytest.raises(ScaleSolveError, match="singular"):
        solve_scales(gram, moment, current, damping=0.0)
    with pytest.raises(ScaleSolveError, match="max_abs_scale"):
        solve_scales(torch.eye(2), torch.tensor([0.0, 50.0]), current, damping=0.0)
    with pytest.raises(ScaleSolveError, match="not finite"):
        solve_scales(torch.eye(2), torch.tensor([0.0, float("nan")]), current)
    with pytest.raises(ValueError, match="kept units"):
        solve_scales(torch.eye(3), torch.ones(3), current)


def test_recovers_a_pruned_duplicate_head_exactly(model: CLIPVisionModel,
                                                  pixel_batches: list[torch.Tensor]) -> None:
    # u_3 = 0.5·u_0 in layer 0: pruning head 3 is undone exactly by scaling head 0 by 1.5.
    _duplicate_head(model, layer=0, source=0, target=3, factor=0.5)
    head_mask, neuron_mask = _ones()
    head_mask[0, 3] = 0.0
    result = rescale_masks(model, head_mask, neuron_mask, pixel_batches, damping=1e-10)
    torch.testing.assert_close(result.head_mask[0], torch.tensor([1.5, 1.0, 1.0, 0.0]), atol=1e-4, rtol=0)
    assert result.error_before[0] > 1.0
    assert result.error_after[0] < 1e-8 * result.error_before[0]
    dense = _hidden_states(model, pixel_batches, None, None)
    rescaled = _hidden_states(model, pixel_batches, result.head_mask, result.neuron_mask)
    for dense_batch, rescaled_batch in zip(dense, rescaled, strict=True):
        torch.testing.assert_close(rescaled_batch[-1], dense_batch[-1], atol=1e-4, rtol=1e-4)
    assert result.warnings == []


def test_recovers_a_pruned_duplicate_neuron_exactly(model: CLIPVisionModel,
                                                    pixel_batches: list[torch.Tensor]) -> None:
    _duplicate_neuron(model, layer=1, source=0, target=5, factor=0.5)
    head_mask, neuron_mask = _ones()
    neuron_mask[1, 5] = 0.0
    result = rescale_masks(model, head_mask, neuron_mask, pixel_batches, damping=1e-10)
    expected = torch.ones(NEURONS)
    expected[0], expected[5] = 1.5, 0.0
    torch.testing.assert_close(result.neuron_mask[1], expected, atol=1e-3, rtol=0)
    assert result.neuron_mask[1, 5] == 0.0
    assert result.error_after[1] < 1e-8 * result.error_before[1]
    torch.testing.assert_close(result.head_mask, torch.ones(LAYERS, HEADS), atol=1e-3, rtol=0)


def test_rescaling_never_increases_a_layers_error(model: CLIPVisionModel,
                                                  pixel_batches: list[torch.Tensor]) -> None:
    for seed in range(3):
        head_mask, neuron_mask = _random_masks(seed)
        result = rescale_masks(model, head_mask, neuron_mask, pixel_batches)
        assert (result.error_after <= result.error_before).all(), (seed, result.error_before, result.error_after)
        assert result.error_after.sum() < 0.99 * result.error_before.sum()
        # Pruned units stay exactly pruned; kept ones carry real-valued scales.
        assert torch.equal(result.head_mask == 0, head_mask == 0)
        assert torch.equal(result.neuron_mask == 0, neuron_mask == 0)
        assert not torch.equal(result.neuron_mask, neuron_mask)


@pytest.mark.parametrize("teacher", ["dense", "ta"])
def test_errors_agree_with_the_masked_model(model: CLIPVisionModel, pixel_batches: list[torch.Tensor],
                                            teacher: str) -> None:
    """The internal student, run layer by layer, is what CLIP under VisionMasks computes."""
    head_mask, neuron_mask = _random_masks()
    teacher_masks = (None, None) if teacher == "dense" else _random_masks(seed=7, keep=0.8)
    result = rescale_masks(model, head_mask, neuron_mask, pixel_batches, teacher_head_mask=teacher_masks[0],
                           teacher_neuron_mask=teacher_masks[1])
    expected = _layer_errors(model, pixel_batches, result.head_mask, result.neuron_mask, teacher_masks)
    torch.testing.assert_close(result.error_after, expected, rtol=1e-4, atol=1e-6)
    # Before rescaling, layer 0 sees the same input under the incoming masks.
    expected_before = _layer_errors(model, pixel_batches, head_mask, neuron_mask, teacher_masks)
    torch.testing.assert_close(result.error_before[0], expected_before[0], rtol=1e-4, atol=1e-6)


def test_last_layer_cls_only(model: CLIPVisionModel, pixel_batches: list[torch.Tensor]) -> None:
    head_mask, neuron_mask = _random_masks()
    all_tokens = rescale_masks(model, head_mask, neuron_mask, pixel_batches)
    cls_only = rescale_masks(model, head_mask, neuron_mask, pixel_batches, last_layer_cls_only=True)
    torch.testing.assert_close(cls_only.head_mask[:-1], all_tokens.head_mask[:-1])
    torch.testing.assert_close(cls_only.neuron_mask[:-1], all_tokens.neuron_mask[:-1])
    assert not torch.allclose(cls_only.neuron_mask[-1], all_tokens.neuron_mask[-1])
    expected = _layer_errors(model, pixel_batches, cls_only.head_mask, cls_only.neuron_mask, cls_only_last=True)
    torch.testing.assert_close(cls_only.error_after, expected, rtol=1e-4, atol=1e-6)
    assert cls_only.error_after[-1] <= cls_only.error_before[-1]


def test_a_failed_solve_keeps_the_binary_mask_and_later_layers_go_on(
    model: CLIPVisionModel, pixel_batches: list[torch.Tensor]
) -> None:
    # u_3 = 20·u_0: recovering a pruned head 3 needs a scale of about 21 on head 0, beyond max_abs_scale.
    _duplicate_head(model, layer=0, source=0, target=3, factor=20.0)
    head_mask, neuron_mask = _random_masks()
    head_mask[0] = torch.tensor([1.0, 1.0, 1.0, 0.0])
    with pytest.warns(RuntimeWarning, match="layer 0 heads"):
        result = rescale_masks(model, head_mask, neuron_mask, pixel_batches, max_abs_scale=10.0)
    assert len(result.warnings) == 1
    assert "layer 0 heads" in result.warnings[0] and "max_abs_scale" in result.warnings[0]
    assert torch.equal(result.head_mask[0], head_mask[0])
    # The neurons of layer 0 and every later layer are still rescaled.
    assert not torch.equal(result.neuron_mask[0], neuron_mask[0])
    for layer in range(1, LAYERS):
        assert not torch.equal(result.head_mask[layer], head_mask[layer])
        assert not torch.equal(result.neuron_mask[layer], neuron_mask[layer])
    expected = _layer_errors(model, pixel_batches, result.head_mask, result.neuron_mask)
    torch.testing.assert_close(result.error_after, expected, rtol=1e-4, atol=1e-6)


def test_layers_without_heads_or_neurons_are_skipped(model: CLIPVisionModel,
                                                     pixel_batches: list[torch.Tensor]) -> None:
    head_mask, neuron_mask = _random_masks()
    head_mask[1] = 0.0
    neuron_mask[2] = 0.0
    result = rescale_masks(model, head_mask, neuron_mask, pixel_batches)
    assert result.warnings == []
    assert (result.head_mask[1] == 0).all() and (result.neuron_mask[2] == 0).all()
    expected = _layer_errors(model, pixel_batches, result.head_mask, result.neuron_mask)
    torch.testing.assert_close(result.error_after, expected, rtol=1e-4, atol=1e-6)


class _TwoRanks:
    """Two threads standing in for two DDP ranks: all_reduce sums both ranks' tensors in a fixed order."""

    def __init__(self) -> None:
        self.barrier = threading.Barrier(2, timeout=120)
        self.slots: list[torch.Tensor | None] = [None, None]
        self.calls = [0, 0]

    def all_reduce(self, rank: int):
        def reduce(tensor: torch.Tensor) -> torch.Tensor:
            self.calls[rank] += 1
            self.slots[rank] = tensor.clone()
            self.barrier.wait()
            total = self.slots[0] + self.slots[1]
            self.barrier.wait()
            return total

        return reduce


def test_all_reduce_over_two_ranks_matches_one_process(model: CLIPVisionModel,
                                                       pixel_batches: list[torch.Tensor]) -> None:
    head_mask, neuron_mask = _random_masks()
    single = rescale_masks(model, head_mask, neuron_mask, pixel_batches)
    ranks, results, failures = _TwoRanks(), [None, None], []

    def run(rank: int) -> None:
        try:
            shard = pixel_batches[rank * 2:(rank + 1) * 2]
            results[rank] = rescale_masks(copy.deepcopy(model), head_mask, neuron_mask, shard,
                                          all_reduce=ranks.all_reduce(rank))
        except Exception as error:  # re-raised in the main thread
            failures.append(error)
            ranks.barrier.abort()

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]
    first, second = results
    assert torch.equal(first.head_mask, second.head_mask) and torch.equal(first.neuron_mask, second.neuron_mask)
    assert ranks.calls[0] == ranks.calls[1] == 2 * 2 * LAYERS + 1  # AᵀA and Aᵀb per stage, then the errors
    torch.testing.assert_close(first.head_mask, single.head_mask, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(first.neuron_mask, single.neuron_mask, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(first.error_after, single.error_after, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(first.error_before, single.error_before, rtol=1e-5, atol=1e-6)


def test_clip_model_and_its_vision_model_give_the_same_scales(model: CLIPVisionModel,
                                                              pixel_batches: list[torch.Tensor]) -> None:
    text = dict(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20,
                max_position_embeddings=8)
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=_tiny_config().to_dict(), projection_dim=8))
    clip.vision_model.load_state_dict(model.state_dict())
    clip.train()
    head_mask, neuron_mask = _random_masks()
    from_clip = rescale_masks(clip, head_mask, neuron_mask, pixel_batches)
    from_vision = rescale_masks(model, head_mask, neuron_mask, pixel_batches)
    torch.testing.assert_close(from_clip.head_mask, from_vision.head_mask)
    torch.testing.assert_close(from_clip.neuron_mask, from_vision.neuron_mask)
    assert clip.training  # the caller's mode is restored
    assert all(not module._forward_pre_hooks for module in clip.modules())  # no hooks left behind


def test_rejects_bad_inputs(model: CLIPVisionModel, pixel_batches: list[torch.Tensor]) -> None:
    head_mask, neuron_mask = _ones()
    with pytest.raises(ValueError, match="pixel_batches is empty"):
        rescale_masks(model, head_mask, neuron_mask, [])
    with pytest.raises(ValueError, match="teacher_head_mask"):
        rescale_masks(model, head_mask, neuron_mask, pixel_batches, teacher_head_mask=torch.ones(LAYERS, 3))
    with pytest.raises(ValueError, match="head_mask has shape"):
        rescale_masks(model, torch.ones(2, HEADS), neuron_mask, pixel_batches)
