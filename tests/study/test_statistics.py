"""Statistics of the ablation study against scipy and hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from segmentation.study.statistics import (
    case_means,
    holm,
    nested_bootstrap_ci,
    paired_bootstrap_ci,
    paired_differences,
    paired_mask,
    seed_sd,
    wilcoxon_p,
    wins_ties_losses,
)


@pytest.fixture(scope="module")
def dice() -> np.ndarray:
    """32 cases, SD about 0.05."""
    return np.random.default_rng(7).normal(0.8, 0.05, size=32)


def test_one_seed_column_is_the_case_bootstrap(dice: np.ndarray) -> None:
    estimate, low, high = nested_bootstrap_ci(dice[:, None], resamples=10_000, seed=3)
    expected = stats.bootstrap((dice,), np.mean, method="percentile", n_resamples=10_000,
                               random_state=np.random.default_rng(0)).confidence_interval
    assert estimate == pytest.approx(dice.mean())
    assert low == pytest.approx(expected.low, abs=0.01)
    assert high == pytest.approx(expected.high, abs=0.01)
    assert low < estimate < high


def test_identical_seed_columns_give_the_one_column_result(dice: np.ndarray) -> None:
    one = nested_bootstrap_ci(dice, resamples=4000)
    three = nested_bootstrap_ci(np.repeat(dice[:, None], 3, axis=1), resamples=4000)
    assert three[0] == pytest.approx(one[0], abs=1e-12)
    assert three[1:] == pytest.approx(one[1:], abs=0.01)


def test_seed_noise_widens_the_interval(dice: np.ndarray) -> None:
    noisy = dice[:, None] + np.random.default_rng(1).normal(0, 0.1, size=(32, 3))
    _, low, high = nested_bootstrap_ci(noisy, resamples=4000)
    _, low_means, high_means = nested_bootstrap_ci(noisy.mean(axis=1), resamples=4000)
    assert high - low > high_means - low_means


def test_missing_values_and_empty_cases() -> None:
    values = np.array([[0.8, np.nan], [np.nan, np.nan], [0.6, 0.7]])
    estimate, low, high = nested_bootstrap_ci(values, resamples=2000)
    assert estimate == pytest.approx((0.8 + 0.65) / 2)
    assert 0.6 <= low <= estimate <= high <= 0.8
    assert np.isnan(case_means(values)[1])
    assert all(np.isnan(nested_bootstrap_ci(np.full((3, 2), np.nan), resamples=100)))


def test_bootstrap_is_deterministic() -> None:
    values = np.random.default_rng(2).normal(0.8, 0.05, size=(32, 3))
    values[0, 1] = np.nan
    first = nested_bootstrap_ci(values, resamples=10_000, seed=5)
    assert nested_bootstrap_ci(values, resamples=10_000, seed=5) == first
    assert nested_bootstrap_ci(values, resamples=10_000, seed=6) != first
    differences = values[:, 0] - 0.75
    assert paired_bootstrap_ci(differences, seed=5) == paired_bootstrap_ci(differences, seed=5)


def test_bootstrap_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="resamples"):
        nested_bootstrap_ci(np.ones(3), resamples=0)
    with pytest.raises(ValueError, match="confidence"):
        nested_bootstrap_ci(np.ones(3), confidence=1.5)
    with pytest.raises(ValueError, match="shape"):
        nested_bootstrap_ci(np.ones((2, 2, 2)))


def test_paired_differences_use_seeds_present_in_both() -> None:
    variant = np.array([[0.9, 0.7], [0.5, np.nan], [np.nan, np.nan], [0.4, 0.6]])
    reference = np.array([[0.8, 0.8], [0.4, 0.3], [0.5, 0.5], [np.nan, 0.5]])
    assert paired_mask(variant, reference).tolist() == [True, True, False, True]
    # case 0: both seeds; case 1: seed 0 only; case 2: no pair; case 3: seed 1 only
    assert paired_differences(variant, reference) == pytest.approx([0.0, 0.1, 0.1])
    with pytest.raises(ValueError, match="shapes differ"):
        paired_differences(variant, reference[:, :1])


def test_a_nan_case_is_dropped_from_the_pairs() -> None:
    variant = np.array([0.9, np.nan, 0.7, 0.6])[:, None]
    reference = np.array([0.8, 0.8, 0.8, 0.8])[:, None]
    differences = paired_differences(variant, reference)
    assert differences == pytest.approx([0.1, -0.1, -0.2])
    assert wins_ties_losses(differences) == (1, 0, 2)


def test_zero_differences() -> None:
    zeros = np.zeros(10)
    assert wilcoxon_p(zeros) == 1.0
    assert wilcoxon_p(np.array([])) == 1.0
    assert paired_bootstrap_ci(zeros, resamples=500) == (0.0, 0.0, 0.0)
    assert wins_ties_losses(zeros) == (0, 10, 0)
    assert wins_ties_losses(np.array([5e-7, -5e-7, 2e-6, -2e-6])) == (1, 2, 1)


def test_wilcoxon_matches_scipy() -> None:
    differences = np.array([0.12, -0.03, 0.08, 0.05, 0.2, -0.01, 0.07, 0.15, 0.04, 0.09])
    expected = stats.wilcoxon(differences, zero_method="zsplit").pvalue
    assert wilcoxon_p(differences) == pytest.approx(expected)
    with_zeros = np.array([0.0, 0.0, 0.05, 0.02, -0.01, 0.03, 0.04, 0.06, 0.07])
    assert wilcoxon_p(with_zeros) == pytest.approx(
        stats.wilcoxon(with_zeros, zero_method="zsplit").pvalue)
    assert wilcoxon_p(np.array([0.1, 0.2, 0.3])) == pytest.approx(0.25)  # exact: 2 / 2**3
    assert wilcoxon_p(np.array([0.1])) == 1.0


def test_holm_hand_computed() -> None:
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    adjusted = holm([0.02, np.nan, 0.01])
    assert adjusted[[0, 2]] == pytest.approx([0.02, 0.02])
    assert np.isnan(adjusted[1])
    assert holm([]).shape == (0,)


def test_seed_sd() -> None:
    values = np.array([[0.8, 0.6], [0.6, 0.4]])
    assert seed_sd(values) == pytest.approx(np.std([0.7, 0.5], ddof=1))
    assert np.isnan(seed_sd(values[:, :1]))
