"""The metrics of DESIGN.md, defined once and used by evaluation, training logs and dashboards.

All functions work on plain per-step traces, so they can be checked on hand-built examples.

- Incident: one injected fault.
- MTTR: mean over incidents of (first step at which the fault is cleared and every SLO holds
  again - onset step) x 10 s. An incident still open at the end counts with the time to the end
  and also counts in ``unresolved_pct``.
- SLO adherence: share of steps where p99 latency, error rate and freshness all hold.
- Records lost: records dropped plus bad records delivered to a sink.
- Cost: replica-steps x unit price + action costs.
- Time to first correct action (TTFCA): onset -> first action in the fault's cure set (aimed at a
  stage that cure accepts); an incident that never gets one counts with the time to the end.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from envs.catalogue import FAULT_TYPES
from envs.params import STEP_SECONDS

METRIC_KEYS: tuple[str, ...] = (
    "mttr_s",
    "unresolved_pct",
    "slo_adherence",
    "records_lost",
    "cost",
    "escalations",
    "ttfca_s",
)


@dataclass(frozen=True)
class Incident:
    """One fault of an episode. ``cleared``/``first_cure`` are None when they never happened."""

    fault: str
    onset: int
    cleared: int | None
    first_cure: int | None


@dataclass(frozen=True)
class IncidentOutcome:
    recovery_steps: int  # onset -> recovered, or onset -> end when unresolved
    resolved: bool
    ttfca_steps: int
    fault: str = ""  # the fault type, for figures per fault type


def recovery_step(onset: int, cleared: int | None, slo_ok: Sequence[bool]) -> int | None:
    """First step at or after ``cleared`` (and ``onset``) at which every SLO holds, or None."""
    if cleared is None:
        return None
    slo = np.asarray(slo_ok, dtype=bool)
    start = max(cleared, onset)
    if start >= len(slo):
        return None
    hits = np.flatnonzero(slo[start:])
    return None if len(hits) == 0 else start + int(hits[0])


def incident_outcome(incident: Incident, slo_ok: Sequence[bool]) -> IncidentOutcome:
    """Time to recover and to the first correct action, in steps, for one incident.

    The trace covers steps 0..len(slo_ok)-1; "the end" is the last of them.
    """
    end = len(slo_ok) - 1
    recovered = recovery_step(incident.onset, incident.cleared, slo_ok)
    resolved = recovered is not None
    recovery = (recovered if resolved else end) - incident.onset
    first = incident.first_cure if incident.first_cure is not None else end
    return IncidentOutcome(
        max(recovery, 0), resolved, max(first - incident.onset, 0), fault=incident.fault
    )


@dataclass(frozen=True)
class EpisodeMetrics:
    """Everything needed to aggregate one episode: per-incident outcomes and per-step sums."""

    incidents: tuple[IncidentOutcome, ...]
    steps: int
    slo_ok_steps: int
    records_lost: float
    cost: float
    escalations: int

    def to_dict(self) -> dict:
        return {
            "incidents": [asdict(o) for o in self.incidents],
            "steps": self.steps,
            "slo_ok_steps": self.slo_ok_steps,
            "records_lost": self.records_lost,
            "cost": self.cost,
            "escalations": self.escalations,
        }

    @classmethod
    def from_dict(cls, d: dict) -> EpisodeMetrics:
        return cls(
            incidents=tuple(IncidentOutcome(**o) for o in d["incidents"]),
            steps=d["steps"],
            slo_ok_steps=d["slo_ok_steps"],
            records_lost=d["records_lost"],
            cost=d["cost"],
            escalations=d["escalations"],
        )


def episode_metrics(
    *,
    slo_ok: Sequence[bool],
    records_lost: Sequence[float],
    cost: Sequence[float],
    escalations: Sequence[bool],
    incidents: Iterable[Incident],
) -> EpisodeMetrics:
    """Summarise one episode's per-step trace and its incidents."""
    slo = np.asarray(slo_ok, dtype=bool)
    return EpisodeMetrics(
        incidents=tuple(incident_outcome(i, slo) for i in incidents),
        steps=len(slo),
        slo_ok_steps=int(slo.sum()),
        records_lost=float(np.sum(records_lost)),
        cost=float(np.sum(cost)),
        escalations=int(np.sum(escalations)),
    )


def aggregate(episodes: Sequence[EpisodeMetrics]) -> dict[str, float]:
    """The report's figures over many episodes.

    MTTR, unresolved share and TTFCA are over all incidents pooled (an episode with three
    incidents weighs three times one with one); SLO adherence is over all steps pooled; records
    lost, cost and escalations are means per episode.
    """
    if not episodes:
        raise ValueError("aggregate needs at least one episode")
    incidents = incident_figures([o for e in episodes for o in e.incidents])
    # The four figures paired_difference compares come from the same summed columns it
    # resamples (_pooled), so the two cannot drift apart.
    sums = _episode_sums(episodes).sum(axis=0)
    pooled = {m: float(_pooled(sums, m, len(episodes))) for m in PAIRED_METRICS}
    return {
        "mttr_s": pooled["mttr_s"],
        "unresolved_pct": incidents["unresolved_pct"],
        "slo_adherence": pooled["slo_adherence"],
        "records_lost": pooled["records_lost"],
        "cost": pooled["cost"],
        "escalations": sum(e.escalations for e in episodes) / len(episodes),
        "ttfca_s": incidents["ttfca_s"],
        "incidents": incidents["incidents"],
    }


