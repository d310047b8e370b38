"""Least squares of layer-wise reconstruction (docs/design.md, "Mask rescaling" and "Weight refit").

Each stage of a layer explains a residual R(t) (the teacher's output minus the student's input, D wide)
by the kept units' inputs z(t) (C columns: the K·d context values of the kept heads or the K activations
of the kept neurons) through their output columns W [D, C] and the bias b: R(t) ≈ W z(t) + b. The token
sums ZᵀZ, ZᵀR, Σz, ΣR, Σ‖R‖² and the token count are all either reconstruction needs (`Moments`, float64,
summed across DDP ranks); no per-token design matrix is formed.

- Rescaling keeps the columns and fits one scale per unit, W = W₀·diag(s) (the original tool's format).
- Weight refit fits the columns themselves, ridge towards W₀: (ZᵀZ + λ·m·I) Wᵀ = ZᵀR' + λ·m·W₀ᵀ with
  m = mean diag(ZᵀZ), optionally with an unpenalised bias.

A solve that is not finite, not positive definite or out of bounds is retried with ten times the damping
(`solve_bounded`), so that every layer is reconstructed; only a layer that fails at the strongest damping
keeps its incoming weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TypeVar

import torch

DAMPING_STEPS = 7
"""Tries of a failing solve, each with ten times the damping of the last (up to 10⁶ × the configured one)."""
MIN_DAMPING = 1e-6
"""Stands in for a configured damping of 0 when retrying: the retries use 1e-5, 1e-4, ..., 1."""


Solution = TypeVar("Solution")


class SolveError(ArithmeticError):
    """One layer and stage could not be solved (not positive definite, not finite or out of bounds)."""


@dataclass
class Moments:
    """Token sums of one layer and stage: everything both reconstructions and their errors need."""

    input_gram: torch.Tensor
    """[C, C] ZᵀZ of the kept units' inputs."""
    input_sum: torch.Tensor
    """[C] Σ_t z(t)."""
    cross: torch.Tensor
    """[C, D] ZᵀR, the inputs against the residual."""
    residual_sum: torch.Tensor
    """[D] Σ_t R(t)."""
    residual_square: torch.Tensor
    """[] Σ_t ‖R(t)‖²."""
    count: torch.Tensor
    """[] tokens summed."""

    def __add__(self, other: Moments) -> Moments:
        return self.map(lambda mine, name: mine + getattr(other, name))

    def map(self, function: Callable[[torch.Tensor, str], torch.Tensor]) -> Moments:
        """A new `Moments` with `function(tensor, name)` applied to each field, in a fixed order."""
        return Moments(**{field.name: function(getattr(self, field.name), field.name) for field in fields(self)})


GRAM_SPLIT_COLUMNS = 512
"""Inputs at least this wide have their Gram matrix computed in blocks (`symmetric_gram`)."""


