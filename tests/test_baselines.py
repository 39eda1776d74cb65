"""The baselines: registry, the oracle's privilege, and their ranking on real scenarios."""

from __future__ import annotations

from pathlib import Path

import pytest

from agents.policy import EpisodeContext, available_policies, make_policy
from agents.rollout import episode_seeds, rollout
from envs.errors import ConfigError
from envs.metrics import aggregate
from envs.scenario import load_scenario
from envs.simulator import PipelineSim

LIBRARY = Path(__file__).parent.parent / "configs" / "scenarios"


def test_registry_names_the_baselines_and_rejects_unknown_names():
    assert {"oncall", "runbook", "oracle"} <= set(available_policies())
    with pytest.raises(
        ConfigError, match="unknown policy 'wizard'; available: .*oncall.*oracle.*runbook"
    ):
        make_policy("wizard")


def test_oracle_refuses_to_act_without_ground_truth():
    scenario = load_scenario(LIBRARY / "null-spike.yaml")
    sim = PipelineSim(scenario, n=1)
    telemetry = sim.reset([0])
    oracle = make_policy("oracle")
    oracle.reset(EpisodeContext(n=1, topology=scenario.topology, params=sim.params))
    with pytest.raises(ValueError, match="ground truth"):
        oracle.act(telemetry, None)


@pytest.mark.parametrize(
    "name", ["cpu-contention", "schema-drift-under-surge", "outage-with-corrupt-batch"]
)
def test_oracle_beats_runbook_beats_oncall_on_mttr(name):
    scenario = load_scenario(LIBRARY / f"{name}.yaml")
    seeds = episode_seeds(scenario, 0, 4)
    mttr = {
        p: aggregate(rollout(make_policy(p), scenario, seeds))["mttr_s"]
        for p in ("oracle", "runbook", "oncall")
    }
    assert mttr["oracle"] <= mttr["runbook"] < mttr["oncall"]


def test_runbook_fixes_a_null_spike_at_its_source_within_a_minute():
    scenario = load_scenario(LIBRARY / "null-spike.yaml")
    result = aggregate(rollout(make_policy("runbook"), scenario, episode_seeds(scenario, 0, 4)))
    assert result["unresolved_pct"] == 0.0
    assert result["ttfca_s"] <= 60.0


def test_oncall_pages_a_human_only_when_slos_break():
    quiet = load_scenario(LIBRARY / "null-spike.yaml")  # bad data, but every SLO holds
    noisy = load_scenario(LIBRARY / "downstream-outage.yaml")
    assert (
        aggregate(rollout(make_policy("oncall"), quiet, episode_seeds(quiet, 0, 3)))["escalations"]
        == 0
    )
    assert (
        aggregate(rollout(make_policy("oncall"), noisy, episode_seeds(noisy, 0, 3)))["escalations"]
        >= 1
    )


def test_oracle_capacity_scales_out_through_a_surge_and_gives_the_replicas_back():
    """A traffic burst is no fault: the oracle has nothing to cure and lets the backlog breach
    the SLOs, while ``oracle_capacity`` adds replicas where the queue is, keeps more steps
    within SLO, and scales back in once the burst is over."""
    from envs.catalogue import ACTION_ID
    from envs.scenario import Scenario

    scenario = Scenario.model_validate(
        {
            "name": "burst-only",
            "duration_steps": 160,
            "load": {"pattern": "flat", "bursts": [{"at": 20, "factor": 2.5, "duration": 40}]},
        }
    )
    seeds = episode_seeds(scenario, 0, 3)
    slo = {
        p: aggregate(rollout(make_policy(p), scenario, seeds))["slo_adherence"]
        for p in ("oracle", "oracle_capacity")
    }
    assert slo["oracle_capacity"] > slo["oracle"] + 0.05, slo

    sim = PipelineSim(scenario, n=1)
    telemetry = sim.reset([seeds[0]])
    teacher = make_policy("oracle_capacity")
    teacher.reset(EpisodeContext(n=1, topology=scenario.topology, params=sim.params))
    taken = []
    for _ in range(scenario.duration_steps):
        action, stage = teacher.act(telemetry, sim.ground_truth())
        taken.append(int(action[0]))
        telemetry = sim.step(action, stage)
    first_out = taken.index(ACTION_ID["scale_out"])
    assert 20 <= first_out < 60, "scales out during the burst, not before"
    assert ACTION_ID["scale_in"] in taken[first_out:], "gives the replicas back afterwards"


