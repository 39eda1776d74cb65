"""The RLlib environments: one simulated pipeline, seen by a hierarchy of agents (or by one).

``PipelineMedicEnv`` (``mode: hierarchical``) is turn-based. One environment simulates
``pipelines`` independent pipelines of one scenario side by side (the simulator is vectorised,
so eight cost about as much as one); pipeline ``i`` has its own agents ``master/i``,
``drift/i``, ``infra/i``, ``quality/i``, and all agents of a role share that role's module.
Every simulated step starts with the ``master`` agent, which sees the whole pipeline and chooses ``delegate_drift``,
``delegate_infra``, ``delegate_quality``, ``observe`` or ``escalate``. ``observe`` and
``escalate`` are carried out at once and the simulator advances 10 s. A delegation hands the
same moment to that specialist (``drift``, ``infra`` or ``quality``): it sees its domain's view
and chooses a concrete (action, stage); then the simulator advances. So one simulated step is
one environment step (no master delegated) or two, and only agents whose turn it is receive an
observation.

``mode: flat`` is the ablation: one agent, ``flat``, chooses any (action, stage) of the
simulator directly every step, from the master's full view.

Rewards (weights in ``RewardWeights``, set in ``configs/train.yaml``)
    master / flat, every simulated step, for the pipeline as a whole:
        − slo·[any SLO breached] − open·(faults open) − lost·(records lost / records per step)
        − cost·(replica and action cost)
    a specialist, on the step it acts, for what its own action did:
        + cure·[the action addressed an open fault with no fix under way]
        − (the step's slo, lost and cost terms above − the same terms had it observed)
        − specialist_open·(faults of its own domain open after the step, no cure under way;
          0 by default, and then a specialist loses nothing by waiting to be asked again)
    The second term is measured, not modelled: the simulator runs the step a second time with
    ``observe`` in place of the specialists' actions and the same random numbers
    (``PipelineSim.counterfactual_rollout``), so a restart's downtime or a failover's halved
    capacity is charged to the specialist that chose it. A replica added or removed
    (``scale_out``, ``scale_in``) outlasts its step: with ``rewards.capacity_credit_steps: H``
    its difference is summed over H steps, both branches observing after the first.
    ``rewards.specialist_credit: direct``
    charges only the action's own cost and the records it dropped, as training did before
    2026-12-07; that let PPO teach the infra specialist that restarts and failovers on quiet
    steps cost nothing (README).
    "Faults open" and "addressed" come from the simulator's ground truth: the reward may know
    what the observation does not, which is what makes the simulator a teacher.

Episodes come from ``ScenarioMix``: the training scenario files plus scenarios drawn from the
random fault generator. Held-out evaluation scenarios are never in the mix (``cluster.train``
refuses a config that lists one in both).
"""

from __future__ import annotations

from typing import Any, Literal

import gymnasium as gym
import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from ray.rllib.env.multi_agent_env import MultiAgentEnv

from envs.catalogue import (
    ACTION_ID,
    DOMAINS,
    FAULT_DOMAIN_INDEX,
    MASTER_ACTIONS,
    SIM_ACTIONS,
)
from envs.observation import LAYOUTS, OBS_BOUND, ObservationEncoder, observation_size
from envs.params import STEP_SECONDS, SimParams
from envs.scenario import Load, RandomBursts, RandomFaults, Scenario
from envs.simulator import PipelineSim, StepOutcome

MASTER = "master"
FLAT = "flat"
HIERARCHICAL_AGENTS: tuple[str, ...] = (MASTER, *DOMAINS)
# Actions whose effect (a replica more or less) outlasts their step: rewards.capacity_credit_steps.
_CAPACITY_ACTIONS = [ACTION_ID["scale_out"], ACTION_ID["scale_in"]]
_DOMAIN_OF_FAULT = np.array(FAULT_DOMAIN_INDEX)


