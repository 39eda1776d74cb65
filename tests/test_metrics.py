"""The metric definitions, checked on hand-built traces with answers worked out by hand."""

from __future__ import annotations

import pytest

from envs.metrics import (
    PAIRED_METRICS,
    EpisodeMetrics,
    Incident,
    IncidentOutcome,
    aggregate,
    episode_metrics,
    figures_by_fault,
    incident_outcome,
    paired_difference,
    recovery_step,
    summarise,
)

T, F = True, False


def _episode(recovery: int, slo_ok: int = 90, lost: float = 0.0) -> EpisodeMetrics:
    """A 100-step episode with one incident recovered in ``recovery`` steps."""
    return EpisodeMetrics(
        incidents=(IncidentOutcome(recovery, True, 0, fault="memory_leak"),),
        steps=100,
        slo_ok_steps=slo_ok,
        records_lost=lost,
        cost=50.0,
        escalations=0,
    )


def test_recovery_waits_for_slos_after_the_fault_clears():
    #        step: 0  1  2  3  4  5  6
    slo_ok = [T, T, F, F, F, T, T]
    # Cleared at 3, SLOs hold again first at 5: recovered at 5, MTTR = 5 - 2 = 3 steps.
    assert recovery_step(onset=2, cleared=3, slo_ok=slo_ok) == 5
    outcome = incident_outcome(Incident("cpu_contention", onset=2, cleared=3, first_cure=2), slo_ok)
    assert (outcome.recovery_steps, outcome.resolved, outcome.ttfca_steps) == (3, True, 0)


def test_fault_cleared_while_slos_hold_recovers_at_once():
    slo_ok = [T, T, T, T]
    assert recovery_step(onset=1, cleared=2, slo_ok=slo_ok) == 2


def test_open_incident_counts_to_the_end_and_as_unresolved():
    slo_ok = [T, F, F, F, F]  # last step is 4
    outcome = incident_outcome(
        Incident("null_spike", onset=1, cleared=None, first_cure=None), slo_ok
    )
    assert (outcome.recovery_steps, outcome.resolved, outcome.ttfca_steps) == (3, False, 3)


def test_cleared_but_slos_never_recover_is_unresolved():
    slo_ok = [T, F, F, F]
    outcome = incident_outcome(Incident("memory_leak", onset=1, cleared=2, first_cure=1), slo_ok)
    assert (outcome.recovery_steps, outcome.resolved) == (2, False)


def test_aggregate_pools_incidents_and_steps_and_averages_per_episode():
    # Episode A: 4 steps, 3 in SLO, one incident recovered in 2 steps, first cure after 1.
    a = episode_metrics(
        slo_ok=[T, F, T, T],
        records_lost=[0, 100, 0, 0],
        cost=[1, 1, 1, 1],
        escalations=[F, F, F, F],
        incidents=[Incident("schema_drift", onset=1, cleared=2, first_cure=2)],
    )
    # Episode B: 4 steps, 1 in SLO, two incidents: one recovered in 1 step, one open (to end: 2).
    b = episode_metrics(
        slo_ok=[T, F, T, F],
        records_lost=[0, 50, 0, 250],
        cost=[2, 2, 2, 2],
        escalations=[F, T, F, F],
        incidents=[
            Incident("node_failure", onset=1, cleared=2, first_cure=1),
            Incident("null_spike", onset=1, cleared=None, first_cure=None),
        ],
    )
    report = aggregate([a, b])
    # Recoveries 1, 1, 2 steps -> mean 4/3 steps = 13.33 s; TTFCA 1, 0, 2 -> 10 s.
    assert report["mttr_s"] == pytest.approx(40 / 3)
    assert report["ttfca_s"] == pytest.approx(10.0)
    assert report["unresolved_pct"] == pytest.approx(100 / 3)
    assert report["slo_adherence"] == pytest.approx(5 / 8)
    assert report["records_lost"] == pytest.approx(200.0)
    assert report["cost"] == pytest.approx(6.0)
    assert report["escalations"] == pytest.approx(0.5)
    assert report["incidents"] == 3
    # Per fault type: schema_drift recovered in 1 step (cure after 1), node_failure in 1 (cure
    # at once), null_spike open to the end (2 steps, no cure).
    assert figures_by_fault([a, b]) == {
        "schema_drift": {"mttr_s": 10.0, "unresolved_pct": 0.0, "ttfca_s": 10.0, "incidents": 1},
        "node_failure": {"mttr_s": 10.0, "unresolved_pct": 0.0, "ttfca_s": 0.0, "incidents": 1},
        "null_spike": {"mttr_s": 20.0, "unresolved_pct": 100.0, "ttfca_s": 20.0, "incidents": 1},
    }
    # In the catalogue's order, not the order of occurrence.
    assert list(figures_by_fault([b, a])) == ["schema_drift", "node_failure", "null_spike"]
    # One policy's report entry: pooled, per scenario, per fault.
    summary = summarise({"one": [a], "two": [b]})
    assert summary["overall"] == report
    assert summary["per_scenario"] == {"one": aggregate([a]), "two": aggregate([b])}
    assert summary["per_fault"] == figures_by_fault([a, b])


