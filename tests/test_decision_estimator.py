"""DBKD's decision model P(z) and the decision-to-logits estimator (kdexp.decision.estimator)."""

from __future__ import annotations

import math
from itertools import permutations

import numpy as np
import pytest
import torch
from scipy import integrate, special, stats

from kdexp.decision import estimator
from kdexp.decision.estimator import (
    all_count_vectors,
    decision_probabilities,
    decision_probabilities_quadrature,
    decision_probabilities_two_classes,
    estimate_logits_from_counts,
    smoothed_decision_frequencies,
    solve_logits,
    solve_logits_with_diagnostics,
    sorted_count_table,
)

MONTE_CARLO_SAMPLES = 200_000
ROUND_TRIP_TOLERANCE = 1e-9  # measured error ~3e-12; Newton stops at a 1e-12 relative residual


def centred(z: torch.Tensor) -> torch.Tensor:
    return z - z.mean(dim=-1, keepdim=True)


def monte_carlo_decision_frequencies(z: np.ndarray, noise_std: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noisy = z + noise_std * rng.standard_normal((MONTE_CARLO_SAMPLES, z.shape[0]))
    return np.bincount(noisy.argmax(axis=1), minlength=z.shape[0]) / MONTE_CARLO_SAMPLES


def reference_win_probability(z: np.ndarray, i: int, noise_std: float) -> float:
    """Equation (1) by adaptive quadrature (scipy), as an independent reference."""
    margins = np.delete(z[i] - z, i) / noise_std

    def integrand(t: float) -> float:
        return math.exp(-0.5 * t * t) / math.sqrt(2 * math.pi) * float(np.prod(special.ndtr(margins + t)))

    value, _ = integrate.quad(integrand, -np.inf, np.inf, epsabs=1e-14, epsrel=1e-12, limit=200)
    return value


@pytest.mark.parametrize("num_classes", [2, 3, 4, 5])
def test_probabilities_match_monte_carlo(num_classes):
    rng = np.random.default_rng(100 + num_classes)
    for trial, noise_std in enumerate([1.0, 0.7, 2.0]):
        z = rng.normal(0.0, 1.0, num_classes)
        probabilities = decision_probabilities(torch.from_numpy(z), noise_std).numpy()
        frequencies = monte_carlo_decision_frequencies(z, noise_std, seed=1000 * num_classes + trial)
        # 5 binomial standard errors: a false alarm over all entries has probability < 1e-5.
        standard_error = np.sqrt(probabilities * (1 - probabilities) / MONTE_CARLO_SAMPLES)
        assert np.all(np.abs(frequencies - probabilities) <= 5 * standard_error + 1e-12), (z, noise_std)


@pytest.mark.parametrize("noise_std", [0.3, 1.0, 2.5])
def test_quadrature_matches_closed_form_for_two_classes(noise_std):
    z = torch.tensor([[0.0, 0.0], [1.0, -0.5], [-3.0, 2.0], [6.0, -1.0], [0.2, 0.1]], dtype=torch.float64)
    closed_form = decision_probabilities_two_classes(z, noise_std)
    expected = stats.norm.cdf((z[:, 0] - z[:, 1]).numpy() / (math.sqrt(2) * noise_std))
    assert np.allclose(closed_form[:, 0].numpy(), expected, rtol=0, atol=1e-15)
    assert torch.allclose(decision_probabilities_quadrature(z, noise_std), closed_form, rtol=0, atol=1e-14)
    assert torch.equal(decision_probabilities(z, noise_std), closed_form)


def test_quadrature_matches_adaptive_reference():
    rng = np.random.default_rng(7)
    for num_classes in (3, 4, 6):
        for noise_std in (1.0, 0.5):
            z = rng.normal(0.0, 2.0, num_classes)
            probabilities = decision_probabilities(torch.from_numpy(z), noise_std).numpy()
            reference = [reference_win_probability(z, i, noise_std) for i in range(num_classes)]
            assert np.allclose(probabilities, reference, rtol=1e-9, atol=1e-13)


def test_tied_classes_are_equally_likely():
    for num_classes in (1, 3, 7, 10, 20):
        probabilities = decision_probabilities(torch.zeros(num_classes, dtype=torch.float64))
        assert torch.allclose(probabilities, torch.full_like(probabilities, 1 / num_classes), rtol=1e-11, atol=0)


def test_rows_sum_to_one_and_batch_shapes_are_kept():
    z = torch.randn(4, 5, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2
    probabilities = decision_probabilities(z)
    assert probabilities.shape == z.shape
    assert torch.allclose(probabilities.sum(dim=-1), torch.ones(4, 5, dtype=torch.float64), rtol=0, atol=1e-13)
    assert decision_probabilities(z.float()).dtype == torch.float32


def test_probabilities_depend_on_logit_differences_and_scale_with_noise():
    z = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64)
    assert torch.allclose(decision_probabilities(z + 3.0), decision_probabilities(z), rtol=0, atol=1e-14)
    assert torch.allclose(decision_probabilities(2 * z, 2.0), decision_probabilities(z, 1.0), rtol=0, atol=1e-14)


@pytest.mark.parametrize("num_classes", [2, 3, 4, 5])
def test_solving_recovers_logits_up_to_a_constant(num_classes):
    generator = torch.Generator().manual_seed(num_classes)
    for noise_std in (1.0, 0.5):
        z = 2.0 * noise_std * torch.randn(40, num_classes, generator=generator, dtype=torch.float64)
        result = solve_logits_with_diagnostics(decision_probabilities_quadrature(z, noise_std), noise_std)
        assert result.newton_steps <= 10
        assert torch.allclose(result.logits, centred(z), rtol=0, atol=ROUND_TRIP_TOLERANCE)
        assert torch.allclose(result.logits.sum(dim=-1), torch.zeros(40, dtype=torch.float64), atol=1e-12)


def test_solve_logits_keeps_leading_dimensions():
    z = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    z_hat = solve_logits(decision_probabilities(z))
    assert z_hat.shape == z.shape
    assert torch.allclose(z_hat, centred(z), rtol=0, atol=ROUND_TRIP_TOLERANCE)


def test_solve_logits_rejects_zero_frequencies_and_rows_not_summing_to_one():
    with pytest.raises(ValueError, match="positive"):
        solve_logits(torch.tensor([[1.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="sum to 1"):
        solve_logits(torch.tensor([[0.5, 0.3, 0.3]]))
    with pytest.raises(ValueError, match="resolution"):
        solve_logits(torch.tensor([[1.0, 1e-30]], dtype=torch.float64))


def test_solution_is_more_accurate_than_the_authors_fixed_point():
    p_hat = smoothed_decision_frequencies(torch.tensor([[8, 1, 1, 0]]))
    z = p_hat.clone()
    for _ in range(20):
        step = p_hat - decision_probabilities(z)
        z = z + step
        if step.abs().sum() < 1e-3:
            break
    authors_error = (decision_probabilities(z) - p_hat).abs().max()
    newton_error = (decision_probabilities(solve_logits(p_hat)) - p_hat).abs().max()
    assert newton_error < 1e-12 < authors_error


def test_smoothing_rule():
    counts = torch.tensor([[10, 0, 0], [4, 3, 3]])
    frequencies = smoothed_decision_frequencies(counts, pseudo_count=0.5)
    assert frequencies.dtype == torch.float64
    assert torch.allclose(frequencies, (counts.double() + 0.5) / 11.5)
    assert torch.allclose(smoothed_decision_frequencies(counts[1:], 0.0), counts[1:].double() / 10.0)
    with pytest.raises(ValueError, match="pseudo_count"):
        smoothed_decision_frequencies(counts, 0.0)
    with pytest.raises(ValueError, match="non-negative"):
        smoothed_decision_frequencies(counts, -1.0)


def test_all_count_vectors():
    for num_queries, num_classes in [(10, 1), (10, 2), (10, 3), (10, 4), (5, 6), (0, 3)]:
        vectors = all_count_vectors(num_queries, num_classes)
        assert vectors.shape == (math.comb(num_queries + num_classes - 1, num_classes - 1), num_classes)
        assert vectors.dtype == torch.int64
        assert bool((vectors >= 0).all()) and bool((vectors.sum(dim=1) == num_queries).all())
        assert len({tuple(row) for row in vectors.tolist()}) == vectors.shape[0]


@pytest.mark.parametrize("num_classes", [2, 3, 4])
def test_estimates_for_every_count_vector_are_finite_ordered_and_fit(num_classes):
    counts = all_count_vectors(10, num_classes)
    logits = estimate_logits_from_counts(counts, dtype=torch.float64)
    assert bool(torch.isfinite(logits).all())
    assert torch.allclose(logits.sum(dim=1), torch.zeros(len(counts), dtype=torch.float64), atol=1e-12)
    count_difference = counts[:, :, None] - counts[:, None, :]
    logit_difference = logits[:, :, None] - logits[:, None, :]
    assert bool((logit_difference[count_difference == 0].abs() < 1e-9).all())
    assert bool((logit_difference[count_difference > 0] > 1e-3).all())
    fitted = decision_probabilities(logits)
    assert torch.allclose(fitted, rule_frequencies(counts), rtol=1e-10, atol=0)


@pytest.mark.parametrize("num_classes", [2, 3, 4])
def test_estimates_are_symmetric_under_permuting_classes(num_classes):
    counts = all_count_vectors(10, num_classes)
    logits = estimate_logits_from_counts(counts, dtype=torch.float64)
    all_permutations = [list(permutation) for permutation in permutations(range(num_classes))]
    permuted_counts = torch.cat([counts[:, permutation] for permutation in all_permutations])
    expected = torch.cat([logits[:, permutation] for permutation in all_permutations])
    assert torch.allclose(estimate_logits_from_counts(permuted_counts, dtype=torch.float64), expected, atol=1e-9)


def test_all_agree_counts_give_a_finite_confident_estimate():
    logits = estimate_logits_from_counts(torch.tensor([[0, 10, 0], [10, 0, 0]]), dtype=torch.float64)
    assert torch.allclose(logits[0], logits[1][[1, 0, 2]], atol=1e-12)
    top, others = logits[1, 0], logits[1, 1:]
    assert bool(torch.isfinite(logits).all()) and top > 0 and torch.allclose(others, -top / 2)
    stronger = estimate_logits_from_counts(torch.tensor([[10, 0, 0]]), pseudo_count=0.1, dtype=torch.float64)
    assert stronger[0, 0] > top


@pytest.mark.parametrize("num_classes", [2, 3, 4])
def test_one_solve_per_distinct_sorted_count_vector(num_classes, monkeypatch):
    solved_rows = []
    original = estimator.solve_logits

    def counting_solve_logits(p_hat, *args, **kwargs):
        solved_rows.append(p_hat.shape[0])
        return original(p_hat, *args, **kwargs)

    monkeypatch.setattr(estimator, "solve_logits", counting_solve_logits)
    counts = all_count_vectors(10, num_classes)
    estimate_logits_from_counts(counts)
    distinct_sorted = {tuple(sorted(row, reverse=True)) for row in counts.tolist()}
    assert solved_rows == [len(distinct_sorted)]
    assert len(distinct_sorted) == {2: 6, 3: 14, 4: 23}[num_classes]  # partitions of 10 into <= C parts

    table = sorted_count_table(counts)
    assert {tuple(row) for row in table.unique_sorted_counts.tolist()} == distinct_sorted
    assert torch.equal(table.unique_sorted_counts[table.row_to_unique], counts.gather(1, table.sort_permutation))


def rule_frequencies(counts: torch.Tensor) -> torch.Tensor:
    """The default rule by hand: c / N for rows without a zero, (c + ½)/(N + C/2) for rows with one."""
    exact = counts.double() / counts.sum(dim=1, keepdim=True).double()
    return torch.where((counts == 0).any(dim=1, keepdim=True), smoothed_decision_frequencies(counts), exact)


def test_estimator_handles_mixed_query_numbers_one_class_and_many_classes():
    mixed = estimate_logits_from_counts(torch.tensor([[3, 1], [30, 10], [4, 0], [40, 0]]), dtype=torch.float64)
    assert torch.allclose(mixed[0], mixed[1]) and mixed[0, 0] > 0  # the same frequency: the same exact root
    assert mixed[3, 0] > mixed[2, 0] > 0  # zero rows: more agreeing queries, more confidence
    assert torch.equal(estimate_logits_from_counts(torch.tensor([[10], [4]])), torch.zeros(2, 1))
    many = torch.zeros(3, 20, dtype=torch.int64)
    many[0, 0], many[1, :10], many[2, :2] = 10, 1, 5
    logits = estimate_logits_from_counts(many, dtype=torch.float64)
    assert bool(torch.isfinite(logits).all())
    assert torch.allclose(decision_probabilities(logits), rule_frequencies(many), rtol=1e-9, atol=0)
    assert estimate_logits_from_counts(many).dtype == torch.float32


def test_estimator_rejects_float_counts():
    with pytest.raises(TypeError, match="integer"):
        estimate_logits_from_counts(torch.tensor([[0.5, 0.5]]))


def test_rows_without_a_zero_count_get_their_exact_root_and_only_zero_rows_are_smoothed() -> None:
    import math
    from statistics import NormalDist

    from kdexp.decision.estimator import estimate_logits_from_counts

    counts = torch.tensor([[9, 1], [10, 0], [7, 3]])
    exact = estimate_logits_from_counts(counts, zero_count_rule="zero_rows").double()
    margins = (exact[:, 0] - exact[:, 1]).tolist()
    # two classes: P_0 = Phi(margin / (sqrt(2) s)), so the exact margin is sqrt(2)·Phi^-1(c_0 / N)
    assert margins[0] == pytest.approx(math.sqrt(2) * NormalDist().inv_cdf(0.9), abs=1e-5)  # 1.81
    assert margins[2] == pytest.approx(math.sqrt(2) * NormalDist().inv_cdf(0.7), abs=1e-5)
    assert margins[1] == pytest.approx(math.sqrt(2) * NormalDist().inv_cdf(10.5 / 11), abs=1e-5)  # (10 + ½)/(10 + 1)
    shrunk = estimate_logits_from_counts(counts, zero_count_rule="all_rows").double()
    assert float(shrunk[0, 0] - shrunk[0, 1]) == pytest.approx(math.sqrt(2) * NormalDist().inv_cdf(9.5 / 11), abs=1e-5)


def test_the_authors_capped_fixed_point_by_hand() -> None:
    import math
    from statistics import NormalDist

    from kdexp.decision.estimator import estimate_logits_from_counts

    def by_hand(p0: float) -> float:
        z = [p0, 1 - p0]
        for _ in range(20):
            prob0 = NormalDist().cdf((z[0] - z[1]) / math.sqrt(2))
            step = [p0 - prob0, (1 - p0) - (1 - prob0)]
            z = [z[0] + step[0], z[1] + step[1]]
            if abs(step[0]) + abs(step[1]) < 1e-3:
                break
        return z[0] - z[1]

    estimated = estimate_logits_from_counts(torch.tensor([[10, 0], [7, 3]]), zero_count_rule="authors").double()
    assert float(estimated[0, 0] - estimated[0, 1]) == pytest.approx(by_hand(1.0), abs=1e-6)
    assert float(estimated[1, 0] - estimated[1, 1]) == pytest.approx(by_hand(0.7), abs=1e-6)
