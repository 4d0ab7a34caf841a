"""Statistics of a long-skip ablation study: bootstrap intervals, paired tests, Holm correction.

Pure numpy/scipy, no I/O. The unit of analysis is the case: with cross-validation every training
case is in a validation fold exactly once per seed, so one variant and one class give a matrix
``X`` of shape (cases, seeds), NaN where there is no value (a run that is missing, or a class
absent from both the prediction and the reference: nnU-Net's rule leaves those out of means).

Choices:
    * Confidence intervals are percentile bootstrap intervals; every function takes a ``seed``
      for ``np.random.default_rng`` so that the same call gives the same interval.
    * :func:`nested_bootstrap_ci` resamples cases, then the seeds of each drawn case.
    * Paired comparisons first average each case over the seeds that both variants have for it
      (:func:`paired_differences`); :func:`paired_bootstrap_ci` then resamples the cases of
      those seed-averaged differences (seeds are *not* nested in the paired interval, so the
      interval and :func:`wilcoxon_p` describe the same per-case differences).
    * :func:`wilcoxon_p` uses ``zero_method="zsplit"``: a zero difference counts, its rank split
      between the two signs, so a variant that equals the reference on most cases is not called
      different on the strength of the few cases where it differs.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from scipy import stats

# Elements drawn per bootstrap chunk: bounds memory for large studies (about 16 MB of float64).
_CHUNK_ELEMENTS = 2_000_000


def _percentile_interval(statistics: np.ndarray, confidence: float) -> tuple[float, float]:
    """The equal-tailed percentile interval of bootstrap statistics of shape (resamples,)."""
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(statistics, [tail, 1.0 - tail])
    return float(low), float(high)


def _check_bootstrap_args(resamples: int, confidence: float) -> None:
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence}")


def _as_matrix(values: np.ndarray) -> np.ndarray:
    """``values`` as a float matrix of shape (cases, seeds); a 1-D array is one seed column."""
    matrix = np.asarray(values, dtype=float)
    if matrix.ndim == 1:
        matrix = matrix[:, None]
    if matrix.ndim != 2:
        raise ValueError(f"expected an array of shape (cases, seeds), got shape {matrix.shape}")
    return matrix


def case_means(values: np.ndarray) -> np.ndarray:
    """Per-case mean over the seeds that have a value.

    Args:
        values: scores of shape (cases, seeds), NaN where missing (1-D: one seed column).

    Returns:
        Shape (cases,): the nan-mean of each row, NaN for a row without any value.
    """
    matrix = _as_matrix(values)
    present = ~np.isnan(matrix)
    counts = present.sum(axis=1)
    sums = np.where(present, matrix, 0.0).sum(axis=1)
    means = np.full(len(matrix), np.nan)
    np.divide(sums, counts, out=means, where=counts > 0)
    return means


def nested_bootstrap_ci(values: np.ndarray, *, resamples: int = 10_000, confidence: float = 0.95,
                        seed: int = 0) -> tuple[float, float, float]:
    """Mean score with a nested (cases, then seeds within a case) percentile bootstrap interval.

    The estimate is the mean over cases of each case's mean over its seeds; cases without any
    value are dropped. Each bootstrap resample draws the cases with replacement and, within each
    drawn case, that case's available seeds with replacement (as many as it has); its statistic
    is the mean over the drawn cases of the mean of the drawn seeds. With one seed column this is
    the ordinary case bootstrap of the mean.

    Args:
        values: scores of shape (cases, seeds), NaN where missing (1-D: one seed column).
        resamples: number of bootstrap resamples.
        confidence: coverage of the two-sided interval, e.g. 0.95.
        seed: seed of ``np.random.default_rng``; the same seed gives the same interval.

    Returns:
        (estimate, low, high); all NaN when no case has a value.

    Raises:
        ValueError: for an array that is not 1-D or 2-D, ``resamples < 1`` or a confidence
            outside (0, 1).
    """
    _check_bootstrap_args(resamples, confidence)
    matrix = _as_matrix(values)
    present = ~np.isnan(matrix)
    counts = present.sum(axis=1)
    kept = counts > 0
    matrix, present, counts = matrix[kept], present[kept], counts[kept]
    n_cases, n_seeds = matrix.shape
    if n_cases == 0:
        return float("nan"), float("nan"), float("nan")
    estimate = float(case_means(matrix).mean())
    # Each row's available values first: seed j < counts[c] of row c is a real value.
    order = np.argsort(~present, axis=1, kind="stable")
    packed = np.take_along_axis(matrix, order, axis=1)
    rng = np.random.default_rng(seed)
    statistics = np.empty(resamples)
    nested = bool((counts > 1).any())
    chunk = max(1, _CHUNK_ELEMENTS // (n_cases * n_seeds))
    for start in range(0, resamples, chunk):
        size = min(chunk, resamples - start)
        drawn_cases = rng.integers(0, n_cases, size=(size, n_cases))
        if not nested:
            statistics[start:start + size] = packed[drawn_cases, 0].mean(axis=1)
            continue
        available = counts[drawn_cases][..., None]  # (size, n_cases, 1)
        picks = (rng.random((size, n_cases, n_seeds)) * available).astype(np.intp)
        drawn = packed[drawn_cases[..., None], picks]  # (size, n_cases, n_seeds)
        used = np.arange(n_seeds) < available
        seed_means = np.where(used, drawn, 0.0).sum(axis=2) / available[..., 0]
        statistics[start:start + size] = seed_means.mean(axis=1)
    return (estimate, *_percentile_interval(statistics, confidence))


def paired_mask(variant: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Which cases form a pair: at least one seed with a value in both matrices.

    Args:
        variant: scores of shape (cases, seeds), NaN where missing.
        reference: scores of the same shape (the same cases and seeds, in the same order).

    Returns:
        Boolean mask of shape (cases,).

    Raises:
        ValueError: if the shapes differ.
    """
    ours, theirs = _as_matrix(variant), _as_matrix(reference)
    if ours.shape != theirs.shape:
        raise ValueError(f"shapes differ: variant {ours.shape}, reference {theirs.shape}")
    return (~np.isnan(ours) & ~np.isnan(theirs)).any(axis=1)


