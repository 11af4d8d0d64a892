"""Decision-to-logits estimator of Decision-based KD (DBKD; Zhou et al., ACL 2023).

A black-box teacher answers ``N`` queries per example (the input and ``N - 1``
augmented copies) with its top-1 decision only. DBKD models the logits seen under
augmentation as ``z + e`` with ``e ~ Normal(0, s^2 I)``, so that class ``i`` wins a
query with probability

    P_i(z) = Prob(z_i + e_i > z_j + e_j for all j != i)
           = integral phi(t) * prod_{j != i} Phi((z_i - z_j) / s + t) dt        (1)

(condition on ``e_i = s t``; ``phi``/``Phi`` are the standard normal density and
distribution function). The decision counts ``c`` give ``p_hat = c / N`` and the
estimated teacher logits ``z_hat`` solve ``P(z_hat) = p_hat``. Logits are defined up
to an additive constant; every estimate returned here is centred (sums to zero).

Numerics
--------
* ``P(z)`` for ``C = 2`` is the closed form ``Phi((z_i - z_j) / (sqrt(2) s))``. For
  ``C >= 3`` the 1-D integral (1) is evaluated by Gauss-Hermite quadrature in
  float64, with the product formed as a sum of ``log Phi`` terms. Tied classes are the
  hardest case as ``C`` grows (the integrand concentrates), so the node count grows with
  ``C`` (:func:`quadrature_nodes_for`). tests/test_decision_estimator.py holds the
  quadrature to scipy's adaptive quadrature of (1) (relative 1e-9), to Monte Carlo
  draws, to the closed form for ``C = 2`` and to ``1 / C`` for ``C`` tied classes up to 20.
* The root is found by damped Newton on ``log P(z) = log p_hat`` over centred
  logits, with the analytic Jacobian of (1) (same quadrature) and a backtracking
  line search on the residual norm. Working with ``log P`` makes the criterion
  relative, so classes with tiny ``p_hat`` are resolved as well as large ones, and
  ``P`` is renormalised to sum to one so that the quadrature error of the sum never
  blocks convergence (it matters only for many tied classes). The
  start ``z0_i = s / sqrt(2) * Phi^{-1}(p_hat_i)`` is exact for ``C = 2``. The
  iteration stops when ``max_i |log P_i(z) - log p_hat_i| <= tolerance`` (default
  1e-12); the tests recover random centred logits from ``P(z)`` within 1e-9, where the
  authors' fixed point ``z <- z + (p_hat - P(z))`` (<= 20 rounds, stop at
  ``sum |dz| < 1e-3``) stays visibly off (``test_solution_is_more_accurate_than_the_authors_fixed_point``).
* A count of zero has its root at infinity (``P_i -> 0`` only as ``z_i -> -inf``),
  including the case where all ``N`` decisions agree. Rows whose counts are all positive
  are solved exactly (``p_hat = c / N``); the rule for rows with a zero
  (``zero_count_rule``) is, by default, **additive (Jeffreys) smoothing** of those rows
  only: ``p_hat = (c + a) / (N + C a)`` with pseudo-count ``a = 0.5``
  (:func:`smoothed_decision_frequencies`). It keeps every estimate finite, ordered like the
  counts (equal counts give equal logits, a larger count a strictly larger logit, because
  ``P`` is a bijection from centred logits onto the open simplex that respects the order of
  the coordinates), and symmetric under permutation of the classes. ``all_rows`` smooths
  every row (kdexp's rule before: it also shrinks rows without a zero, e.g. 9/1 gives a
  margin of 1.55 instead of the exact 1.81), and ``authors`` runs the authors' capped fixed
  point ``z <- z + (c/N - P(z))`` from ``z = c/N`` (at most 20 rounds, stopping at
  ``sum |dz| < 1e-3``) on every row, which is finite because it is capped
  (:func:`authors_fixed_point`).
* The estimate depends only on the sorted count vector:
  :func:`estimate_logits_from_counts` solves each distinct sorted vector once and
  un-permutes (``N = 10``, ``C = 10`` has 92,378 count vectors but 42 distinct sorted ones).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

DEFAULT_QUADRATURE_NODES = 96
# More classes concentrate the integrand of (1) (for ties, near t = sqrt(2 log C)), so more nodes are needed.
_QUADRATURE_NODES_BY_CLASSES = ((10, DEFAULT_QUADRATURE_NODES), (20, 128), (50, 192))
_MAX_QUADRATURE_NODES = 256
DEFAULT_PSEUDO_COUNT = 0.5
ZERO_COUNT_RULES = ("zero_rows", "all_rows", "authors")
DEFAULT_TOLERANCE = 1e-12
DEFAULT_MAX_NEWTON_STEPS = 60
_MAX_LINE_SEARCH_HALVINGS = 30
_CHUNK_ELEMENTS = 1 << 22  # float64 elements per [rows, C, C, K] intermediate (32 MiB)


def quadrature_nodes_for(num_classes: int) -> int:
    """Default Gauss-Hermite node count for ``C`` classes: 96 up to ``C = 10``, then up to 256."""
    for max_classes, num_nodes in _QUADRATURE_NODES_BY_CLASSES:
        if num_classes <= max_classes:
            return num_nodes
    return _MAX_QUADRATURE_NODES


@lru_cache(maxsize=8)
def _standard_normal_quadrature(num_nodes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes ``t_k`` and weights ``w_k`` with ``sum_k w_k f(t_k) ~= E[f(T)]``, ``T ~ N(0, 1)``."""
    if num_nodes < 2:
        raise ValueError(f"num_nodes must be at least 2, got {num_nodes}")
    hermite_nodes, hermite_weights = np.polynomial.hermite.hermgauss(num_nodes)
    nodes = torch.from_numpy(math.sqrt(2.0) * hermite_nodes)
    weights = torch.from_numpy(hermite_weights / math.sqrt(math.pi))
    return nodes, weights