def test_episode_metrics_survive_a_round_trip_through_dicts():
    m = episode_metrics(
        slo_ok=[T, F],
        records_lost=[1.5, 2.5],
        cost=[1, 1],
        escalations=[F, T],
        incidents=[Incident("late_data", onset=0, cleared=1, first_cure=0)],
    )
    assert EpisodeMetrics.from_dict(m.to_dict()) == m


def test_aggregate_of_nothing_is_an_error():
    with pytest.raises(ValueError, match="at least one episode"):
        aggregate([])
    # A summary of no scenarios is empty rather than an error (a config with no held-out set).
    assert summarise({}) == {"overall": {}, "per_scenario": {}, "per_fault": {}}


def test_paired_difference_is_the_difference_of_the_pooled_figures():
    a = {"x": [_episode(3, 90, 10), _episode(9, 80, 30)], "y": [_episode(1, 100, 0)]}
    b = {"x": [_episode(5, 95, 20), _episode(2, 70, 0)], "y": [_episode(4, 99, 5)]}
    paired = paired_difference(a, b, resamples=200)
    overall_a = aggregate([*a["x"], *a["y"]])
    overall_b = aggregate([*b["x"], *b["y"]])
    for metric in PAIRED_METRICS:
        figures = paired[metric]
        assert figures["difference"] == pytest.approx(overall_a[metric] - overall_b[metric])
        assert figures["ci95_low"] <= figures["ci95_high"]


def test_pairing_removes_the_spread_of_the_episodes_themselves():
    # Episodes vary widely (1 to 60 steps to recover), but b is a plus 2 steps in every one:
    # each resample of the pairs has a difference of exactly -20 s. Resampling the two
    # policies' episodes independently would give an interval tens of seconds wide.
    recoveries = [1, 60, 7, 33, 2, 45, 12, 5, 58, 20]
    a = {"s": [_episode(r) for r in recoveries]}
    b = {"s": [_episode(r + 2) for r in recoveries]}
    mttr = paired_difference(a, b)["mttr_s"]
    assert mttr == pytest.approx({"difference": -20.0, "ci95_low": -20.0, "ci95_high": -20.0})


def test_a_difference_that_is_noise_has_an_interval_around_zero():
    a = {"s": [_episode(r) for r in (10, 2, 10, 2, 10, 2, 10, 2)]}
    b = {"s": [_episode(r) for r in (2, 10, 2, 10, 2, 10, 2, 10)]}
    mttr = paired_difference(a, b)["mttr_s"]
    assert mttr["difference"] == 0.0
    assert mttr["ci95_low"] < -10 and mttr["ci95_high"] > 10


def test_paired_difference_needs_the_same_episodes():
    with pytest.raises(ValueError, match="scenarios differ"):
        paired_difference({"s": [_episode(1)]}, {"t": [_episode(1)]})
    with pytest.raises(ValueError, match="s has 2 episodes against 1"):
        paired_difference({"s": [_episode(1), _episode(2)]}, {"s": [_episode(1)]})
