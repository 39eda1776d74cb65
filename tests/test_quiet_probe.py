"""The quiet-step probe (``pipemedic bench quiet``): what it counts and what it refuses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from agents.inference import LearnedPolicy, fresh_nets, manifest_for
from agents.ppo_config import TrainConfig
from cluster.quiet_probe import quiet_steps
from envs.catalogue import STAGES
from envs.errors import ConfigError
from envs.observation import LAYOUTS
from tests.conftest import single_fault_scenario

ROOT = Path(__file__).resolve().parents[1]


def _config(held_out: list[str]) -> TrainConfig:
    return TrainConfig.model_validate(
        {
            "kind": "flat",
            "env": {"scenarios": [str(ROOT / "configs/scenarios/node-failure.yaml")]},
            "held_out": [str(ROOT / p) for p in held_out],
        }
    )


def _flat_policy(action: str, stage: str = "ingest") -> LearnedPolicy:
    """Fresh small flat nets that all but always pick ``action`` at ``stage``."""
    nets = fresh_nets("flat", hidden=(8,))
    with torch.no_grad():
        nets["flat"].pi[-1].bias[LAYOUTS["flat"].encode(action, STAGES.index(stage))] = 50.0
    return LearnedPolicy(manifest_for("flat", nets, {}), nets)


def test_restarting_on_every_step_breaches_on_every_quiet_step():
    cfg = _config(["configs/scenarios/outage-with-corrupt-batch.yaml"])
    figures = quiet_steps(_flat_policy("restart_stage", "transform"), cfg, episodes=2, seed=0)
    assert figures.episodes == 2 and figures.quiet_steps > 0
    # The stage is down on every step it is restarted: every quiet step acts and breaches.
    assert figures.acts == {"restart_stage": figures.quiet_steps}
    assert figures.breached_as_it_acted["restart_stage"] == figures.quiet_steps
    assert figures.quiet_breaches == figures.quiet_steps


def test_a_policy_that_only_observes_takes_no_quiet_actions():
    cfg = _config(["configs/scenarios/outage-with-corrupt-batch.yaml"])
    figures = quiet_steps(_flat_policy("observe"), cfg, episodes=2, seed=0)
    assert figures.quiet_steps > 0 and not figures.acts
    assert figures.quiet_breaches < figures.quiet_steps / 10  # a healthy pipeline mostly holds


def test_no_held_out_scenarios_is_a_clear_error():
    with pytest.raises(ConfigError, match="held_out"):
        quiet_steps(_flat_policy("observe"), _config([]), episodes=1, seed=0)


def test_the_step_a_fault_starts_on_is_not_quiet(tmp_path):
    # An outage from step 10 breaks the SLO on its first step; that breach is the fault's.
    scenario = single_fault_scenario("downstream_outage", at=10, steps=30)
    path = tmp_path / "outage.yaml"
    path.write_text(yaml.safe_dump(scenario.model_dump(mode="json")))
    cfg = TrainConfig.model_validate(
        {
            "kind": "flat",
            "env": {"scenarios": [str(ROOT / "configs/scenarios/node-failure.yaml")]},
            "held_out": [str(path)],
        }
    )
    figures = quiet_steps(_flat_policy("observe"), cfg, episodes=3, seed=0)
    assert figures.quiet_steps == 3 * 9  # steps 1-9 of each episode; the outage never ends
    assert figures.quiet_breaches == 0
