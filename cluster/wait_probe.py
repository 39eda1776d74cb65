"""Where does a learned policy wait while its teacher would act?

``pipemedic bench waits`` runs a trained policy in the training environment as one DAgger round
of the warm start with no teacher steps does (``agents.warm_start.collect``, teacher share 0:
the student acts, master and specialists alike, greedy on its own networks; a version's decision
rule, a raised hand or a delegation gate, is not applied: the figures are the master network's own). On every step its top agent (``master`` or
``flat``) decides, the warm start's teacher is asked too, on the faults telemetry shows
(``warm_start.teacher_waits``). Per concrete action the teacher chose, it counts those steps
and the share of them on which the top agent's greedy choice was ``observe``. It runs
``env.pipelines`` pipelines per environment, not the warm start's ``warm_start.pipelines``:
every episode is one scenario for all its pipelines, and more episodes cover more scenarios.

That share is the first gate of a cure: a master that observes there never asks a specialist.
The steps are the student's own, so a policy that waits longer meets more of them; compare the
shares, not the counts. The figures answer the question the README asks of the hierarchy's
leaks, whether it is the master that waits, for every fault type at once.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from agents.inference import AGENTS_OF_KIND, LearnedPolicy
from agents.ppo_config import TrainConfig
from agents.warm_start import collect
from envs.catalogue import SIM_ACTIONS
from envs.errors import ConfigError
from envs.observation import LAYOUTS


@dataclass(frozen=True)
class WaitFigures:
    """One teacher action: the top agent's steps where the teacher chose it, and how many of
    them the top agent observed on."""

    action: str
    steps: int
    waited: int

    @property
    def share(self) -> float:
        return self.waited / self.steps  # a row exists only where the teacher acted


@torch.no_grad()
def waiting_by_teacher_action(
    policy: LearnedPolicy, cfg: TrainConfig, *, steps: int, seed: int
) -> list[WaitFigures]:
    """Per teacher action other than ``observe`` (most common first): the top agent's steps
    and its greedy waits, on ``steps`` simulated pipeline steps of ``cfg``'s training mix."""
    if cfg.kind != policy.name:
        raise ConfigError(f"the config is for {cfg.kind!r}, the policy is {policy.name!r}")
    ws = cfg.warm_start
    samples, _ = collect(
        cfg.env_config(),
        policy.nets,
        steps=steps,
        teacher_share=0.0,
        pipelines=cfg.env.pipelines,
        seed=seed,
        teacher=ws.teacher,
        teacher_waits=ws.teacher_waits,
        specialists_wait=ws.specialists_wait,
    )
    top = AGENTS_OF_KIND[policy.name][0]  # master or flat
    s = samples[top]
    if not s.label:
        return []
    obs = torch.from_numpy(np.asarray(s.obs, dtype=np.float32))
    mask = torch.from_numpy(np.asarray(s.mask, dtype=np.float32))
    greedy = policy.nets[top].logits(obs, mask).argmax(dim=1).numpy()
    observed = greedy == LAYOUTS[top].encode("observe")
    teacher = np.asarray(s.teacher_action)
    counts = Counter(int(a) for a in teacher if SIM_ACTIONS[a] != "observe")
    return [
        WaitFigures(SIM_ACTIONS[a], n, int(observed[teacher == a].sum()))
        for a, n in counts.most_common()
    ]
