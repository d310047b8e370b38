"""Least squares for rescaling (DESIGN.md, "Mask rescaling"): normal equations built in closed form, and
the damped solve for the scales of one layer and stage.

Each kept unit adds a linear term to the residual stream: u_h(t) = out_proj_h(ctx_h(t)) for a
head, a_n(t)·fc2[:, n] for a neuron. AᵀA = block sums of (WᵀW) ∘ Σ_t z(t)z(t)ᵀ and
Aᵀr = Σ_t z(t) ∘ (Wᵀr(t)), with z the unit inputs and W the matching out_proj or fc2 columns:
no per-token design matrix is formed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class ScaleSolveError(ArithmeticError):
    """The scales of one layer and stage could not be solved (singular, not finite or too large)."""


@dataclass
class NormalEquations:
    """Damping-free normal equations of one layer and stage, summed over tokens and batches."""

    gram: torch.Tensor
    """[K, K] float64 AᵀA over the K kept units."""
    moment: torch.Tensor
    """[K] float64 Aᵀ(b − A·s0): correlation of each unit's contribution with the residual that
    the current scales s0 leave (DESIGN.md's Aᵀb − AᵀA·1, computed without cancellation)."""

    def __add__(self, other: NormalEquations) -> NormalEquations:
        return NormalEquations(self.gram + other.gram, self.moment + other.moment)


def weight_gram(weight: torch.Tensor) -> torch.Tensor:
    """WᵀW, returned in float64, for the (D, K·g) output columns `weight` of K units of width g."""
    weight = weight.to(torch.promote_types(weight.dtype, torch.float32))
    return (weight.T @ weight).double()


def accumulate_head_equations(
    context: torch.Tensor,
    out_proj_weight: torch.Tensor,
    residual: torch.Tensor,
    head_dim: int,
    out_proj_gram: torch.Tensor | None = None,
) -> NormalEquations:
    """Normal equations of the scales of K kept heads, from one batch.

    Args:
        context: (B, T, K·d) the kept heads' outputs before out_proj, unscaled.
        out_proj_weight: (D, K·d) the out_proj columns of the kept heads.
        residual: (B, T, D) the teacher's mid-layer residual x' minus the student's under the current scales.
        head_dim: d, the width of one head.
        out_proj_gram: (K·d, K·d) `weight_gram(out_proj_weight)`, to reuse across batches.
    """
    return _accumulate(context, out_proj_weight, residual, head_dim, out_proj_gram)


def accumulate_neuron_equations(
    activations: torch.Tensor,
    fc2_weight: torch.Tensor,
    residual: torch.Tensor,
    fc2_gram: torch.Tensor | None = None,
) -> NormalEquations:
    """Normal equations of the scales of K kept MLP neurons, from one batch.

    Args:
        activations: (B, T, K) the kept neurons' post-activation values, unscaled.
        fc2_weight: (D, K) the fc2 columns of the kept neurons.
        residual: (B, T, D) the teacher's layer output y minus the student's under the current scales.
        fc2_gram: (K, K) `weight_gram(fc2_weight)`, to reuse across batches.
    """
    return _accumulate(activations, fc2_weight, residual, 1, fc2_gram)


def _accumulate(inputs: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor, group: int,
                gram_of_weight: torch.Tensor | None) -> NormalEquations:
    """Normal equations of units of `group` input columns: block sums of (WᵀW) ∘ (ZᵀZ) and of Z ∘ (RW)."""
    width = inputs.shape[-1]
    if width % group or weight.shape[-1] != width:
        raise ValueError(
            f"inputs have {width} columns and the weight {weight.shape[-1]}: both must be the K·{group} "
            "columns of the kept units"
        )
    units = width // group
    # Per-batch products in (at least) float32, sums across batches in float64: the (K·g × tokens) ·
    # (tokens × K·g) Gram matmul dominates the cost of rescaling, and float64 would double it on a GPU or CPU.
    dtype = torch.promote_types(inputs.dtype, torch.float32)
    inputs = inputs.reshape(-1, width).to(dtype)
    residual = residual.reshape(-1, residual.shape[-1]).to(dtype)
    if gram_of_weight is None:
        gram_of_weight = weight_gram(weight)
    input_gram = (inputs.T @ inputs).double()
    gram = (input_gram * gram_of_weight).view(units, group, units, group).sum(dim=(1, 3))
    projected = residual @ weight.to(dtype)
    moment = torch.sum(inputs * projected, dim=0, dtype=torch.float64).view(units, group).sum(dim=1)
    return NormalEquations(gram, moment)


def solve_scales(gram: torch.Tensor, moment: torch.Tensor, current: torch.Tensor, *,
                 damping: float = 1e-2, max_abs_scale: float = 10.0) -> torch.Tensor:
    """Solve (AᵀA + λ·mean(diag AᵀA)·I) δ = Aᵀ(b − A·s0) and return s = s0 + δ, in float64.

    Args:
        gram: [K, K] AᵀA.
        moment: [K] Aᵀ(b − A·s0).
        current: [K] s0, the current scales of the kept units (ones for a binary mask).
        damping: λ, the pull towards s0 relative to the mean diagonal of AᵀA (so independent of
            the number of tokens).
        max_abs_scale: largest |s| accepted.

    Raises:
        ScaleSolveError: if the system is singular, or a scale is not finite or exceeds `max_abs_scale`.
    """
    units = current.shape[0]
    if gram.shape != (units, units) or moment.shape != (units,):
        raise ValueError(
            f"expected gram [{units}, {units}] and moment [{units}] for {units} kept units, got "
            f"{list(gram.shape)} and {list(moment.shape)}"
        )
    gram, moment = gram.double(), moment.double()
    identity = torch.eye(units, dtype=gram.dtype, device=gram.device)
    regularised = gram + damping * gram.diagonal().mean() * identity
    try:
        delta = torch.linalg.solve(regularised, moment)
    except torch.linalg.LinAlgError as error:
        raise ScaleSolveError(f"singular normal equations ({error})") from error
    scales = current.to(delta) + delta
    if not torch.isfinite(scales).all():
        raise ScaleSolveError("the solved scales are not finite")
    largest = float(scales.abs().max()) if units else 0.0
    if largest > max_abs_scale:
        raise ScaleSolveError(f"a solved scale reaches |s| = {largest:.3g} > max_abs_scale {max_abs_scale:g}")
    return scales