def incident_figures(outcomes: Sequence[IncidentOutcome]) -> dict[str, float]:
    """MTTR, unresolved share and TTFCA over the given incidents pooled (zeros when none)."""

    def mean_s(values: list[int]) -> float:
        return float(np.mean(values)) * STEP_SECONDS if values else 0.0

    unresolved = [not o.resolved for o in outcomes]
    return {
        "mttr_s": mean_s([o.recovery_steps for o in outcomes]),
        "unresolved_pct": 100.0 * float(np.mean(unresolved)) if outcomes else 0.0,
        "ttfca_s": mean_s([o.ttfca_steps for o in outcomes]),
        "incidents": len(outcomes),
    }


def summarise(by_scenario: Mapping[str, Sequence[EpisodeMetrics]]) -> dict[str, dict]:
    """One policy's figures from its episodes per scenario: ``overall`` (every episode pooled;
    empty when there are none), ``per_scenario`` and ``per_fault`` (:func:`figures_by_fault`).
    The shape of a policy's entry in an evaluation report."""
    everything = [m for episodes in by_scenario.values() for m in episodes]
    return {
        "overall": aggregate(everything) if everything else {},
        "per_scenario": {name: aggregate(episodes) for name, episodes in by_scenario.items()},
        "per_fault": figures_by_fault(everything),
    }


def figures_by_fault(episodes: Sequence[EpisodeMetrics]) -> dict[str, dict[str, float]]:
    """:func:`incident_figures` per fault type, over every incident of ``episodes``; the fault
    types that occur, in the catalogue's order (``FAULT_TYPES``)."""
    by_fault: dict[str, list[IncidentOutcome]] = {}
    for episode in episodes:
        for outcome in episode.incidents:
            by_fault.setdefault(outcome.fault, []).append(outcome)
    order = {fault: i for i, fault in enumerate(FAULT_TYPES)}
    return {
        fault: incident_figures(by_fault[fault])
        for fault in sorted(by_fault, key=lambda f: order.get(f, len(order)))
    }


PAIRED_METRICS: tuple[str, ...] = ("mttr_s", "slo_adherence", "records_lost", "cost")


def paired_difference(
    a: Mapping[str, Sequence[EpisodeMetrics]],
    b: Mapping[str, Sequence[EpisodeMetrics]],
    *,
    resamples: int = 2000,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """``a`` minus ``b`` on the figures of :func:`aggregate`, with a 95% bootstrap interval.

    ``a`` and ``b`` are two policies' episodes per scenario, run on the same episode seeds, so
    episode ``j`` of a scenario met the same faults under both: the pairs are resampled
    together (within each scenario, so every resample keeps the design's episodes per
    scenario), and the spread of the difference leaves out how much the episodes themselves
    vary. Percentile interval over ``resamples`` resamples. Returns, per metric of
    ``PAIRED_METRICS``: ``difference`` (on all episodes), ``ci95_low``, ``ci95_high``."""
    if set(a) != set(b):
        raise ValueError(f"paired_difference: scenarios differ: {sorted(a)} vs {sorted(b)}")
    rng = np.random.default_rng(seed)
    # Per policy, per episode: the sums the pooled figures are ratios of.
    parts: list[np.ndarray] = []  # each (2, episodes, 6), a and b stacked
    picks: list[np.ndarray] = []  # each (resamples, episodes) indices into its scenario
    for name in a:
        if len(a[name]) != len(b[name]):
            raise ValueError(
                f"paired_difference: {name} has {len(a[name])} episodes against {len(b[name])}"
            )
        parts.append(np.stack([_episode_sums(a[name]), _episode_sums(b[name])]))
        n = len(a[name])
        picks.append(rng.integers(n, size=(resamples, n)))
    full = sum(p.sum(axis=1) for p in parts)  # (2, 6)
    boot = sum(p[:, idx].sum(axis=2) for p, idx in zip(parts, picks, strict=True))  # (2, R, 6)
    n_episodes = sum(len(v) for v in a.values())
    out = {}
    for metric in PAIRED_METRICS:
        point = _pooled(full, metric, n_episodes)
        spread = _pooled(boot, metric, n_episodes)
        low, high = np.percentile(spread[0] - spread[1], [2.5, 97.5])
        out[metric] = {
            "difference": float(point[0] - point[1]),
            "ci95_low": float(low),
            "ci95_high": float(high),
        }
    return out


def _episode_sums(episodes: Sequence[EpisodeMetrics]) -> np.ndarray:
    """(episodes, 6): recovery steps, incidents, SLO-ok steps, steps, records lost, cost."""
    return np.array(
        [
            (
                sum(o.recovery_steps for o in e.incidents),
                len(e.incidents),
                e.slo_ok_steps,
                e.steps,
                e.records_lost,
                e.cost,
            )
            for e in episodes
        ],
        dtype=np.float64,
    ).reshape(-1, 6)


def _pooled(sums: np.ndarray, metric: str, n_episodes: int) -> np.ndarray:
    """The pooled figure of :func:`aggregate` from summed columns (last axis)."""
    if metric == "mttr_s":
        return sums[..., 0] / np.maximum(sums[..., 1], 1) * STEP_SECONDS
    if metric == "slo_adherence":
        return sums[..., 2] / sums[..., 3]
    column = {"records_lost": 4, "cost": 5}[metric]
    return sums[..., column] / n_episodes
