"""Drift scores (PSI, KS) on small hand-worked histograms and on seeded samples."""

from __future__ import annotations

import math

import numpy as np
import pytest

from serve.drift import (
    DriftInputError,
    DriftScore,
    drift_from_histograms,
    drift_from_samples,
    ks_from_counts,
    psi_from_counts,
)


def test_identical_histograms_score_zero_psi_and_zero_ks():
    # Same shape at a tenth of the size: proportions are equal, so no drift.
    score = drift_from_histograms([10, 20, 30, 40], [1, 2, 3, 4])
    assert isinstance(score, DriftScore)
    assert score.psi == pytest.approx(0.0, abs=1e-12)
    assert score.ks == pytest.approx(0.0, abs=1e-12)


def test_psi_of_two_bins_matches_hand_computation():
    # Proportions r = [0.5, 0.5], c = [0.8, 0.2]:
    # 0.3 * ln(1.6) + (-0.3) * ln(0.4) = 0.3 * ln(4) ~ 0.4159.
    expected = (0.8 - 0.5) * math.log(0.8 / 0.5) + (0.2 - 0.5) * math.log(0.2 / 0.5)
    assert psi_from_counts([50, 50], [80, 20]) == pytest.approx(expected)
    assert expected == pytest.approx(0.3 * math.log(4))


def test_psi_is_symmetric_in_reference_and_current():
    assert psi_from_counts([50, 50], [80, 20]) == pytest.approx(psi_from_counts([80, 20], [50, 50]))


def test_ks_from_counts_is_largest_cdf_gap():
    # CDFs: reference [0.1, 0.3, 0.6, 1.0], current [0.4, 0.7, 0.9, 1.0];
    # gaps [0.3, 0.4, 0.3, 0.0], so D = 0.4 (after the second bin).
    assert ks_from_counts([10, 20, 30, 40], [40, 30, 20, 10]) == pytest.approx(0.4)


def test_ks_from_counts_is_one_for_disjoint_histograms():
    assert ks_from_counts([5, 5, 0, 0], [0, 0, 3, 7]) == pytest.approx(1.0)


def test_histogram_score_has_no_pvalue():
    score = drift_from_histograms([50, 50], [80, 20])
    assert score.psi == pytest.approx(0.3 * math.log(4))
    assert score.ks == pytest.approx(0.3)  # CDFs after bin 1: 0.5 vs 0.8
    assert score.ks_pvalue is None


def test_empty_current_bin_gives_finite_psi_from_epsilon_floor():
    # c = [1.0, 0.0] with the empty bin floored at 1e-4; r = [0.5, 0.5].
    eps = 1e-4
    expected = (1.0 - 0.5) * math.log(1.0 / 0.5) + (eps - 0.5) * math.log(eps / 0.5)
    psi = psi_from_counts([50, 50], [100, 0], epsilon=eps)
    assert math.isfinite(psi)
    assert psi == pytest.approx(expected)
    assert psi > 0.25


def test_bin_empty_on_both_sides_adds_nothing():
    assert psi_from_counts([50, 50, 0], [50, 50, 0]) == pytest.approx(0.0, abs=1e-12)


def test_samples_from_same_distribution_show_no_drift():
    rng = np.random.default_rng(20240501)
    reference = rng.normal(0.0, 1.0, 5000)
    current = rng.normal(0.0, 1.0, 5000)
    score = drift_from_samples(reference, current)
    assert 0.0 <= score.psi < 0.02
    assert 0.0 <= score.ks < 0.05
    assert score.ks_pvalue is not None and score.ks_pvalue > 0.05


def test_samples_shifted_by_one_sd_show_significant_drift():
    rng = np.random.default_rng(20240501)
    reference = rng.normal(0.0, 1.0, 5000)
    current = rng.normal(1.0, 1.0, 5000)
    score = drift_from_samples(reference, current)
    assert score.psi > 0.25
    assert score.ks_pvalue is not None and score.ks_pvalue < 1e-6


def test_sample_psi_uses_reference_quantile_bins():
    # Median of 0..9 is 4.5, so bins=2 splits at 4.5: reference 5|5, current 8|2,
    # the same proportions as the hand-worked two-bin histogram.
    reference = np.arange(10.0)
    current = [0, 0, 1, 1, 2, 2, 3, 3, 8, 9]
    score = drift_from_samples(reference, current, bins=2)
    assert score.psi == pytest.approx(0.3 * math.log(4))


def test_tied_reference_values_still_score():
    # Every quantile of a constant reference is the same value: the edges collapse to one.
    score = drift_from_samples([3.0] * 100, [3.0] * 50)
    assert score.psi == pytest.approx(0.0, abs=1e-12)
    assert score.ks == 0.0
    moved = drift_from_samples([3.0] * 100, [1.0] * 50)
    assert math.isfinite(moved.psi) and moved.psi > 0.25
    assert moved.ks == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("reference", "current", "message"),
    [
        ([1, 2, 3, 4, 5], [1, 2, 3, 4], "reference has 5 bins, current has 4"),
        ([10], [10], "at least 2 bins, got 1"),
        ([], [], "at least 2 bins, got 0"),
        ([10, -1], [5, 5], "reference has negative counts"),
        ([5, 5], [5, -2], "current has negative counts"),
        ([5, float("nan")], [5, 5], "reference contains non-finite"),
        ([5, 5], [5, float("inf")], "current contains non-finite"),
        ([0, 0], [5, 5], "reference counts are all zero"),
        ([5, 5], [0, 0], "current counts are all zero"),
        ([[1, 2], [3, 4]], [1, 2], "reference must be a flat sequence"),
        (["a", "b"], [1, 2], "reference must be a flat sequence"),
    ],
)
def test_bad_histograms_raise_drift_input_error(reference, current, message):
    for score in (psi_from_counts, ks_from_counts, drift_from_histograms):
        with pytest.raises(DriftInputError, match=message):
            score(reference, current)


@pytest.mark.parametrize("epsilon", [0.0, -1e-4, float("nan")])
def test_non_positive_epsilon_raises(epsilon):
    with pytest.raises(DriftInputError, match="epsilon must be a positive"):
        psi_from_counts([50, 50], [80, 20], epsilon=epsilon)


@pytest.mark.parametrize(
    ("reference", "current", "message"),
    [
        ([1.0], [1.0, 2.0], "reference sample needs at least 2 values, got 1"),
        ([1.0, 2.0], [], "current sample needs at least 2 values, got 0"),
        ([1.0, float("nan")], [1.0, 2.0], "reference contains non-finite"),
        ([1.0, 2.0], [float("-inf"), 2.0], "current contains non-finite"),
    ],
)
def test_bad_samples_raise_drift_input_error(reference, current, message):
    with pytest.raises(DriftInputError, match=message):
        drift_from_samples(reference, current)


@pytest.mark.parametrize("bins", [1, 0, 2.5, True])
def test_bad_bin_count_raises(bins):
    with pytest.raises(DriftInputError, match="bins must be an integer of at least 2"):
        drift_from_samples([1.0, 2.0, 3.0], [1.0, 2.0], bins=bins)


def test_drift_input_error_is_a_value_error():
    with pytest.raises(ValueError):
        psi_from_counts([1, 2], [1])
