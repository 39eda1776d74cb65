"""How ready are the learned policies to cure a memory leak, by how far it has climbed?

``pipemedic bench leak`` runs episodes of a scenario with one memory leak and lets nobody act
(every pipeline observes), so every policy is asked about exactly the same states. On each step
the leak is active, it bins the leaking stage's *true* memory (the simulator's, not the noisy
reading) and records, per policy:

- ``p_act``: the top agent's will to act (``hierarchical``: the master's P(``delegate_infra``);
  ``flat``: its acting choices together);
- ``p_cure``: the probability that the policy, sampled, restarts the leaking stage
  (``hierarchical``: P(``delegate_infra``) × the infra specialist's P(restart that stage), the
  two gates a hierarchy puts in series; ``flat``: P(restart that stage));
- ``greedy_cure``: the share of steps on which the greedy decision (what evaluation and serving
  do, under the version's decision rule: a raised hand counts) restarts the leaking stage.

Telemetry can show the leak once true memory is about 61% (``envs.simulator.SHOWN_SIGMAS``);
below that no telemetry-only policy should be expected to act. The observe-only episodes are
off the policies' own path after their first action, which is the point: it compares their
readiness state by state, not their MTTR (``pipemedic evaluate`` measures that).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from agents.inference import ACTING, LearnedPolicy
from agents.policy import EpisodeContext
from agents.rollout import episode_seeds
from envs.catalogue import ACTION_ID, MASTER_ACTIONS
from envs.errors import PipemedicError
from envs.observation import LAYOUTS
from envs.params import SimParams
from envs.scenario import Scenario
from envs.simulator import PipelineSim

#: Edges of the true-memory bins (fractions of the memory limit).
MEMORY_BINS: tuple[float, ...] = (0.50, 0.55, 0.61, 0.70, 0.80, 0.90, 1.01)
_DELEGATE_INFRA = MASTER_ACTIONS.index("delegate_infra")
_RESTART = ACTION_ID["restart_stage"]


@dataclass
class BinFigures:
    """One memory bin: the steps in it and, per policy name, the three figures' sums."""

    low: float
    high: float
    steps: int = 0
    sums: dict[str, np.ndarray] = field(default_factory=dict)

    def mean(self, policy: str) -> tuple[float, float, float]:
        """(p_act, p_cure, greedy_cure) averaged over the bin's steps."""
        p_act, p_cure, greedy = self.sums[policy] / max(self.steps, 1)
        return float(p_act), float(p_cure), float(greedy)


def _check_lone_leak(scenario: Scenario) -> None:
    """A clear error unless the scenario's one fault is a memory leak."""
    faults = [f.type for f in scenario.faults]
    if faults != ["memory_leak"] or scenario.random_faults is not None:
        raise PipemedicError(
            f"scenario {scenario.name!r}: the leak probe needs exactly one scheduled fault, a "
            f"memory_leak, and no random faults; it has {faults}"
            + (" and random faults" if scenario.random_faults is not None else "")
        )


def _figures(policy: LearnedPolicy, stage: np.ndarray) -> np.ndarray:
    """(n, 3): p_act, p_cure, greedy_cure of ``policy`` on its encoder's current state, where
    ``stage`` is the leaking stage's index per pipeline."""
    enc = policy.encoder
    rows = np.arange(enc.n)
    slot = enc.slots[stage]
    d = policy.decide(enc)
    greedy = (d.action == _RESTART) & (d.slot == slot)
    if policy.name == "flat":
        probs, _, _ = policy._probs("flat", enc, rows)
        p_act = probs[:, ACTING["flat"]].sum(axis=1)
        right = np.array([LAYOUTS["flat"].encode("restart_stage", int(s)) for s in slot])
        p_cure = probs[rows, right]
    else:
        p_act = d.master_probs[:, _DELEGATE_INFRA]
        infra, _, _ = policy._probs("infra", enc, rows)
        right = np.array([LAYOUTS["infra"].encode("restart_stage", int(s)) for s in slot])
        p_cure = p_act * infra[rows, right]
    return np.stack([p_act, p_cure, greedy.astype(float)], axis=1)


def leak_readiness(
    policies: Sequence[LearnedPolicy],
    scenario: Scenario,
    *,
    episodes: int,
    seed: int = 0,
    params: SimParams | None = None,
    bins: Sequence[float] = MEMORY_BINS,
) -> list[BinFigures]:
    """The figures of the module docstring per memory bin, for every policy on the same
    observe-only episodes of ``scenario`` (one memory leak, nothing else)."""
    _check_lone_leak(scenario)
    names = [p.name for p in policies]
    if len(set(names)) != len(names):
        raise PipemedicError(f"the leak probe takes each kind once, got {names}")
    seeds = episode_seeds(scenario, seed, episodes)
    sim = PipelineSim(scenario, params, n=len(seeds))
    telemetry = sim.reset(seeds)
    for p in policies:
        p.reset(EpisodeContext(n=len(seeds), topology=scenario.topology, params=sim.params))
    out = [BinFigures(lo, hi) for lo, hi in zip(bins, bins[1:], strict=False)]
    for b in out:
        b.sums = {p.name: np.zeros(3) for p in policies}
    observe = np.full(len(seeds), ACTION_ID["observe"])
    no_stage = np.zeros(len(seeds), dtype=np.int64)
    rows = np.arange(len(seeds))
    while not sim.done:
        truth = sim.ground_truth()
        stage = truth.stages[:, 0]
        memory = sim.mem[rows, stage]
        which = np.searchsorted(bins, memory, side="right") - 1
        counted = truth.active[:, 0] & (which >= 0) & (which < len(out))
        figures = {}
        for p in policies:
            p.encoder.update(telemetry)
            figures[p.name] = _figures(p, stage)
            p.encoder.record_action(observe, no_stage)
        for i in np.flatnonzero(counted):
            b = out[which[i]]
            b.steps += 1
            for name, f in figures.items():
                b.sums[name] += f[i]
        telemetry = sim.step(observe, no_stage)
    return out