class RewardWeights(BaseModel):
    """Weights of the reward terms (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    slo: float = Field(0.2, ge=0, description="per step with any SLO breached")
    open: float = Field(0.2, ge=0, description="per open fault per step (drives MTTR down)")
    lost: float = Field(0.5, ge=0, description="per step's worth of records lost")
    cost: float = Field(0.01, ge=0, description="per unit of cost (replicas, actions)")
    cure: float = Field(1.0, ge=0, description="specialist: action addressed an open fault")
    specialist_credit: Literal["counterfactual", "direct"] = Field(
        "counterfactual",
        description="how a specialist is charged for its action: counterfactual, the step's "
        "SLO, records-lost and cost terms minus those of the same step had it observed; "
        "direct (before 2026-12-07), only the action's own cost and the records it dropped",
    )
    specialist_open: float = Field(
        0.0,
        ge=0,
        description="specialist, on a step it is asked: per fault of its own domain open after "
        "the step with no cure under way, so leaving one alone costs it what a step of it costs "
        "the master (0: off; its credit then puts no price on waiting)",
    )
    capacity_credit_steps: int = Field(
        1,
        ge=1,
        description="counterfactual credit of scale_out and scale_in, whose replica outlasts "
        "the step: the difference over this many steps, the later ones observed in both "
        "branches (1: the action's own step only)",
    )


class RandomTraining(BaseModel):
    """Scenarios drawn from the random fault generator for training."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    share: float = Field(0.5, ge=0, le=1, description="share of episodes drawn at random")
    rate_per_hour: float = Field(6.0, gt=0)
    duration_steps: int = Field(180, ge=10)
    bursts_per_hour: float = Field(
        0.0,
        ge=0,
        description="traffic bursts that are not faults: the random scenarios' random_bursts "
        "at this rate, with envs.scenario.RandomBursts' default ranges",
    )