@contextmanager
def _single_intra_op_thread() -> Iterator[None]:
    """Run torch ops on one thread, restoring the previous setting afterwards.

    The solver's tensors are small, so intra-op threads only add synchronisation (on a loaded
    machine, many times the work itself).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _check_noise_std(noise_std: float) -> None:
    if not noise_std > 0:
        raise ValueError(f"noise_std (the paper's s) must be positive, got {noise_std}")


def _as_float64_logits(z: torch.Tensor) -> torch.Tensor:
    z = torch.as_tensor(z)
    if z.dim() == 0:
        raise ValueError("logits must have a class dimension [..., C]")
    return z.to(torch.float64)


def _output_dtype(z: torch.Tensor) -> torch.dtype:
    return z.dtype if torch.is_floating_point(z) else torch.float64


def decision_probabilities_two_classes(z: torch.Tensor, noise_std: float = 1.0) -> torch.Tensor:
    """Closed form for ``C = 2``: ``P_i = Phi((z_i - z_j) / (sqrt(2) s))``."""
    _check_noise_std(noise_std)
    z = torch.as_tensor(z)
    logits = _as_float64_logits(z)
    if logits.shape[-1] != 2:
        raise ValueError(f"the closed form needs C = 2 classes, got {logits.shape[-1]}")
    margin = (logits[..., 0] - logits[..., 1]) / (math.sqrt(2.0) * noise_std)
    probabilities = torch.stack([torch.special.ndtr(margin), torch.special.ndtr(-margin)], dim=-1)
    return probabilities.to(_output_dtype(z))


def _scaled_margins_plus_nodes(logits: torch.Tensor, noise_std: float, nodes: torch.Tensor) -> torch.Tensor:
    """``(z_i - z_j)/s + t_k`` for rows ``[B, C]``, as ``[B, C(i), C(j), K]``."""
    scaled_margins = (logits[:, :, None] - logits[:, None, :]) / noise_std
    return scaled_margins[..., None] + nodes


def _sum_over_opponents(log_cdf: torch.Tensor) -> torch.Tensor:
    """``sum_{j != i}`` of a ``[B, i, j, K]`` tensor, as ``[B, i, K]``."""
    is_self = torch.eye(log_cdf.shape[1], dtype=torch.bool)[None, :, :, None]
    return log_cdf.masked_fill(is_self, 0.0).sum(dim=2)


def _rows_per_chunk(num_classes: int, num_nodes: int) -> int:
    """Rows whose ``[rows, C, C, K]`` intermediates stay within ``_CHUNK_ELEMENTS``."""
    return max(1, _CHUNK_ELEMENTS // (num_classes * num_classes * num_nodes))


def _quadrature_probabilities_rows(logits: torch.Tensor, noise_std: float, num_nodes: int) -> torch.Tensor:
    nodes, weights = _standard_normal_quadrature(num_nodes)
    chunks = []
    for chunk in logits.split(_rows_per_chunk(logits.shape[-1], num_nodes)):
        log_cdf = torch.special.log_ndtr(_scaled_margins_plus_nodes(chunk, noise_std, nodes))
        chunks.append((torch.exp(_sum_over_opponents(log_cdf)) * weights).sum(dim=-1))
    return torch.cat(chunks) if chunks else logits.new_zeros(logits.shape)


def decision_probabilities_quadrature(
    z: torch.Tensor, noise_std: float = 1.0, num_nodes: int | None = None
) -> torch.Tensor:
    """``P(z)`` of equation (1) by Gauss-Hermite quadrature, for any ``C >= 1``.

    Args:
        z: logits ``[..., C]``; computed in float64, returned in ``z``'s float dtype.
        noise_std: the paper's ``s``.
        num_nodes: quadrature nodes; default :func:`quadrature_nodes_for` ``(C)``
            (accuracy: see the module docstring).
    """
    _check_noise_std(noise_std)
    z = torch.as_tensor(z)
    logits = _as_float64_logits(z)
    rows = logits.reshape(-1, logits.shape[-1])
    num_nodes = num_nodes or quadrature_nodes_for(rows.shape[-1])
    probabilities = _quadrature_probabilities_rows(rows, noise_std, num_nodes)
    return probabilities.reshape(logits.shape).to(_output_dtype(z))


def decision_probabilities(z: torch.Tensor, noise_std: float = 1.0, num_nodes: int | None = None) -> torch.Tensor:
    """The paper's ``P(z)``: probability that each class is the top-1 decision under noise.

    ``P_i(z) = Prob(z_i + e_i > z_j + e_j for all j != i)``, ``e ~ Normal(0, s^2 I)``.
    Closed form for ``C = 2``; Gauss-Hermite quadrature of equation (1) for ``C >= 3``
    (absolute error below 1e-14 for ``C <= 10`` with the default nodes). Rows sum to 1
    up to that error.

    Args:
        z: logits ``[..., C]``; computed in float64, returned in ``z``'s float dtype.
        noise_std: the paper's ``s`` (authors: 1).
        num_nodes: quadrature nodes for ``C >= 3``; default :func:`quadrature_nodes_for` ``(C)``.
    """
    if torch.as_tensor(z).shape[-1:] == (2,):
        return decision_probabilities_two_classes(z, noise_std)
    return decision_probabilities_quadrature(z, noise_std, num_nodes)


def _probabilities_and_jacobian_rows(
    logits: torch.Tensor, noise_std: float, num_nodes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``P(z)`` ``[B, C]`` and ``dP_i/dz_k`` ``[B, C, C]`` for float64 rows ``[B, C]``.

    For ``k != i``: ``dP_i/dz_k = -(1/s) E_t[ prod_{j != i} Phi(m_ij + t) * phi(m_ik + t) / Phi(m_ik + t) ]``
    with ``m_ij = (z_i - z_j)/s``; the diagonal follows from ``P`` being shift invariant.
    """
    nodes, weights = _standard_normal_quadrature(num_nodes)
    shifted = _scaled_margins_plus_nodes(logits, noise_std, nodes)  # [B, i, k, K]
    log_cdf = torch.special.log_ndtr(shifted)
    weighted_integrand = torch.exp(_sum_over_opponents(log_cdf)) * weights  # [B, i, K]
    probabilities = weighted_integrand.sum(dim=-1)

    log_pdf = -0.5 * shifted.square() - 0.5 * math.log(2.0 * math.pi)
    inverse_mills_ratio = torch.exp(log_pdf - log_cdf)  # phi / Phi, stable in the tails
    off_diagonal = -(weighted_integrand[:, :, None, :] * inverse_mills_ratio).sum(dim=-1) / noise_std
    off_diagonal = off_diagonal * ~torch.eye(logits.shape[-1], dtype=torch.bool)
    jacobian = off_diagonal - torch.diag_embed(off_diagonal.sum(dim=-1))
    return probabilities, jacobian