def paired_differences(variant: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Seed-averaged per-case differences, variant minus reference, of the cases both have.

    For each case, the mean over the seeds present in *both* matrices of variant − reference
    (so a seed that only one of them has does not shift the difference). Cases without such a
    seed are dropped; :func:`paired_mask` says which cases are kept, and the length of the
    result is the number of pairs.

    Args:
        variant: scores of shape (cases, seeds), NaN where missing.
        reference: scores of the same shape (the same cases and seeds, in the same order).

    Returns:
        Shape (pairs,): the differences of the kept cases, in case order.

    Raises:
        ValueError: if the shapes differ.
    """
    kept = paired_mask(variant, reference)
    differences = _as_matrix(variant) - _as_matrix(reference)  # NaN unless both have the seed
    return case_means(differences)[kept]


def paired_bootstrap_ci(differences: np.ndarray, *, resamples: int = 10_000,
                        confidence: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """Mean paired difference with a case-bootstrap percentile interval.

    The differences are already averaged over seeds (:func:`paired_differences`); the cases are
    resampled with replacement, the seeds are not resampled again.

    Args:
        differences: per-case differences of shape (pairs,); NaN entries are dropped.
        resamples: number of bootstrap resamples.
        confidence: coverage of the two-sided interval, e.g. 0.95.
        seed: seed of ``np.random.default_rng``; the same seed gives the same interval.

    Returns:
        (mean difference, low, high); all NaN when there is no pair.

    Raises:
        ValueError: for ``resamples < 1`` or a confidence outside (0, 1).
    """
    return nested_bootstrap_ci(np.ravel(differences), resamples=resamples,
                               confidence=confidence, seed=seed)


def wilcoxon_p(differences: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired differences (``zero_method="zsplit"``).

    The p-value is scipy's (exact for small samples without ties, else the normal
    approximation). No pair, or every difference exactly 0, gives 1.0 rather than NaN; a single
    pair or a handful of pairs is allowed (and cannot reach a small p).

    Args:
        differences: per-case differences of shape (pairs,); NaN entries are dropped.

    Returns:
        The p-value in [0, 1].
    """
    values = np.ravel(np.asarray(differences, dtype=float))
    values = values[~np.isnan(values)]
    if values.size == 0 or not np.any(values):
        return 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. "sample size too small for normal approximation"
        p_value = float(stats.wilcoxon(values, zero_method="zsplit",
                                       alternative="two-sided").pvalue)
    return 1.0 if np.isnan(p_value) else min(p_value, 1.0)


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm–Bonferroni step-down adjusted p-values, in the input order.

    The i-th smallest of m p-values is multiplied by m − i + 1 (i from 1), then made monotone
    (running maximum in sorted order) and capped at 1. NaN entries are not part of the family
    and stay NaN.

    Args:
        p_values: the m p-values of the family.

    Returns:
        Shape (m,): the adjusted p-values.
    """
    p = np.asarray(p_values, dtype=float).ravel()
    adjusted = np.full(p.shape, np.nan)
    valid = ~np.isnan(p)
    family = p[valid]
    m = family.size
    if m == 0:
        return adjusted
    order = np.argsort(family, kind="stable")
    stepped = np.maximum.accumulate((m - np.arange(m)) * family[order])
    result = np.empty(m)
    result[order] = np.minimum(stepped, 1.0)
    adjusted[valid] = result
    return adjusted


def wins_ties_losses(differences: np.ndarray, tie: float = 1e-6) -> tuple[int, int, int]:
    """Count cases where the variant is better, equal (within ``tie``) and worse.

    Args:
        differences: per-case differences (variant − reference) of shape (pairs,); NaN entries
            are not counted.
        tie: differences with absolute value at most this count as ties.

    Returns:
        (wins, ties, losses): differences above ``tie``, within ±``tie``, below −``tie``.
    """
    values = np.ravel(np.asarray(differences, dtype=float))
    values = values[~np.isnan(values)]
    wins = int((values > tie).sum())
    losses = int((values < -tie).sum())
    return wins, int(values.size) - wins - losses, losses


def seed_sd(values: np.ndarray) -> float:
    """Standard deviation over seeds of the per-seed mean score.

    Args:
        values: scores of shape (cases, seeds), NaN where missing.

    Returns:
        The sample SD (ddof 1) of the mean over cases of each seed column that has a value;
        NaN with fewer than two such seeds.
    """
    matrix = _as_matrix(values)
    per_seed = case_means(matrix.T)
    per_seed = per_seed[~np.isnan(per_seed)]
    return float(np.std(per_seed, ddof=1)) if per_seed.size > 1 else float("nan")
