"""The wait probe (``pipemedic bench waits``): what it counts and what it refuses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from agents.inference import LearnedPolicy, fresh_nets, manifest_for
from agents.ppo_config import TrainConfig
from cluster.wait_probe import waiting_by_teacher_action
from envs.catalogue import MASTER_ACTIONS, STAGES
from envs.errors import ConfigError
from envs.observation import LAYOUTS

ROOT = Path(__file__).resolve().parents[1]


def _config(kind: str) -> TrainConfig:
    """Only the lone-leak scenario (a leak at `load`), 4 pipelines per environment."""
    return TrainConfig.model_validate(
        {
            "kind": kind,
            "env": {
                "scenarios": [str(ROOT / "configs/scenarios/memory-leak.yaml")],
                "random": {"share": 0.0},
                "max_episode_steps": 120,
                "pipelines": 4,
            },
        }
    )


def _policy(kind: str, favour: dict[str, int]) -> LearnedPolicy:
    """Fresh small nets; each agent in ``favour`` all but always picks that layout index."""
    nets = fresh_nets(kind, hidden=(8,))
    with torch.no_grad():
        for agent, index in favour.items():
            nets[agent].pi[-1].bias[index] = 50.0
    return LearnedPolicy(manifest_for(kind, nets, {}), nets)


def test_a_master_that_always_observes_waits_on_every_step_the_teacher_restarts():
    waiting = _policy("hierarchical", {"master": MASTER_ACTIONS.index("observe")})
    rows = {
        r.action: r
        for r in waiting_by_teacher_action(waiting, _config("hierarchical"), steps=960, seed=1)
    }
    # Nobody cures the leak, so once it shows the teacher restarts `load` on every step.
    assert rows["restart_stage"].steps > 0
    assert rows["restart_stage"].share == 1.0
    assert "observe" not in rows


def test_a_master_that_always_delegates_never_waits():
    infra = {
        "master": MASTER_ACTIONS.index("delegate_infra"),
        "infra": LAYOUTS["infra"].encode("restart_stage", STAGES.index("load")),
    }
    rows = waiting_by_teacher_action(
        _policy("hierarchical", infra), _config("hierarchical"), steps=960, seed=1
    )
    assert rows and all(r.waited == 0 for r in rows)


def test_flat_is_probed_on_its_own_choice_and_a_config_of_another_kind_is_refused():
    observe = {"flat": LAYOUTS["flat"].encode("observe")}
    rows = {
        r.action: r
        for r in waiting_by_teacher_action(
            _policy("flat", observe), _config("flat"), steps=960, seed=1
        )
    }
    assert rows["restart_stage"].share == 1.0
    with pytest.raises(ConfigError, match="config is for 'hierarchical'"):
        waiting_by_teacher_action(
            _policy("flat", observe), _config("hierarchical"), steps=960, seed=1
        )


@pytest.mark.parametrize("spec", ["flat:vx", "runbook", "hierarchical:", ","])
def test_bench_waits_refuses_a_policy_it_cannot_load_by_name(spec):
    from typer.testing import CliRunner

    from cluster.cli import app

    result = CliRunner().invoke(app, ["bench", "waits", "--policy", spec])
    assert result.exit_code == 2, result.output
    assert "--policy" in result.output
    assert "Traceback" not in result.output