class EnvConfig(BaseModel):
    """``env_config`` of the environment. Scenarios and physics are values, not file paths, so
    env runners on other machines need no access to the driver's files
    (``agents.ppo_config.TrainConfig.env_config`` reads the files)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["hierarchical", "flat"] = "hierarchical"
    sim: SimParams = SimParams()
    scenarios: tuple[Scenario, ...] = Field((), description="training scenarios")
    random: RandomTraining = RandomTraining()
    max_episode_steps: int | None = Field(
        200,
        ge=10,
        description="cut training scenarios to this many steps (quiet tails teach little)",
    )
    rewards: RewardWeights = RewardWeights()
    pipelines: int = Field(8, ge=1, description="pipelines simulated side by side per env")


class ScenarioMix:
    """Draws the scenario of each training episode: a training file or a random one."""

    def __init__(self, cfg: EnvConfig):
        self.files = list(cfg.scenarios)
        if cfg.max_episode_steps:
            cap = cfg.max_episode_steps
            self.files = [
                s.model_copy(update={"duration_steps": min(s.duration_steps, cap)})
                for s in self.files
            ]
        self.random = cfg.random
        if not self.files and self.random.share == 0:
            raise ValueError("env config: no training scenarios and random.share is 0")

    def draw(self, rng: np.random.Generator) -> Scenario:
        if not self.files or rng.random() < self.random.share:
            steps = self.random.duration_steps
            pattern = "diurnal" if rng.random() < 0.5 else "flat"
            return Scenario(
                name="random-training",
                duration_steps=steps,
                load=Load(pattern=pattern),
                **self.random_events(),
            )
        return self.files[int(rng.integers(len(self.files)))]

    def random_events(self) -> dict[str, Any]:
        """The ``random_faults`` and ``random_bursts`` of a random training scenario. The
        simulator draws them per episode and pipeline. Bursts are traffic with no fault behind
        it: a policy that has only ever seen load jump during a ``traffic_surge`` fault learns
        to throttle (shed records) where capacity is the answer."""
        bursts = self.random.bursts_per_hour
        return {
            "random_faults": RandomFaults(rate_per_hour=self.random.rate_per_hour),
            "random_bursts": RandomBursts(rate_per_hour=bursts) if bursts > 0 else None,
        }


class PipelineMedicEnv(MultiAgentEnv):
    """``pipelines`` simulated pipelines of one scenario per environment; see the module
    docstring. Agent ids are ``ROLE/i`` (``master/0``, ``infra/3``, ``flat/1``): pipeline ``i``'s
    agent in that role. All agents of one role share one module (``module_of``)."""

    def __init__(self, config: dict[str, Any] | EnvConfig | None = None):
        super().__init__()
        cfg = config if isinstance(config, EnvConfig) else EnvConfig.model_validate(config or {})
        self.cfg = cfg
        self.params = cfg.sim
        self.mix = ScenarioMix(cfg)
        self.w = cfg.rewards
        self.k = cfg.pipelines
        self.roles = HIERARCHICAL_AGENTS if cfg.mode == "hierarchical" else (FLAT,)
        self.top = self.roles[0]
        agents = [agent_id(r, i) for r in self.roles for i in range(self.k)]
        self.possible_agents = list(agents)
        self.agents = list(agents)
        self.observation_spaces = {a: _obs_space(module_of(a)) for a in agents}
        self.action_spaces = {a: gym.spaces.Discrete(LAYOUTS[module_of(a)].size) for a in agents}
        self._action_cost = np.array([self.params.action_cost[a] for a in SIM_ACTIONS])
        self._rng = np.random.default_rng()
        self.sim: PipelineSim | None = None

    # ------------------------------------------------------------------ gym API
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        scenario = (options or {}).get("scenario") or self.mix.draw(self._rng)
        self.scenario = scenario
        self.sim = PipelineSim(scenario, self.params, n=self.k)
        tel = self.sim.reset([int(x) for x in self._rng.integers(2**31, size=self.k)])
        self.telemetry = tel  # the latest snapshot, for baselines that drive this env
        self.encoder = ObservationEncoder(scenario.topology, self.params, n=self.k)
        self.encoder.update(tel)
        self._records_per_step = scenario.load.base_rps * STEP_SECONDS
        self._acted: set[str] = set()
        self._pending = np.full(self.k, ACTION_ID["observe"], dtype=np.int64)
        self._pending_stage = np.zeros(self.k, dtype=np.int64)
        self._specialist_of = np.full(self.k, -1, dtype=np.int64)  # index into DOMAINS
        return self._observations(self.top, range(self.k)), {}

    def step(self, action_dict: dict[str, Any]):
        if self.sim is None:
            raise RuntimeError("call reset() before step()")
        self._acted.update(action_dict)
        by_role: dict[str, list[tuple[int, int]]] = {}
        for aid, action in action_dict.items():
            role, i = split_agent_id(aid)
            by_role.setdefault(role, []).append((i, int(action)))
        if MASTER in by_role:
            delegated: dict[str, list[int]] = {}
            for i, action in by_role[MASTER]:
                choice = MASTER_ACTIONS[action]
                if choice.startswith("delegate_"):
                    domain = choice.removeprefix("delegate_")
                    delegated.setdefault(domain, []).append(i)
                    self._specialist_of[i] = DOMAINS.index(domain)
                else:
                    self._pending[i] = ACTION_ID[choice]
            if delegated:
                obs = {}
                for domain, rows in delegated.items():
                    obs.update(self._observations(domain, rows))
                return obs, {}, _all(False), _all(False), {}
        for role, pairs in by_role.items():
            if role == MASTER:
                continue
            rows = np.array([i for i, _ in pairs])
            sim_action, stage = self.encoder.to_sim(role, np.array([a for _, a in pairs]))
            self._pending[rows] = sim_action
            self._pending_stage[rows] = stage
        return self._advance()

    # ------------------------------------------------------------------ internals
    def _step_penalty(self, out: StepOutcome) -> np.ndarray:
        """The SLO, records-lost and cost terms of one step's reward, per pipeline, as a
        positive penalty (the whole-pipeline reward adds the open-fault term)."""
        w = self.w
        return (
            w.slo * ~out.slo_ok
            + w.lost * out.records_lost / self._records_per_step
            + (w.cost * out.cost)
        )

    def _later_harm(self, without: list[StepOutcome]) -> np.ndarray:
        """The penalty of the steps after this one had the acting specialists' actions been
        taken, minus ``without``'s, the same steps had they observed; every pipeline observes
        in both. Called just after the real step, whose state is the first branch's."""
        observing = np.full(self.k, ACTION_ID["observe"], dtype=np.int64)
        stages = np.zeros(self.k, dtype=np.int64)
        kept = self.sim.counterfactual_rollout(observing, stages, len(without))
        return sum(self._step_penalty(o) for o in kept) - sum(
            self._step_penalty(o) for o in without
        )

    def _advance(self):
        sim, w, k = self.sim, self.w, self.k
        actions, stages = self._pending, self._pending_stage
        open_before = sim.fault_active().sum(axis=1)
        acted = np.flatnonzero(self._specialist_of >= 0) if self.top == MASTER else []
        counterfactual: list[StepOutcome] = []
        lasting = np.zeros(k, dtype=bool)  # pipelines whose specialist added or removed a replica
        if len(acted) and w.specialist_credit == "counterfactual":
            waiting = actions.copy()
            waiting[acted] = ACTION_ID["observe"]
            lasting[acted] = np.isin(actions[acted], _CAPACITY_ACTIONS)
            horizon = w.capacity_credit_steps if lasting.any() else 1
            counterfactual = sim.counterfactual_rollout(waiting, stages, horizon)
        tel = sim.step(actions, stages)
        self.telemetry = tel
        self.encoder.record_action(actions, self.encoder.slots[stages])
        self.encoder.update(tel)
        out = sim.history[-1]
        penalty = self._step_penalty(out)
        open_now = sim.fault_active().sum(axis=1)
        whole = -(penalty + w.open * 0.5 * (open_before + open_now))
        rewards = {agent_id(self.top, i): float(whole[i]) for i in range(k)}
        if len(acted):
            if counterfactual:
                harm = penalty - self._step_penalty(counterfactual[0])
                if len(counterfactual) > 1:
                    harm += np.where(lasting, self._later_harm(counterfactual[1:]), 0.0)
            else:
                harm = (
                    w.cost * self._action_cost[actions]
                    + w.lost * sim.last_action_dropped / self._records_per_step
                )
            own = w.cure * sim.last_action_addressed - harm
            if w.specialist_open:
                own = own - w.specialist_open * self._domain_open(self._specialist_of)
            for i in acted:
                rewards[agent_id(DOMAINS[self._specialist_of[i]], i)] = float(own[i])
        self._pending = np.full(k, ACTION_ID["observe"], dtype=np.int64)
        self._pending_stage = np.zeros(k, dtype=np.int64)
        self._specialist_of = np.full(k, -1, dtype=np.int64)
        if sim.done:
            # Every agent that took part gets a final observation, so its last action is closed.
            obs = {}
            for role in self.roles:
                rows = [i for i in range(k) if agent_id(role, i) in self._acted or role == self.top]
                obs.update(self._observations(role, rows))
            return obs, rewards, _all(False), _all(True), {}
        return self._observations(self.top, range(k)), rewards, _all(False), _all(False), {}

    def _domain_open(self, domain: np.ndarray) -> np.ndarray:
        """Per pipeline, the faults open now with no cure under way whose domain is
        ``domain[i]`` (an index into DOMAINS; -1 counts none)."""
        truth = self.sim.ground_truth()
        own = _DOMAIN_OF_FAULT[truth.types] == domain[:, None]
        return (truth.active & ~truth.cure_pending & own).sum(axis=1)

    def _observations(self, role: str, rows) -> dict[str, dict[str, np.ndarray]]:
        rows = list(rows)
        if not rows:
            return {}
        view = MASTER if role in (MASTER, FLAT) else role
        obs = np.clip(self.encoder.observe(view)[rows], -OBS_BOUND, OBS_BOUND)
        mask = self.encoder.action_mask(role)[rows]
        return {
            agent_id(role, i): {"observations": obs[j], "action_mask": mask[j]}
            for j, i in enumerate(rows)
        }


def agent_id(role: str, pipeline: int) -> str:
    return f"{role}/{pipeline}"


def split_agent_id(aid: str) -> tuple[str, int]:
    role, _, i = aid.partition("/")
    return role, int(i)


def module_of(aid: str) -> str:
    """The module (and role) an agent id maps to: ``infra/3`` → ``infra``."""
    return aid.partition("/")[0]


def _all(value: bool) -> dict[str, bool]:
    return {"__all__": value}


def _obs_space(agent: str) -> gym.spaces.Dict:
    view = MASTER if agent in (MASTER, FLAT) else agent
    return gym.spaces.Dict(
        {
            "observations": gym.spaces.Box(
                -OBS_BOUND, OBS_BOUND, (observation_size(view),), np.float32
            ),
            "action_mask": gym.spaces.Box(0.0, 1.0, (LAYOUTS[agent].size,), np.float32),
        }
    )
