"""What does a policy do while no fault is open, and what does it cost the SLO?

``pipemedic bench quiet`` runs learned policies, each with its own decision rule, on the
held-out scenarios (the episodes ``pipemedic evaluate --seed`` draws) and, on every step where
the simulator has no fault active (before the policy acts and during the step it acts on),
counts the policy's actions (anything but ``observe``) per concrete action, and the SLO
breaches of those steps. A breach on a quiet step is the pipeline's
own doing: a traffic burst it lacks the capacity for, or an action's harm (a restart takes its
stage down for the step; a failover halves its capacity). So per action the table also counts
the quiet steps where that action was taken and the SLO broke on the very step it acted: the
harm the specialist's reward ``rewards.specialist_credit: direct`` did not charge (README).

It is a measurement for reporting, never a training or selection signal.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from agents.inference import LearnedPolicy
from agents.policy import EpisodeContext
from agents.ppo_config import TrainConfig
from agents.rollout import episode_seeds
from envs.catalogue import ACTION_ID, SIM_ACTIONS
from envs.errors import ConfigError
from envs.params import load_sim_params
from envs.scenario import load_scenario
from envs.simulator import PipelineSim


@dataclass
class QuietFigures:
    """Per episode, over all held-out scenarios: quiet steps, the SLO breaches among them, and
    per action the quiet steps it was taken on and, of those, the ones that breached."""

    episodes: int = 0
    quiet_steps: int = 0
    quiet_breaches: int = 0
    acts: Counter[str] = field(default_factory=Counter)
    breached_as_it_acted: Counter[str] = field(default_factory=Counter)

    def per_episode(self, count: int) -> float:
        return count / self.episodes


def quiet_steps(
    policy: LearnedPolicy, cfg: TrainConfig, *, episodes: int, seed: int
) -> QuietFigures:
    """``policy`` on ``episodes`` episodes of each of ``cfg``'s held-out scenarios."""
    if not cfg.held_out:
        raise ConfigError("the config lists no held_out scenarios")
    params = load_sim_params(cfg.env.sim_config)
    out = QuietFigures()
    for path in cfg.held_out:
        scenario = load_scenario(path)
        seeds = episode_seeds(scenario, seed, episodes)
        sim = PipelineSim(scenario, params, n=len(seeds))
        telemetry = sim.reset(seeds)
        policy.reset(EpisodeContext(n=len(seeds), topology=scenario.topology, params=sim.params))
        out.episodes += len(seeds)
        while not sim.done:
            quiet_before = ~sim.fault_active().any(axis=1)
            actions, targets = policy.act(telemetry)
            telemetry = sim.step(actions, targets)
            # Quiet on both sides of the step: a fault that starts on this step is in effect
            # during it, and its breach is not the pipeline's own doing.
            quiet = quiet_before & ~sim.fault_active().any(axis=1)
            breached = quiet & ~sim.history[-1].slo_ok
            out.quiet_steps += int(quiet.sum())
            out.quiet_breaches += int(breached.sum())
            acted = quiet & (actions != ACTION_ID["observe"])
            for i in np.flatnonzero(acted):
                name = SIM_ACTIONS[actions[i]]
                out.acts[name] += 1
                out.breached_as_it_acted[name] += int(breached[i])
    return out