def symmetric_gram(inputs: torch.Tensor) -> torch.Tensor:
    """XᵀX of `inputs` [N, C]: for wide inputs the lower-left block is the transpose of the upper-right one, so three
    of the four blocks are multiplied (3/4 of the work; torch has no symmetric rank-k product)."""
    columns = inputs.shape[1]
    if columns < GRAM_SPLIT_COLUMNS:
        return inputs.T @ inputs
    left, right = inputs[:, : columns // 2], inputs[:, columns // 2:]
    corner = left.T @ right
    return torch.cat([torch.cat([left.T @ left, corner], dim=1), torch.cat([corner.T, right.T @ right], dim=1)])


def accumulate_moments(inputs: torch.Tensor, residual: torch.Tensor) -> Moments:
    """The `Moments` of one batch: `inputs` (..., C) of the kept units, `residual` (..., D).

    Products run in (at least) float32, the sums are returned in float64: the C × tokens × C Gram matmul
    dominates the cost, and float64 would double it.
    """
    dtype = torch.promote_types(inputs.dtype, torch.float32)
    inputs = inputs.reshape(residual.shape[:-1].numel(), inputs.shape[-1]).to(dtype)
    residual = residual.reshape(-1, residual.shape[-1]).to(dtype)
    if inputs.shape[0] != residual.shape[0]:
        raise ValueError(f"inputs cover {inputs.shape[0]} tokens and the residual {residual.shape[0]}")
    return Moments(
        input_gram=symmetric_gram(inputs).double(),
        input_sum=inputs.sum(dim=0, dtype=torch.float64),
        cross=(inputs.T @ residual).double(),
        residual_sum=residual.sum(dim=0, dtype=torch.float64),
        residual_square=residual.double().square().sum(),
        count=torch.tensor(float(inputs.shape[0]), dtype=torch.float64, device=inputs.device),
    )


def squared_error(moments: Moments, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Σ_t ‖R(t) − W z(t) − b‖² from the moments alone, for `weight` [D, C] and `bias` [D] (float64 scalar)."""
    weight, bias = weight.double(), bias.double()
    projected_sum = weight @ moments.input_sum
    error = (moments.residual_square
             - 2 * torch.sum(weight * moments.cross.T) - 2 * bias @ moments.residual_sum
             + torch.sum((weight @ moments.input_gram) * weight) + 2 * bias @ projected_sum
             + moments.count * bias @ bias)
    return error.clamp(min=0)  # cancellation can leave a tiny negative number when the fit is exact


def _solve_spd(matrix: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """matrix⁻¹ right for a symmetric positive definite `matrix`, or SolveError."""
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info) != 0:
        raise SolveError("the damped normal equations are not positive definite")
    solution = torch.cholesky_solve(right if right.dim() == 2 else right[:, None], factor)
    if not torch.isfinite(solution).all():
        raise SolveError("the solution is not finite")
    return solution if right.dim() == 2 else solution[:, 0]


def refit_columns(moments: Moments, weight: torch.Tensor, bias: torch.Tensor, *, damping: float,
                  fit_bias: bool = False, max_growth: float = 10.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Refit the output columns [D, C] (and optionally the bias [D]) of the kept units, in float64.

    Solves (ZᵀZ + λ·m·I) Wᵀ = Zᵀ(R − b₀) + λ·m·W₀ᵀ, m = mean diag(ZᵀZ): least squares pulled towards the
    dense columns `weight` = W₀. With `fit_bias` the bias is a further unknown with no penalty (a ones
    column in Z); otherwise it stays `bias` = b₀.

    Raises:
        SolveError: if the system is not positive definite, the result is not finite, or the columns grow
            beyond `max_growth` times the Frobenius norm of W₀.
    """
    columns = weight.shape[1]
    weight0, bias0 = weight.double(), bias.double()
    scale = damping * moments.input_gram.diagonal().mean() if columns else moments.count.new_zeros(())
    if fit_bias:
        gram = torch.zeros(columns + 1, columns + 1, dtype=torch.float64, device=weight0.device)
        gram[:columns, :columns] = moments.input_gram + scale * torch.eye(columns, dtype=torch.float64,
                                                                             device=weight0.device)
        gram[:columns, columns] = gram[columns, :columns] = moments.input_sum
        gram[columns, columns] = moments.count
        right = torch.cat([moments.cross + scale * weight0.T, moments.residual_sum[None]])
        solution = _solve_spd(gram, right)
        new_weight, new_bias = solution[:columns].T, solution[columns]
    else:
        if not columns:
            return weight0, bias0
        gram = moments.input_gram + scale * torch.eye(columns, dtype=torch.float64, device=weight0.device)
        right = moments.cross - moments.input_sum[:, None] * bias0[None] + scale * weight0.T
        new_weight, new_bias = _solve_spd(gram, right).T, bias0
    reference = float(weight0.norm())
    if columns and reference > 0 and float(new_weight.norm()) > max_growth * reference:
        raise SolveError(f"the refit columns grow to {float(new_weight.norm()) / reference:.3g} x the dense "
                         f"ones' norm > max_abs_scale {max_growth:g}")
    return new_weight, new_bias


def rescale_columns(moments: Moments, weight: torch.Tensor, bias: torch.Tensor, scales: torch.Tensor, group: int,
                    *, damping: float, max_abs_scale: float = 10.0) -> torch.Tensor:
    """Scales [K] of K kept units of `group` columns each (W = W₀·diag(s), bias fixed), in float64.

    Solves (AᵀA + λ·mean(diag AᵀA)·I) δ = Aᵀ(R − b₀ − A·s₀), s = s₀ + δ: least squares pulled towards the
    incoming `scales` s₀, with AᵀA the block sums of (ZᵀZ) ∘ (W₀ᵀW₀) (docs/design.md, "Mask rescaling").

    Raises:
        SolveError: if the system is not positive definite, or a scale is not finite or exceeds `max_abs_scale`.
    """
    units = scales.shape[0]
    if weight.shape[1] != units * group:
        raise ValueError(f"{units} units of {group} columns need {units * group} weight columns, got {weight.shape[1]}")
    weight0 = weight.double()
    gram = (moments.input_gram * (weight0.T @ weight0)).view(units, group, units, group).sum(dim=(1, 3))
    centred = moments.cross - moments.input_sum[:, None] * bias.double()[None]
    moment = torch.sum(centred * weight0.T, dim=1).view(units, group).sum(dim=1)
    current = scales.double()
    identity = torch.eye(units, dtype=torch.float64, device=gram.device)
    delta = _solve_spd(gram + damping * gram.diagonal().mean() * identity, moment - gram @ current)
    solved = current + delta
    largest = float(solved.abs().max()) if units else 0.0
    if largest > max_abs_scale:
        raise SolveError(f"a solved scale reaches |s| = {largest:.3g} > max_abs_scale {max_abs_scale:g}")
    return solved


def solve_bounded(solve: Callable[..., Solution], damping: float) -> tuple[Solution, float]:
    """`solve(damping=λ)` with λ = `damping`, retried with 10× the damping while it raises SolveError.

    Returns the solution and the damping that gave it; the last try's SolveError propagates.
    """
    current = damping
    for _ in range(DAMPING_STEPS - 1):
        try:
            return solve(damping=current), current
        except SolveError:
            current = max(current, MIN_DAMPING) * 10
    return solve(damping=current), current
