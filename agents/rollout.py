"""Run a policy through simulated episodes and measure it.

This is the one loop that turns (policy, scenario, seeds) into episode metrics; the evaluation
harness runs it inside Ray tasks, tests run it directly.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np

from agents.policy import EpisodeContext, Policy
from envs.metrics import EpisodeMetrics
from envs.params import SimParams
from envs.scenario import Scenario
from envs.simulator import PipelineSim


def episode_seeds(scenario: Scenario, seed: int, episodes: int) -> list[int]:
    """Seeds of a scenario's evaluation episodes: the same for every policy, so all policies
    meet the same faults at the same steps (common random numbers)."""
    root = np.random.SeedSequence([seed, scenario.seed, zlib.crc32(scenario.name.encode())])
    return [int(s.generate_state(1)[0]) for s in root.spawn(episodes)]


def rollout(
    policy: Policy,
    scenario: Scenario,
    seeds: Sequence[int],
    *,
    params: SimParams | None = None,
) -> list[EpisodeMetrics]:
    """Run one episode per seed, all at once in one vectorised simulator, and measure them."""
    sim = PipelineSim(scenario, params, n=len(seeds))
    telemetry = sim.reset(seeds)
    policy.reset(EpisodeContext(n=len(seeds), topology=scenario.topology, params=sim.params))
    while not sim.done:
        truth = None
        if policy.needs_ground_truth:
            shown_only = getattr(policy, "ground_truth_shown_only", False)
            truth = sim.ground_truth(shown_only=shown_only)
        actions, targets = policy.act(telemetry, truth)
        telemetry = sim.step(actions, targets)
    return sim.episode_metrics()
