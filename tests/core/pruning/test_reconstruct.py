"""Layer-wise reconstruction (docs/design.md, "Mask rescaling" and "Weight refit"), on tiny random CLIPs."""

from __future__ import annotations

import copy
import threading
from functools import partial

import pytest
import torch
from conftest import build_tiny_model, tiny_vision_inputs
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

from clip_prune.core.pruning.least_squares import (
    SolveError,
    accumulate_moments,
    refit_columns,
    rescale_columns,
    solve_bounded,
    squared_error,
    symmetric_gram,
)
from clip_prune.core.pruning.masks import VisionMasks
from clip_prune.core.pruning.reconstruct import reconstruct
from clip_prune.core.pruning.refit import refit_applied
from clip_prune.towers import tower_of

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


def _inputs(batch: torch.Tensor | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"pixel_values": batch} if isinstance(batch, torch.Tensor) else batch


@torch.no_grad()
def _hidden_states(model: torch.nn.Module, pixel_batches: list[torch.Tensor | dict[str, torch.Tensor]],
                   head_mask: torch.Tensor | None, neuron_mask: torch.Tensor | None) -> list[tuple[torch.Tensor, ...]]:
    """The L + 1 hidden states of each batch through the model's own forward, masked by VisionMasks hooks."""
    masks = VisionMasks(model, head_mask, neuron_mask)
    try:
        return [model(**_inputs(batch), output_hidden_states=True).hidden_states for batch in pixel_batches]
    finally:
        masks.remove()