def test_oracle_capacity_cures_first_like_the_oracle():
    scenario = load_scenario(LIBRARY / "memory-leak.yaml")
    seeds = episode_seeds(scenario, 0, 3)
    oracle = aggregate(rollout(make_policy("oracle"), scenario, seeds))
    teacher = aggregate(rollout(make_policy("oracle_capacity"), scenario, seeds))
    assert teacher["mttr_s"] == oracle["mttr_s"]
    assert teacher["unresolved_pct"] == 0.0


def test_oracle_shown_waits_for_a_leak_to_show_and_is_the_oracle_elsewhere():
    """``oracle_shown`` is told of a memory leak only once memory is out of the noise, so it
    acts later than ``oracle`` but sooner than the runbook (which waits for 85%); on faults
    telemetry shows at once it is the oracle, episode for episode."""
    leak = load_scenario(LIBRARY / "memory-leak.yaml")
    seeds = episode_seeds(leak, 0, 4)
    ttfca = {
        p: aggregate(rollout(make_policy(p), leak, seeds))["ttfca_s"]
        for p in ("oracle", "oracle_shown", "runbook")
    }
    assert ttfca["oracle"] < ttfca["oracle_shown"] < ttfca["runbook"], ttfca
    nulls = load_scenario(LIBRARY / "null-spike.yaml")
    seeds = episode_seeds(nulls, 0, 4)
    assert rollout(make_policy("oracle_shown"), nulls, seeds) == rollout(
        make_policy("oracle"), nulls, seeds
    )


def test_backlog_trend_needs_two_rises_in_a_row():
    import numpy as np

    from agents.baselines import BacklogTrend

    trend = BacklogTrend()
    readings = [[5.0, 5.0], [6.0, 4.0], [7.0, 6.0], [6.5, 7.0], [8.0, 8.0], [9.0, 9.0]]
    masks = [trend.update(np.array([r])).tolist()[0] for r in readings]
    # the first two readings cannot show two rises; a dip starts the count again
    assert masks == [
        [False, False],
        [False, False],
        [True, False],
        [False, True],
        [False, True],
        [True, True],
    ]


@pytest.mark.parametrize("name", ["runbook", "oracle_capacity"])
def test_a_growing_backlog_is_scaled_out_before_the_slo_breaks(name):
    """A burst that the stages cannot absorb builds queues step after step; the runbook and
    the teacher add a replica while the queue grows, before the latency SLO breaks (the
    simulator's own SLO record, not the noisy telemetry). Before ``BacklogTrend`` both let the
    SLO break first in half of these episodes."""
    import numpy as np

    from envs.catalogue import ACTION_ID
    from envs.scenario import Scenario

    scenario = Scenario.model_validate(
        {
            "name": "burst-only",
            "duration_steps": 80,
            "load": {"pattern": "flat", "bursts": [{"at": 20, "factor": 1.6, "duration": 40}]},
        }
    )
    sim = PipelineSim(scenario, n=8)
    telemetry = sim.reset(episode_seeds(scenario, 0, 8))
    policy = make_policy(name)
    policy.reset(EpisodeContext(n=8, topology=scenario.topology, params=sim.params))
    breached_yet = np.zeros(8, dtype=bool)  # any step so far broke an SLO
    first = {}  # pipeline -> whether an SLO had broken before its first scale-out
    while not sim.done:
        action, stage = policy.act(telemetry, sim.ground_truth())
        for b in np.flatnonzero(action == ACTION_ID["scale_out"]):
            first.setdefault(int(b), bool(breached_yet[b]))
        telemetry = sim.step(action, stage)
        breached_yet |= ~sim.history[-1].slo_ok
    assert len(first) == 8, "every pipeline scales out during the burst"
    assert not any(first.values()), first
