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