def _centre(logits: torch.Tensor) -> torch.Tensor:
    return logits - logits.mean(dim=-1, keepdim=True)


def _probit_start(p_hat: torch.Tensor, noise_std: float) -> torch.Tensor:
    """``z0_i = s / sqrt(2) * Phi^{-1}(p_hat_i)``, centred; the exact root when ``C = 2``."""
    return _centre(noise_std / math.sqrt(2.0) * torch.special.ndtri(p_hat))


def _log_probabilities_and_jacobian_rows(
    logits: torch.Tensor, noise_std: float, num_nodes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``log P~(z)`` ``[B, C]`` and its Jacobian ``d log P~_i / dz_k`` ``[B, C, C]``.

    ``P~ = P / sum_j P_j`` is the quadrature's ``P`` renormalised to sum to one, so that
    ``P~(z) = p_hat`` has an exact root even where the quadrature error of the sum
    exceeds the tolerance (many tied classes); for ``C <= 10`` the two differ by < 1e-14.
    """
    probabilities, jacobian = _probabilities_and_jacobian_rows(logits, noise_std, num_nodes)
    total = probabilities.sum(dim=-1, keepdim=True)
    log_normalised = torch.log(probabilities) - torch.log(total)
    log_jacobian = jacobian / probabilities[..., None] - (jacobian.sum(dim=-2) / total)[:, None, :]
    return log_normalised, log_jacobian


def _newton_direction(log_jacobian: torch.Tensor, log_residual: torch.Tensor) -> torch.Tensor:
    """Centred ``dz`` solving ``J_log dz = -log_residual`` (``J_log = d log P~ / dz``).

    ``J_log`` annihilates the constant vector (``P`` is shift invariant) and its range
    lies in ``{u : P~^T u = 0}`` (``P~`` sums to one), which excludes the constant
    vector; so ``J_log + 11^T / C`` is invertible, and the centred part of its solution
    is the Newton step.
    """
    num_classes = log_jacobian.shape[-1]
    return _centre(torch.linalg.solve(log_jacobian + 1.0 / num_classes, -log_residual))


def _max_abs(residual: torch.Tensor) -> torch.Tensor:
    return residual.abs().amax(dim=-1)


@dataclass(frozen=True)
class RootFindingResult:
    """Output of :func:`solve_logits_with_diagnostics`.

    Attributes:
        logits: centred ``z_hat`` ``[B, C]`` (float64).
        max_residual: ``max_i |log P~_i(z_hat) - log p_hat_i|`` per row (a relative
            error; ``P~`` is ``P`` renormalised to sum to one, see the module docstring).
        newton_steps: Newton steps taken (the largest over rows).
    """

    logits: torch.Tensor
    max_residual: torch.Tensor
    newton_steps: int


def _validate_frequencies(p_hat: torch.Tensor) -> None:
    if p_hat.shape[-1] < 1:
        raise ValueError("p_hat needs at least one class")
    if not bool(torch.all(p_hat > 0)):
        raise ValueError(
            "every entry of p_hat must be positive: a zero frequency has its root at -infinity; "
            "smooth the counts first (smoothed_decision_frequencies)"
        )
    if p_hat.shape[-1] > 1 and not bool(torch.all(p_hat < 1)):
        raise ValueError(
            "an entry of p_hat equals 1 in float64, so the other classes' frequencies are "
            "below its resolution and their logits cannot be determined"
        )
    if not torch.allclose(p_hat.sum(dim=-1), torch.ones((), dtype=p_hat.dtype), atol=1e-9, rtol=0):
        raise ValueError("each row of p_hat must sum to 1")


def _damped_newton_step(
    logits: torch.Tensor,
    residual: torch.Tensor,
    log_jacobian: torch.Tensor,
    log_p_hat: torch.Tensor,
    noise_std: float,
    tolerance: float,
    num_nodes: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Newton step on ``log P(z) = log p_hat`` per row, halving it until the residual norm decreases.

    Returns the new logits, log residual, log Jacobian and which rows accepted a step.
    """
    direction = _newton_direction(log_jacobian, residual)
    step_size = torch.ones(direction.shape[0], dtype=torch.float64)
    accepted = torch.zeros(direction.shape[0], dtype=torch.bool)
    residual_norm = residual.norm(dim=-1)
    for _ in range(_MAX_LINE_SEARCH_HALVINGS):
        candidate = logits + step_size[:, None] * direction
        candidate_log_probabilities, candidate_log_jacobian = _log_probabilities_and_jacobian_rows(
            candidate, noise_std, num_nodes
        )
        candidate_residual = candidate_log_probabilities - log_p_hat
        # A residual already within tolerance is accepted even if its norm did not
        # drop: at quadrature-noise level the norm no longer decreases reliably.
        improves = (candidate_residual.norm(dim=-1) < residual_norm) | (_max_abs(candidate_residual) <= tolerance)
        newly = improves & ~accepted
        logits = torch.where(newly[:, None], candidate, logits)
        residual = torch.where(newly[:, None], candidate_residual, residual)
        log_jacobian = torch.where(newly[:, None, None], candidate_log_jacobian, log_jacobian)
        accepted |= improves
        if bool(accepted.all()):
            break
        step_size = torch.where(accepted, step_size, step_size / 2)
    return logits, residual, log_jacobian, accepted


def _solve_rows(
    p_hat: torch.Tensor, noise_std: float, tolerance: float, max_newton_steps: int, num_nodes: int
) -> RootFindingResult:
    log_p_hat = torch.log(p_hat)
    logits = _probit_start(p_hat, noise_std)
    log_probabilities, log_jacobian = _log_probabilities_and_jacobian_rows(logits, noise_std, num_nodes)
    residual = log_probabilities - log_p_hat
    steps = 0
    while steps < max_newton_steps:
        active = _max_abs(residual) > tolerance
        if not bool(active.any()):
            break
        steps += 1
        new_logits, new_residual, new_log_jacobian, accepted = _damped_newton_step(
            logits[active], residual[active], log_jacobian[active], log_p_hat[active], noise_std, tolerance, num_nodes
        )
        logits[active], residual[active], log_jacobian[active] = new_logits, new_residual, new_log_jacobian
        if not bool(accepted.any()):
            break
    return RootFindingResult(_centre(logits), _max_abs(residual), steps)


def solve_logits_with_diagnostics(
    p_hat: torch.Tensor,
    noise_std: float = 1.0,
    tolerance: float = DEFAULT_TOLERANCE,
    max_newton_steps: int = DEFAULT_MAX_NEWTON_STEPS,
    num_nodes: int | None = None,
) -> RootFindingResult:
    """Damped Newton for ``P(z_hat) = p_hat`` on rows ``[B, C]``; see :func:`solve_logits`."""
    _check_noise_std(noise_std)
    p_hat = torch.as_tensor(p_hat, dtype=torch.float64)
    if p_hat.dim() != 2:
        raise ValueError(f"p_hat must be [B, C], got shape {tuple(p_hat.shape)}")
    _validate_frequencies(p_hat)
    p_hat = p_hat / p_hat.sum(dim=-1, keepdim=True)
    num_rows, num_classes = p_hat.shape
    num_nodes = num_nodes or quadrature_nodes_for(num_classes)
    if num_rows == 0 or num_classes == 1:
        return RootFindingResult(torch.zeros_like(p_hat), torch.zeros(num_rows, dtype=torch.float64), 0)
    with _single_intra_op_thread():
        results = [
            _solve_rows(chunk, noise_std, tolerance, max_newton_steps, num_nodes)
            for chunk in p_hat.split(_rows_per_chunk(num_classes, num_nodes))
        ]
    return RootFindingResult(
        logits=torch.cat([result.logits for result in results]),
        max_residual=torch.cat([result.max_residual for result in results]),
        newton_steps=max(result.newton_steps for result in results),
    )


class RootFindingError(RuntimeError):
    """Raised when Newton does not bring ``log P(z_hat)`` within tolerance of ``log p_hat``."""


def solve_logits(
    p_hat: torch.Tensor,
    noise_std: float = 1.0,
    tolerance: float = DEFAULT_TOLERANCE,
    max_newton_steps: int = DEFAULT_MAX_NEWTON_STEPS,
    num_nodes: int | None = None,
) -> torch.Tensor:
    """Centred logits ``z_hat`` with ``P(z_hat) = p_hat`` (the paper's root-finding step).

    Damped Newton with the analytic Jacobian of ``P``, from the probit start
    ``z0_i = s / sqrt(2) Phi^{-1}(p_hat_i)``, on ``log P(z) = log p_hat``, halving the
    step until the residual norm decreases; stops when
    ``max_i |log P_i(z_hat) - log p_hat_i| <= tolerance``. The round trip
    ``solve_logits(P(z)) = z - mean(z)`` holds to ~3e-12 for ``z ~ N(0, (2s)^2)``,
    ``C = 2..8`` (module docstring).

    Args:
        p_hat: frequencies ``[..., C]`` in the open simplex (every entry > 0; apply
            :func:`smoothed_decision_frequencies` to counts with zeros).
        noise_std: the paper's ``s``.
        tolerance: on ``max_i |log P_i - log p_hat_i|``; keep it above the quadrature's
            relative error (~1e-14).
        max_newton_steps: Newton steps before giving up.
        num_nodes: quadrature nodes; default :func:`quadrature_nodes_for` ``(C)``.

    Returns:
        float64 ``[..., C]``, each row summing to zero.

    Raises:
        RootFindingError: if some row does not converge.
    """
    p_hat = torch.as_tensor(p_hat, dtype=torch.float64)
    rows = p_hat.reshape(-1, p_hat.shape[-1])
    result = solve_logits_with_diagnostics(rows, noise_std, tolerance, max_newton_steps, num_nodes)
    unconverged = ~(result.max_residual <= tolerance)  # NaN counts as unconverged
    if bool(unconverged.any()):
        worst = int(result.max_residual.argmax())
        raise RootFindingError(
            f"{int(unconverged.sum())} row(s) did not converge within {max_newton_steps} Newton steps; "
            f"worst residual {float(result.max_residual[worst]):.3g} for p_hat={rows[worst].tolist()}"
        )
    return result.logits.reshape(p_hat.shape)


def smoothed_decision_frequencies(counts: torch.Tensor, pseudo_count: float = DEFAULT_PSEUDO_COUNT) -> torch.Tensor:
    """Zero-count rule, additive (Jeffreys) smoothing: ``p_hat = (c + a) / (N + C a)``.

    The root of ``P(z) = c / N`` is at infinity when some count is zero (always so
    when all ``N`` decisions agree). Adding the pseudo-count ``a`` (default 0.5, the
    Jeffreys prior of a multinomial) to every class keeps the estimate finite while
    preserving the order of the counts and their symmetry. ``a = 0`` gives the
    unsmoothed ``c / N`` and is only valid when every count is positive.

    Args:
        counts: decision counts ``c`` ``[..., C]`` (non-negative, each row summing to ``N > 0``).
        pseudo_count: ``a >= 0``.

    Returns:
        float64 frequencies ``[..., C]``.
    """
    if pseudo_count < 0:
        raise ValueError(f"pseudo_count must be non-negative, got {pseudo_count}")
    counts = torch.as_tensor(counts)
    if bool(torch.any(counts < 0)):
        raise ValueError("decision counts must be non-negative")
    smoothed = counts.to(torch.float64) + pseudo_count
    totals = smoothed.sum(dim=-1, keepdim=True)
    if bool(torch.any(totals <= 0)):
        raise ValueError("each row of counts needs at least one decision (N > 0)")
    if pseudo_count == 0 and bool(torch.any(counts == 0)):
        raise ValueError("a zero count has no finite logit estimate without smoothing; use pseudo_count > 0")
    return smoothed / totals


@dataclass(frozen=True)
class SortedCountTable:
    """Distinct sorted count vectors and how to map them back to the input rows.

    Attributes:
        unique_sorted_counts: ``[U, C]``, each row sorted in descending order.
        row_to_unique: ``[n]`` index into ``unique_sorted_counts`` for each input row.
        sort_permutation: ``[n, C]``; ``counts[r, sort_permutation[r, k]]`` is the
            ``k``-th largest count of row ``r``.
    """

    unique_sorted_counts: torch.Tensor
    row_to_unique: torch.Tensor
    sort_permutation: torch.Tensor


def sorted_count_table(counts: torch.Tensor) -> SortedCountTable:
    """Sort each row of ``counts`` (descending, stable) and deduplicate the sorted rows."""
    counts = torch.as_tensor(counts)
    if counts.dim() != 2:
        raise ValueError(f"counts must be [n, C], got shape {tuple(counts.shape)}")
    sorted_counts, sort_permutation = torch.sort(counts, dim=-1, descending=True, stable=True)
    unique_sorted_counts, row_to_unique = torch.unique(sorted_counts, dim=0, return_inverse=True)
    return SortedCountTable(unique_sorted_counts, row_to_unique, sort_permutation)


def authors_fixed_point(
    p_hat: torch.Tensor, noise_std: float = 1.0, rounds: int = 20, stop: float = 1e-3
) -> torch.Tensor:
    """The DBKD authors' estimate: ``z <- z + (p_hat - P(z))`` from ``z = p_hat``, at most
    `rounds` rounds, stopping when ``sum |dz| < stop``; finite for zero counts because capped."""
    z = p_hat.to(torch.float64).clone()
    running = torch.ones(z.shape[:-1], dtype=torch.bool)
    for _ in range(rounds):
        step = p_hat.to(torch.float64) - decision_probabilities(z, noise_std).to(torch.float64)
        z = torch.where(running[..., None], z + step, z)  # each row stops on its own
        running &= step.abs().sum(dim=-1) >= stop
        if not bool(running.any()):
            break
    return _centre(z)


def _frequencies_for_rule(sorted_counts: torch.Tensor, rule: str, pseudo_count: float) -> torch.Tensor:
    if rule == "all_rows":
        return smoothed_decision_frequencies(sorted_counts, pseudo_count)
    exact = sorted_counts.to(torch.float64) / sorted_counts.sum(dim=-1, keepdim=True).to(torch.float64)
    if rule == "authors":
        return exact
    has_zero = (sorted_counts == 0).any(dim=-1, keepdim=True)
    return torch.where(has_zero, smoothed_decision_frequencies(sorted_counts, pseudo_count), exact)


def estimate_logits_from_counts(
    counts: torch.Tensor,
    noise_std: float = 1.0,
    pseudo_count: float = DEFAULT_PSEUDO_COUNT,
    dtype: torch.dtype = torch.float32,
    tolerance: float = DEFAULT_TOLERANCE,
    num_nodes: int | None = None,
    zero_count_rule: str = "zero_rows",
) -> torch.Tensor:
    """DBKD's teacher-logit estimate ``z_hat`` from top-1 decision counts.

    Solves ``P(z_hat) = p_hat`` once per distinct sorted count vector
    (:func:`sorted_count_table`) and un-permutes the answer to each row's classes. Rows whose
    counts are all positive use ``p_hat = c / N`` (their exact root); `zero_count_rule` says what
    rows with a zero do (see the module docstring): ``zero_rows`` (default) smooths those rows
    only, ``all_rows`` smooths every row, ``authors`` runs the authors' capped fixed point on
    every row.

    Args:
        counts: ``[n, C]`` integer counts of the teacher's decisions over the ``N``
            queries of each example (rows may have different ``N``).
        noise_std: the paper's ``s`` (authors: 1).
        pseudo_count: additive smoothing ``a`` (default 0.5).
        dtype: dtype of the result.
        tolerance, num_nodes: passed to :func:`solve_logits`.
        zero_count_rule: ``zero_rows``, ``all_rows`` or ``authors``.

    Returns:
        ``[n, C]`` centred logit estimates.
    """
    if zero_count_rule not in ZERO_COUNT_RULES:
        raise ValueError(f"zero_count_rule must be one of {ZERO_COUNT_RULES}, got {zero_count_rule!r}")
    counts = torch.as_tensor(counts)
    if counts.dtype.is_floating_point or counts.dtype == torch.bool:
        raise TypeError(f"counts must be an integer tensor, got {counts.dtype}")
    table = sorted_count_table(counts)
    if table.unique_sorted_counts.shape[0] == 0:
        return torch.zeros(counts.shape, dtype=dtype)
    frequencies = _frequencies_for_rule(table.unique_sorted_counts, zero_count_rule, pseudo_count)
    if zero_count_rule == "authors":
        unique_logits = authors_fixed_point(frequencies, noise_std)
    else:
        unique_logits = solve_logits(frequencies, noise_std, tolerance=tolerance, num_nodes=num_nodes)
    sorted_logits = unique_logits[table.row_to_unique]
    logits = torch.empty_like(sorted_logits).scatter_(-1, table.sort_permutation, sorted_logits)
    return logits.to(dtype)


def all_count_vectors(num_queries: int, num_classes: int) -> torch.Tensor:
    """Every count vector of ``num_classes`` non-negative integers summing to ``num_queries``.

    Returns ``[binom(N + C - 1, C - 1), C]`` int64, in lexicographic order of the
    stars-and-bars positions (deterministic).
    """
    if num_queries < 0 or num_classes < 1:
        raise ValueError(f"need num_queries >= 0 and num_classes >= 1, got {num_queries}, {num_classes}")
    slots = num_queries + num_classes - 1
    rows = []
    for bars in itertools.combinations(range(slots), num_classes - 1):
        edges = (-1, *bars, slots)
        rows.append([edges[k + 1] - edges[k] - 1 for k in range(num_classes)])
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, num_classes)
