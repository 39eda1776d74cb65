"""Drift scores for one feature, or for the model's predictions, computed by the service itself.

The caller sends either two histograms over the same bins (reference counts and current counts)
or two raw samples (reference values and current values). Two scores compare them:

* PSI, the population stability index: ``sum((c - r) * ln(c / r))`` over the bins, where ``r``
  and ``c`` are the reference and current proportions per bin. It is 0 when the two
  distributions put the same share in every bin and grows as shares move between bins. A widely
  used rule of thumb reads it as: below 0.1 stable, 0.1 to 0.25 a moderate shift, above 0.25 a
  significant shift. The thresholds are conventions, not statistical tests, and PSI depends on
  the binning.
* KS, the two-sample Kolmogorov-Smirnov statistic D: the largest absolute gap between the two
  empirical cumulative distribution functions, in [0, 1]. For raw samples it comes with the
  p-value of ``scipy.stats.ks_2samp`` (small means the samples are unlikely to share a
  distribution). For histograms only D is given: it is taken at the bin boundaries, so it is a
  lower bound on the D of the underlying samples, and no p-value is reported because binned data
  breaks the test's assumptions.

Bad input raises :class:`DriftInputError`, a ``ValueError`` whose message names the problem, so
the HTTP layer can turn it into a 4xx reply.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

__all__ = [
    "DriftInputError",
    "DriftScore",
    "drift_from_histograms",
    "drift_from_samples",
    "ks_from_counts",
    "psi_from_counts",
]

DEFAULT_EPSILON = 1e-4


class DriftInputError(ValueError):
    """The histograms or samples given cannot be scored; the message says why."""


@dataclass(frozen=True)
class DriftScore:
    """Drift of the current data against the reference.

    ``psi`` is the population stability index, ``ks`` the Kolmogorov-Smirnov statistic D in
    [0, 1], and ``ks_pvalue`` the KS test's p-value, given only for raw samples (``None`` for
    histograms).
    """

    psi: float
    ks: float
    ks_pvalue: float | None


def _as_1d(values: Sequence[float], name: str) -> np.ndarray:
    # Requests carry JSON lists, so anything non-numeric or nested is the caller's error, not ours.
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DriftInputError(f"{name} must be a flat sequence of numbers") from exc
    if array.ndim != 1:
        raise DriftInputError(f"{name} must be a flat sequence of numbers, got {array.ndim}-D")
    if not np.all(np.isfinite(array)):
        raise DriftInputError(f"{name} contains non-finite values (NaN or infinity)")
    return array


def _validated_counts(
    reference: Sequence[float], current: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    ref = _as_1d(reference, "reference")
    cur = _as_1d(current, "current")
    if ref.size != cur.size:
        raise DriftInputError(f"reference has {ref.size} bins, current has {cur.size}")
    # One bin holds everything on both sides: no shift between bins can be seen.
    if ref.size < 2:
        raise DriftInputError(f"histograms need at least 2 bins, got {ref.size}")
    for name, counts in (("reference", ref), ("current", cur)):
        if np.any(counts < 0):
            raise DriftInputError(f"{name} has negative counts")
        # Proportions would be 0/0.
        if not np.any(counts > 0):
            raise DriftInputError(f"{name} counts are all zero")
    return ref, cur


def _psi(ref: np.ndarray, cur: np.ndarray, epsilon: float) -> float:
    # An empty bin would give ln(0) or a division by zero, i.e. an infinite PSI that says nothing
    # about how large the shift is; flooring the proportion at epsilon keeps the score finite and
    # still makes a bin that emptied (or filled from nothing) weigh heavily.
    r = np.maximum(ref / ref.sum(), epsilon)
    c = np.maximum(cur / cur.sum(), epsilon)
    return float(np.sum((c - r) * np.log(c / r)))


def _check_epsilon(epsilon: float) -> None:
    if not (np.isfinite(epsilon) and epsilon > 0):
        raise DriftInputError(f"epsilon must be a positive finite number, got {epsilon!r}")


def psi_from_counts(
    reference: Sequence[float], current: Sequence[float], *, epsilon: float = DEFAULT_EPSILON
) -> float:
    """Population stability index of two histograms over the same bins.

    Counts are turned into proportions, proportions below ``epsilon`` (empty bins) are raised to
    ``epsilon``, and the result is ``sum((c - r) * ln(c / r))``. Identical shapes give 0.

    Raises:
        DriftInputError: the bin counts differ, there are fewer than 2 bins, a count is negative
            or not finite, either histogram is all zeros, or ``epsilon`` is not positive.
    """
    _check_epsilon(epsilon)
    ref, cur = _validated_counts(reference, current)
    return _psi(ref, cur, epsilon)


def _ks_counts(ref: np.ndarray, cur: np.ndarray) -> float:
    gap = np.abs(np.cumsum(ref) / ref.sum() - np.cumsum(cur) / cur.sum())
    return float(np.max(gap))


def ks_from_counts(reference: Sequence[float], current: Sequence[float]) -> float:
    """Kolmogorov-Smirnov statistic D of two histograms over the same, ordered bins.

    D is the largest absolute difference between the two empirical CDFs, evaluated at the upper
    edge of each bin. It lies in [0, 1]; identical shapes give 0.

    Raises:
        DriftInputError: same conditions as :func:`psi_from_counts`.
    """
    ref, cur = _validated_counts(reference, current)
    return _ks_counts(ref, cur)


def drift_from_histograms(reference: Sequence[float], current: Sequence[float]) -> DriftScore:
    """PSI and KS statistic of two histograms over the same bins; ``ks_pvalue`` is ``None``.

    Bin edges are not needed: both scores depend only on the counts and the order of the bins.

    Raises:
        DriftInputError: same conditions as :func:`psi_from_counts`.
    """
    ref, cur = _validated_counts(reference, current)
    return DriftScore(psi=_psi(ref, cur, DEFAULT_EPSILON), ks=_ks_counts(ref, cur), ks_pvalue=None)


def _validated_sample(values: Sequence[float], name: str) -> np.ndarray:
    sample = _as_1d(values, name)
    # One value has no spread: neither quantile bins nor an empirical CDF mean anything.
    if sample.size < 2:
        raise DriftInputError(f"{name} sample needs at least 2 values, got {sample.size}")
    return sample


def drift_from_samples(
    reference: Sequence[float], current: Sequence[float], *, bins: int = 10
) -> DriftScore:
    """PSI, KS statistic and KS p-value of two raw samples.

    PSI is computed on ``bins`` quantile bins of the reference (deciles by default): the inner
    edges are the reference's quantiles, de-duplicated so that tied values do not make empty
    zero-width bins, and the outer edges are -inf and +inf so every current value lands in a
    bin. Bins are closed on the left. KS and its p-value come from ``scipy.stats.ks_2samp``.

    Raises:
        DriftInputError: a sample has fewer than 2 values or a non-finite value, or ``bins`` is
            not an integer of at least 2.
    """
    if isinstance(bins, bool) or not isinstance(bins, int | np.integer) or bins < 2:
        raise DriftInputError(f"bins must be an integer of at least 2, got {bins!r}")
    ref = _validated_sample(reference, "reference")
    cur = _validated_sample(current, "current")

    inner_edges = np.unique(np.quantile(ref, np.linspace(0.0, 1.0, bins + 1)[1:-1]))
    # searchsorted against the inner edges is binning with outer edges -inf/+inf: index i counts
    # the edges <= x, so x falls in [edge[i-1], edge[i]) and nothing falls outside.
    n_bins = inner_edges.size + 1
    ref_counts = np.bincount(np.searchsorted(inner_edges, ref, side="right"), minlength=n_bins)
    cur_counts = np.bincount(np.searchsorted(inner_edges, cur, side="right"), minlength=n_bins)

    ks = stats.ks_2samp(ref, cur)
    return DriftScore(
        psi=_psi(ref_counts.astype(np.float64), cur_counts.astype(np.float64), DEFAULT_EPSILON),
        ks=float(ks.statistic),
        ks_pvalue=float(ks.pvalue),
    )