def _layer_errors(model: torch.nn.Module, pixel_batches: list[torch.Tensor | dict[str, torch.Tensor]],
                  head_mask: torch.Tensor, neuron_mask: torch.Tensor,
                  teacher: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
                  cls_only_last: bool = False, refit: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """[L] Σ‖y_teacher − y_student‖² of each layer's output over the real tokens (SigLIP2's padding left out), from
    the model's own forward under hook masks (and the refit columns written into the weights): the reference the
    reconstruction's internal student must match."""
    teacher_states = _hidden_states(model, pixel_batches, *teacher)
    with refit_applied(model, head_mask, neuron_mask, refit or {}):
        student_states = _hidden_states(model, pixel_batches, head_mask, neuron_mask)
    errors = torch.zeros(LAYERS, dtype=torch.float64)
    for batch, teacher_batch, student_batch in zip(pixel_batches, teacher_states, student_states, strict=True):
        real = tower_of(model).token_mask(_inputs(batch))
        for layer in range(LAYERS):
            tokens = slice(0, 1) if cls_only_last and layer == LAYERS - 1 else slice(None)
            difference = (teacher_batch[layer + 1] - student_batch[layer + 1])[:, tokens]
            if real is not None:
                difference = difference[real[:, tokens]]
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


def _planted_moments(generator: torch.Generator, columns: int = 6, tokens: int = 40):
    inputs = torch.randn(tokens, columns, generator=generator, dtype=torch.float64)
    weight = torch.randn(HIDDEN, columns, generator=generator, dtype=torch.float64)
    bias = torch.randn(HIDDEN, generator=generator, dtype=torch.float64)
    return inputs, weight, bias


def test_moments_match_explicit_sums_and_shards_add_up() -> None:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(6, 11, 9, generator=generator)
    residual = torch.randn(6, 11, HIDDEN, generator=generator)
    whole = accumulate_moments(inputs, residual)
    flat_inputs, flat_residual = inputs.reshape(-1, 9).double(), residual.reshape(-1, HIDDEN).double()
    torch.testing.assert_close(whole.input_gram, flat_inputs.T @ flat_inputs, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(whole.cross, flat_inputs.T @ flat_residual, rtol=1e-5, atol=1e-4)
    assert whole.count == 66 and whole.input_gram.dtype == torch.float64
    shards = accumulate_moments(inputs[:2], residual[:2]) + accumulate_moments(inputs[2:], residual[2:])
    for name in ("input_gram", "input_sum", "cross", "residual_sum", "residual_square", "count"):
        torch.testing.assert_close(getattr(shards, name), getattr(whole, name), rtol=1e-5, atol=1e-4)


def test_squared_error_from_moments_equals_the_direct_sum() -> None:
    generator = torch.Generator().manual_seed(1)
    inputs, weight, bias = _planted_moments(generator)
    residual = torch.randn(40, HIDDEN, generator=generator, dtype=torch.float64)
    direct = ((residual - inputs @ weight.T - bias) ** 2).sum()
    torch.testing.assert_close(squared_error(accumulate_moments(inputs, residual), weight, bias), direct)


@pytest.mark.parametrize("fit_bias", [False, True])
def test_refit_columns_recovers_planted_weights(fit_bias: bool) -> None:
    generator = torch.Generator().manual_seed(2)
    inputs, weight, bias = _planted_moments(generator)
    moments = accumulate_moments(inputs, inputs @ weight.T + bias)
    start_weight = torch.randn_like(weight)
    start_bias = torch.randn_like(bias) if fit_bias else bias
    solved, solved_bias = refit_columns(moments, start_weight, start_bias, damping=0.0, fit_bias=fit_bias,
                                        max_growth=1e6)
    torch.testing.assert_close(solved, weight)
    torch.testing.assert_close(solved_bias, bias)
    # Heavy damping pulls the columns back to the ones it starts from.
    damped, _ = refit_columns(moments, start_weight, start_bias, damping=1e9, fit_bias=fit_bias, max_growth=1e6)
    torch.testing.assert_close(damped, start_weight, atol=1e-5, rtol=0)


def test_rescale_columns_recovers_planted_scales_and_pulls_towards_the_incoming_ones() -> None:
    generator = torch.Generator().manual_seed(3)
    inputs, weight, bias = _planted_moments(generator, columns=3 * HEAD_DIM)
    true_scales = torch.tensor([1.5, 0.5, 2.0], dtype=torch.float64)
    residual = inputs @ (weight * true_scales.repeat_interleave(HEAD_DIM)).T + bias
    moments = accumulate_moments(inputs, residual)
    solved = rescale_columns(moments, weight, bias, torch.ones(3), HEAD_DIM, damping=0.0)
    torch.testing.assert_close(solved, true_scales)
    incoming = torch.tensor([0.5, 2.0, 1.0])
    damped = rescale_columns(moments, weight, bias, incoming, HEAD_DIM, damping=1e9, max_abs_scale=100.0)
    torch.testing.assert_close(damped, incoming.double(), atol=1e-5, rtol=0)


def test_solve_bounded_raises_the_damping_until_the_solution_is_in_bounds() -> None:
    generator = torch.Generator().manual_seed(4)
    inputs, weight, bias = _planted_moments(generator, columns=2)
    residual = inputs @ (weight * torch.tensor([30.0, 1.0], dtype=torch.float64)).T + bias
    moments = accumulate_moments(inputs, residual)
    with pytest.raises(SolveError, match="max_abs_scale"):
        rescale_columns(moments, weight, bias, torch.ones(2), 1, damping=0.0, max_abs_scale=10.0)
    scales, damping = solve_bounded(partial(rescale_columns, moments, weight, bias, torch.ones(2), 1,
                                            max_abs_scale=10.0), 1e-2)
    assert damping > 1e-2 and scales.abs().max() <= 10.0 and scales[0] > 2.0
    with pytest.raises(SolveError):  # no damping brings a scale pulled towards 1 under 0.5
        solve_bounded(partial(rescale_columns, moments, weight, bias, torch.ones(2), 1, max_abs_scale=0.5), 1e-2)


def _randomise_head_output(model: CLIPVisionModel, layer: int, source: int, target: int) -> None:
    """Head `target` of `layer` attends like head `source` but writes through its own random out_proj columns:
    no scale of `source` recovers a pruned `target`, new columns do."""
    _duplicate_head(model, layer=layer, source=source, target=target, factor=1.0)
    with torch.no_grad():
        columns = slice(target * HEAD_DIM, (target + 1) * HEAD_DIM)
        out_proj = model.encoder.layers[layer].self_attn.out_proj
        out_proj.weight[:, columns] = torch.randn(HIDDEN, HEAD_DIM, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("unit", ["head", "neuron"])
def test_weight_refit_reconstructs_a_planted_pruned_unit_exactly(model: CLIPVisionModel,
                                                                 pixel_batches: list[torch.Tensor],
                                                                 unit: str) -> None:
    head_mask, neuron_mask = _ones()
    if unit == "head":
        _randomise_head_output(model, layer=0, source=0, target=3)
        head_mask[0, 3] = 0.0
    else:
        _duplicate_neuron(model, layer=1, source=0, target=5, factor=0.5)
        with torch.no_grad():
            model.encoder.layers[1].mlp.fc2.weight[:, 5] = torch.randn(HIDDEN)
        neuron_mask[1, 5] = 0.0
    weights = reconstruct(model, head_mask, neuron_mask, pixel_batches, method="weights", damping=0.0)
    scales = reconstruct(model, head_mask, neuron_mask, pixel_batches, method="scales", damping=0.0)
    dense = _hidden_states(model, pixel_batches, None, None)
    with refit_applied(model, head_mask, neuron_mask, weights.refit):
        refit = _hidden_states(model, pixel_batches, head_mask, neuron_mask)
    for dense_batch, refit_batch in zip(dense, refit, strict=True):
        torch.testing.assert_close(refit_batch[-1], dense_batch[-1], atol=1e-4, rtol=1e-4)
    stage, layer = ("heads", 0) if unit == "head" else ("neurons", 1)
    after = weights.errors[f"{stage}_after"][layer]
    assert after < 1e-6 * weights.errors[f"{stage}_before"][layer]
    assert scales.errors[f"{stage}_after"][layer] > 1e3 * after  # scales alone cannot do it
    assert torch.equal(weights.head_mask, head_mask) and torch.equal(weights.neuron_mask, neuron_mask)


def test_a_student_whose_pruned_units_carry_nothing_keeps_the_dense_weights(
    model: CLIPVisionModel, pixel_batches: list[torch.Tensor]
) -> None:
    head_mask, neuron_mask = _random_masks()
    with torch.no_grad():
        for layer, (heads, neurons) in enumerate(zip(head_mask, neuron_mask, strict=True)):
            mlp, attention = model.encoder.layers[layer].mlp, model.encoder.layers[layer].self_attn
            mlp.fc2.weight[:, neurons == 0] = 0.0
            attention.out_proj.weight[:, (heads == 0).repeat_interleave(HEAD_DIM)] = 0.0
    result = reconstruct(model, head_mask, neuron_mask, pixel_batches, method="weights", damping=1e-6)
    for name in ("heads_before", "heads_after", "neurons_before", "neurons_after"):
        assert result.errors[name].max() < 1e-4, name  # float32 rounding of sums over ~1000 tokens
    for key, value in result.refit.items():
        layer, module, kind = key.split(".")[1], key.split(".")[2], key.split(".")[-1]
        dense = model.encoder.layers[int(layer)].mlp.fc2 if module == "mlp" else \
            model.encoder.layers[int(layer)].self_attn.out_proj
        kept = (neuron_mask[int(layer)] != 0) if module == "mlp" else \
            (head_mask[int(layer)] != 0).repeat_interleave(HEAD_DIM)
        torch.testing.assert_close(value, getattr(dense, kind)[:, kept], atol=1e-4, rtol=1e-4)


def test_recovers_a_pruned_duplicate_head_exactly_with_scales(model: CLIPVisionModel,
                                                              pixel_batches: list[torch.Tensor]) -> None:
    # u_3 = 0.5·u_0 in layer 0: pruning head 3 is undone exactly by scaling head 0 by 1.5.
    _duplicate_head(model, layer=0, source=0, target=3, factor=0.5)
    head_mask, neuron_mask = _ones()
    head_mask[0, 3] = 0.0
    result = reconstruct(model, head_mask, neuron_mask, pixel_batches, method="scales", damping=1e-10)
    torch.testing.assert_close(result.head_mask[0], torch.tensor([1.5, 1.0, 1.0, 0.0]), atol=1e-4, rtol=0)
    assert result.errors["heads_before"][0] > 1.0
    assert result.errors["heads_after"][0] < 1e-5 * result.errors["heads_before"][0]
    assert result.refit == {} and result.warnings == []


@pytest.mark.parametrize("method", ["weights", "scales"])
def test_reconstruction_never_increases_a_stages_error(model: CLIPVisionModel, pixel_batches: list[torch.Tensor],
                                                       method: str) -> None:
    for seed in range(3):
        head_mask, neuron_mask = _random_masks(seed)
        result = reconstruct(model, head_mask, neuron_mask, pixel_batches, method=method)
        errors = result.errors
        assert (errors["heads_after"] <= errors["heads_before"] * (1 + 1e-9)).all()
        assert (errors["neurons_after"] <= errors["neurons_before"] * (1 + 1e-9)).all()
        assert errors["neurons_after"].sum() < 0.99 * errors["neurons_before"].sum()
        # Pruned units stay exactly pruned.
        assert torch.equal(result.head_mask == 0, head_mask == 0)
        assert torch.equal(result.neuron_mask == 0, neuron_mask == 0)


def test_weights_reconstruct_better_than_scales(model: CLIPVisionModel, pixel_batches: list[torch.Tensor]) -> None:
    head_mask, neuron_mask = _random_masks()
    weights = reconstruct(model, head_mask, neuron_mask, pixel_batches, method="weights")
    scales = reconstruct(model, head_mask, neuron_mask, pixel_batches, method="scales")
    # Layer 0 sees the same input in both: the columns include the scales' solutions.
    assert weights.errors["heads_after"][0] < scales.errors["heads_after"][0]
    assert weights.errors["neurons_after"][-1] < scales.errors["neurons_after"][-1]


@pytest.mark.parametrize(("method", "teacher", "fit_bias"),
                         [("weights", "dense", False), ("weights", "ta", False), ("weights", "dense", True),
                          ("scales", "dense", False), ("scales", "ta", False)])
def test_errors_agree_with_the_masked_model(model: CLIPVisionModel, pixel_batches: list[torch.Tensor], method: str,
                                            teacher: str, fit_bias: bool) -> None:
    """The internal student, run layer by layer, is what CLIP under VisionMasks (plus refit columns) computes."""
    head_mask, neuron_mask = _random_masks()
    teacher_masks = (None, None) if teacher == "dense" else _random_masks(seed=7, keep=0.8)
    result = reconstruct(model, head_mask, neuron_mask, pixel_batches, method=method, fit_bias=fit_bias,
                         teacher_head_mask=teacher_masks[0], teacher_neuron_mask=teacher_masks[1])
    assert any(key.endswith("bias") for key in result.refit) == fit_bias
    expected = _layer_errors(model, pixel_batches, result.head_mask, result.neuron_mask, teacher_masks,
                             refit=result.refit)
    torch.testing.assert_close(result.errors["neurons_after"], expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["weights", "scales"])
@pytest.mark.parametrize("family", ["siglip_vision", "siglip2_vision"])
def test_errors_agree_with_the_masked_model_for_siglip(family: str, method: str) -> None:
    """SigLIP (no CLS token, no pre-layernorm) and SigLIP2 (its encoder's attention mask; padding tokens never
    enter the moments): the internal student is again what the model under VisionMasks computes."""
    model = build_tiny_model(family)
    batches = [tiny_vision_inputs(model, batch=3, seed=seed) for seed in range(3)]
    head_mask, neuron_mask = _random_masks()
    result = reconstruct(model, head_mask, neuron_mask, batches, method=method)
    expected = _layer_errors(model, batches, result.head_mask, result.neuron_mask, refit=result.refit)
    torch.testing.assert_close(result.errors["neurons_after"], expected, rtol=1e-4, atol=1e-6)
    assert (result.errors["neurons_after"] <= result.errors["neurons_before"] * (1 + 1e-6)).all()
    pooled_only = reconstruct(model, head_mask, neuron_mask, batches, method=method, last_layer_pooled_only=True)
    torch.testing.assert_close(pooled_only.errors["neurons_after"], result.errors["neurons_after"])  # pools all


def test_weights_from_scaled_incoming_masks_fold_the_scales_into_the_columns(
    model: CLIPVisionModel, pixel_batches: list[torch.Tensor]
) -> None:
    head_mask, neuron_mask = _random_masks()
    head_mask, neuron_mask = head_mask * 0.5, neuron_mask * 1.5  # e.g. masks of a `scales` run
    result = reconstruct(model, head_mask, neuron_mask, pixel_batches, method="weights", damping=1e8)
    assert set(result.head_mask.unique().tolist()) <= {0.0, 1.0}
    # Heavy damping keeps the incoming effective columns W₀·s: the scaled masks' model, now in the refit.
    expected = _layer_errors(model, pixel_batches, head_mask, neuron_mask)
    got = _layer_errors(model, pixel_batches, result.head_mask, result.neuron_mask, refit=result.refit)
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(result.errors["neurons_after"], got, rtol=1e-4, atol=1e-6)


def test_last_layer_pooled_only(model: CLIPVisionModel, pixel_batches: list[torch.Tensor]) -> None:
    head_mask, neuron_mask = _random_masks()
    all_tokens = reconstruct(model, head_mask, neuron_mask, pixel_batches)
    cls_only = reconstruct(model, head_mask, neuron_mask, pixel_batches, last_layer_pooled_only=True)
    last = f"layers.{LAYERS - 1}.mlp.fc2.weight"
    for key in all_tokens.refit:
        if key.startswith(f"layers.{LAYERS - 1}"):
            assert not torch.allclose(cls_only.refit[key], all_tokens.refit[key])
        else:
            torch.testing.assert_close(cls_only.refit[key], all_tokens.refit[key])
    assert last in cls_only.refit
    expected = _layer_errors(model, pixel_batches, cls_only.head_mask, cls_only.neuron_mask, cls_only_last=True,
                             refit=cls_only.refit)
    torch.testing.assert_close(cls_only.errors["neurons_after"], expected, rtol=1e-4, atol=1e-6)


def test_an_out_of_bounds_stage_is_solved_with_more_damping_not_skipped(
    model: CLIPVisionModel, pixel_batches: list[torch.Tensor]
) -> None:
    # u_3 = 20·u_0: recovering a pruned head 3 needs a scale of about 21 on head 0, beyond max_abs_scale.
    _duplicate_head(model, layer=0, source=0, target=3, factor=20.0)
    head_mask, neuron_mask = _random_masks()
    head_mask[0] = torch.tensor([1.0, 1.0, 1.0, 0.0])
    result = reconstruct(model, head_mask, neuron_mask, pixel_batches, method="scales", max_abs_scale=10.0)
    assert result.warnings == []
    assert len(result.notes) == 1 and "layer 0 heads" in result.notes[0] and "damping raised" in result.notes[0]
    assert result.damping[0, 0] > 1e-2 and result.damping[1, 0] == 1e-2
    assert 2.0 < result.head_mask[0].abs().max() <= 10.0  # rescaled, within bounds
    assert result.errors["heads_after"][0] < result.errors["heads_before"][0]


def test_a_stage_that_fails_at_every_damping_keeps_its_weights_with_a_warning(
    model: CLIPVisionModel, pixel_batches: list[torch.Tensor]
) -> None:
    head_mask, neuron_mask = _random_masks()
    with pytest.warns(RuntimeWarning, match="kept the incoming weights"):
        result = reconstruct(model, head_mask, neuron_mask, pixel_batches, method="scales", max_abs_scale=0.5)
    assert len(result.warnings) == 2 * LAYERS  # scales pulled towards 1 never fall under 0.5
    assert torch.equal(result.head_mask, head_mask) and torch.equal(result.neuron_mask, neuron_mask)
    assert torch.isnan(result.damping).all()


@pytest.mark.parametrize("fit_bias", [False, True])
def test_layers_without_heads_or_neurons(model: CLIPVisionModel, pixel_batches: list[torch.Tensor],
                                         fit_bias: bool) -> None:
    head_mask, neuron_mask = _random_masks()
    head_mask[1] = 0.0
    neuron_mask[2] = 0.0
    result = reconstruct(model, head_mask, neuron_mask, pixel_batches, fit_bias=fit_bias)
    assert result.warnings == []
    assert "layers.1.self_attn.out_proj.weight" not in result.refit
    assert ("layers.1.self_attn.out_proj.bias" in result.refit) == fit_bias
    expected = _layer_errors(model, pixel_batches, result.head_mask, result.neuron_mask, refit=result.refit)
    torch.testing.assert_close(result.errors["neurons_after"], expected, rtol=1e-4, atol=1e-6)


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


@pytest.mark.parametrize("method", ["weights", "scales"])
def test_all_reduce_over_two_ranks_matches_one_process(model: CLIPVisionModel, pixel_batches: list[torch.Tensor],
                                                       method: str) -> None:
    head_mask, neuron_mask = _random_masks()
    single = reconstruct(model, head_mask, neuron_mask, pixel_batches, method=method)
    ranks, results, failures = _TwoRanks(), [None, None], []

    def run(rank: int) -> None:
        try:
            shard = pixel_batches[rank * 2:(rank + 1) * 2]
            results[rank] = reconstruct(copy.deepcopy(model), head_mask, neuron_mask, shard, method=method,
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
    assert first.refit.keys() == second.refit.keys() == single.refit.keys()
    assert all(torch.equal(first.refit[key], second.refit[key]) for key in first.refit)
    assert ranks.calls[0] == ranks.calls[1] == 6 * 2 * LAYERS  # the six moment sums of each stage
    torch.testing.assert_close(first.head_mask, single.head_mask, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(first.neuron_mask, single.neuron_mask, rtol=1e-5, atol=1e-6)
    for key in single.refit:
        torch.testing.assert_close(first.refit[key], single.refit[key], rtol=1e-4, atol=1e-5)
    for name, errors in single.errors.items():
        torch.testing.assert_close(first.errors[name], errors, rtol=1e-5, atol=1e-6)


def test_clip_model_and_its_vision_model_give_the_same_refit(model: CLIPVisionModel,
                                                              pixel_batches: list[torch.Tensor]) -> None:
    text = dict(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20,
                max_position_embeddings=8)
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=_tiny_config().to_dict(), projection_dim=8))
    clip.vision_model.load_state_dict(model.state_dict())
    clip.train()
    head_mask, neuron_mask = _random_masks()
    from_clip = reconstruct(clip, head_mask, neuron_mask, pixel_batches)
    from_vision = reconstruct(model, head_mask, neuron_mask, pixel_batches)
    assert from_clip.refit.keys() == from_vision.refit.keys()
    for key, value in from_vision.refit.items():
        torch.testing.assert_close(from_clip.refit[key], value)
    assert clip.training  # the caller's mode is restored
    assert all(not module._forward_pre_hooks for module in clip.modules())  # no hooks left behind


def test_rejects_bad_inputs(model: CLIPVisionModel, pixel_batches: list[torch.Tensor]) -> None:
    head_mask, neuron_mask = _ones()
    with pytest.raises(ValueError, match="batches is empty"):
        reconstruct(model, head_mask, neuron_mask, [])
    with pytest.raises(ValueError, match="teacher_head_mask"):
        reconstruct(model, head_mask, neuron_mask, pixel_batches, teacher_head_mask=torch.ones(LAYERS, 3))
    with pytest.raises(ValueError, match="head_mask has shape"):
        reconstruct(model, torch.ones(2, HEADS), neuron_mask, pixel_batches)


@pytest.mark.parametrize("columns", [7, 512, 777])
def test_the_gram_matrix_in_blocks_is_the_full_product(columns: int) -> None:
    inputs = torch.randn(300, columns, generator=torch.Generator().manual_seed(columns), dtype=torch.float64)
    gram = symmetric_gram(inputs)
    torch.testing.assert_close(gram, inputs.T @ inputs)
    assert columns < 512 or torch.equal(gram[columns // 2:, : columns // 2], gram[: columns // 2, columns // 2:].T)
