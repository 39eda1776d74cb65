"""The leak probe (``pipemedic bench leak``): what it counts and what it refuses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from agents.inference import LearnedPolicy, fresh_nets, manifest_for
from agents.rollout import episode_seeds
from cluster.leak_probe import leak_readiness
from envs.catalogue import ACTION_ID, MASTER_ACTIONS, STAGES
from envs.errors import PipemedicError
from envs.observation import LAYOUTS
from envs.scenario import load_scenario
from envs.simulator import PipelineSim

ROOT = Path(__file__).resolve().parents[1]
LEAK = load_scenario(ROOT / "configs/scenarios/memory-leak.yaml")  # a leak at `load`


def _policy(kind: str, favour: dict[str, int] | None = None) -> LearnedPolicy:
    """Fresh small nets; each agent in ``favour`` all but always picks that layout index."""
    nets = fresh_nets(kind, hidden=(8,))
    with torch.no_grad():
        for agent, index in (favour or {}).items():
            nets[agent].pi[-1].bias[index] = 50.0
    return LearnedPolicy(manifest_for(kind, nets, {}), nets)


def test_a_policy_that_always_restarts_the_leaking_stage_cures_in_every_bin():
    restart_load = {"flat": LAYOUTS["flat"].encode("restart_stage", STAGES.index("load"))}
    infra = {
        "master": MASTER_ACTIONS.index("delegate_infra"),
        "infra": LAYOUTS["infra"].encode("restart_stage", STAGES.index("load")),
    }
    bins = leak_readiness(
        [_policy("flat", restart_load), _policy("hierarchical", infra)], LEAK, episodes=4
    )
    assert sum(b.steps for b in bins) > 0
    for b in (b for b in bins if b.steps):
        for name in ("flat", "hierarchical"):
            p_act, p_cure, greedy = b.mean(name)
            assert p_act == pytest.approx(1.0, abs=1e-6)
            assert p_cure == pytest.approx(1.0, abs=1e-6)
            assert greedy == 1.0


def test_the_hierarchy_cures_only_when_master_and_specialist_both_choose_it():
    restart_load = LAYOUTS["infra"].encode("restart_stage", STAGES.index("load"))
    master_waits = {"master": MASTER_ACTIONS.index("observe"), "infra": restart_load}
    infra_waits = {
        "master": MASTER_ACTIONS.index("delegate_infra"),
        "infra": LAYOUTS["infra"].encode("observe"),
    }
    bins = leak_readiness(
        [_policy("hierarchical", master_waits), _policy("flat")], LEAK, episodes=3
    )
    declined = leak_readiness([_policy("hierarchical", infra_waits)], LEAK, episodes=3)
    for b, d in zip(bins, declined, strict=True):
        if b.steps:
            # A specialist sure of the cure is not asked: no cure, whatever it would say.
            assert b.mean("hierarchical") == pytest.approx((0, 0, 0), abs=1e-6)
            # Asked every time, a specialist that declines: the master acts, nothing is cured.
            assert d.mean("hierarchical") == pytest.approx((1, 0, 0), abs=1e-6)
    # The same observe-only episodes counted directly: active-leak steps with true memory in
    # the bins' range.
    sim = PipelineSim(LEAK, n=3)
    sim.reset(episode_seeds(LEAK, 0, 3))
    observe, stage0 = np.full(3, ACTION_ID["observe"]), np.zeros(3, dtype=np.int64)
    expected = 0
    while not sim.done:
        truth = sim.ground_truth()
        memory = sim.mem[np.arange(3), truth.stages[:, 0]]
        expected += int(
            (truth.active[:, 0] & (memory >= bins[0].low) & (memory < bins[-1].high)).sum()
        )
        sim.step(observe, stage0)
    assert sum(b.steps for b in bins) == expected > 0


def test_a_scenario_with_more_than_the_leak_is_refused_by_name():
    mixed = load_scenario(ROOT / "configs/scenarios/leak-duplicates-timeouts.yaml")
    with pytest.raises(PipemedicError, match="leak-duplicates-timeouts"):
        leak_readiness([_policy("flat")], mixed, episodes=1)


def test_bench_leak_refuses_a_baseline_by_name():
    from typer.testing import CliRunner

    from cluster.cli import app

    result = CliRunner().invoke(app, ["bench", "leak", "--policy", "hierarchical,runbook"])
    assert result.exit_code == 2
    assert "learned kinds" in result.output and "runbook" in result.output
    assert "Traceback" not in result.output
