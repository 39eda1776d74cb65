"""A vectorised simulator of many data/ML pipelines with injected faults.

``PipelineSim`` steps ``n`` pipelines of one scenario at once; all state is NumPy arrays with a
leading pipeline axis, so one step costs the same few hundred array operations whether it
simulates one pipeline or a thousand (there is a loop over the 4-5 stages, never over records).

Spec sheet
    step            10 simulated seconds (``STEP_SECONDS``).
    action          per pipeline, one of ``SIM_ACTIONS`` (int) applied to one stage of the
                    topology (int index). ``observe`` ignores the stage.
    observation     :class:`envs.telemetry.Telemetry`: per-stage and pipeline-wide metrics with
                    log-normal noise and randomly missing values; accuracy arrives late.
    termination     none; an episode is truncated after ``scenario.duration_steps`` steps.
    randomness      per episode, the fault schedule and the random traffic bursts come from
                    its own generator seeded by the episode seed, so every policy meets the
                    same faults and the same busy periods; the dynamics (traffic
                    noise, cure success, telemetry noise) come from one generator per batch.

Physics, per stage in topological order: records arrive from the parent stage (ingest: the
scenario's traffic), wait in a bounded queue, and are processed up to the stage's capacity
(ready replicas x per-replica capacity, reduced by CPU contention, garbage collection and
downtime). A share of attempts fail; failed records are lost unless ``retry_backoff`` is on,
in which case they go back to the queue. Queues beyond ``max_queue_s`` of traffic drop records.
Data carries fault-induced bad-record shares (nulls, duplicates, out-of-range, corrupt) down the
DAG; what reaches a sink bad counts as lost, as do wrong predictions of a degraded model.
See the README's simulator section for every fault's symptoms, cures and harms.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from envs.catalogue import (
    ACTION_ID,
    CURES,
    FAULT_ID,
    FAULT_TYPES,
    MODEL_STAGE,
    SIM_ACTIONS,
    best_cure,
    cure_for,
)
from envs.metrics import EpisodeMetrics, Incident, episode_metrics
from envs.params import STEP_SECONDS, SimParams
from envs.scenario import (
    NEVER,
    Burst,
    FaultSchedule,
    Scenario,
    draw_bursts,
    draw_fault_schedule,
)
from envs.telemetry import PIPELINE_METRICS, STAGE_INDEX, STAGE_METRICS, Telemetry

_A = ACTION_ID
_F = FAULT_ID
_N_FAULT_TYPES = len(FAULT_TYPES)
_N_ACTIONS = len(SIM_ACTIONS)
DAY_STEPS = int(24 * 3600 / STEP_SECONDS)
# A stage's memory use when nothing leaks: it starts here, settles back here, and a restart or
# an OOM kill puts it back here.
HEALTHY_MEMORY = 0.5
# How far above healthy (in telemetry noise sigmas) a leak's memory must be to count as shown
# (``ground_truth(shown_only=True)``): one reading that high is a 1-in-44 accident on a healthy stage.
SHOWN_SIGMAS = 2.0


@dataclass(frozen=True)
class Topology:
    """The DAG of a scenario: data stages form a chain; ``model`` reads from the last stage
    before ``load``."""

    stages: tuple[str, ...]

    @property
    def parent(self) -> tuple[int, ...]:
        data = [i for i, s in enumerate(self.stages) if s != MODEL_STAGE]
        parents = [-1] * len(self.stages)
        for prev, cur in zip(data, data[1:], strict=False):
            parents[cur] = prev
        if MODEL_STAGE in self.stages:
            feeder = data[-2] if len(data) >= 2 else data[0]
            parents[self.stages.index(MODEL_STAGE)] = feeder
        return tuple(parents)

    @property
    def reach(self) -> np.ndarray:
        """``reach[a, b]`` is True when data flows from stage ``a`` to stage ``b`` (or a == b)."""
        n = len(self.stages)
        reach = np.eye(n, dtype=bool)
        for b in range(n):
            p = self.parent[b]
            while p >= 0:
                reach[p, b] = True
                p = self.parent[p]
        return reach

    def index(self, stage: str) -> int:
        return self.stages.index(stage)


def _cure_tables(topo: Topology) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dense lookup tables of the cure sets for this topology.

    Returns ``prob[type, action]``, ``delay[type, action]`` and
    ``target_ok[type, action, fault_stage, target_stage]``.
    """
    n_stages = len(topo.stages)
    prob = np.zeros((_N_FAULT_TYPES, _N_ACTIONS))
    delay = np.zeros((_N_FAULT_TYPES, _N_ACTIONS), dtype=np.int64)
    target_ok = np.zeros((_N_FAULT_TYPES, _N_ACTIONS, n_stages, n_stages), dtype=bool)
    model = topo.stages.index(MODEL_STAGE) if MODEL_STAGE in topo.stages else -1
    for fault, cures in CURES.items():
        f = _F[fault]
        for cure in cures:
            a = _A[cure.action]
            prob[f, a] = cure.probability
            delay[f, a] = cure.delay_steps
            for fs in range(n_stages):
                if cure.target == "fault_stage":
                    target_ok[f, a, fs, fs] = True
                elif cure.target == "model" and model >= 0:
                    target_ok[f, a, fs, model] = True
                elif cure.target == "fault_stage_or_downstream":
                    target_ok[f, a, fs, :] = topo.reach[fs]
    return prob, delay, target_ok


@dataclass(frozen=True)
class GroundTruth:
    """The simulator's true fault state, shape (n, f_max) each: for the oracle only."""

    active: np.ndarray
    types: np.ndarray  # index into FAULT_TYPES
    stages: np.ndarray  # index into the topology
    cure_pending: np.ndarray  # a cure has been applied and will take effect


@dataclass
class StepOutcome:
    """What one step did, per pipeline (for metrics and rewards)."""

    slo_ok: np.ndarray  # bool (n,)
    records_lost: np.ndarray  # float (n,): dropped + failed-not-retried + bad delivered
    cost: np.ndarray  # float (n,)
    escalated: np.ndarray  # bool (n,): a human was paged this step


class PipelineSim:
    """``n`` pipelines of one scenario, stepped together. See the module docstring."""

    def __init__(self, scenario: Scenario, params: SimParams | None = None, *, n: int = 1):
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        self.scenario = scenario
        self.params = params or SimParams()
        self.n = n
        self.topo = Topology(scenario.topology)
        self.n_stages = len(self.topo.stages)
        self._parent = self.topo.parent
        self._reach = self.topo.reach
        self._cure_prob, self._cure_delay, self._cure_target_ok = _cure_tables(self.topo)
        self._model = self.topo.index(MODEL_STAGE) if MODEL_STAGE in self.topo.stages else -1
        self._load = self.topo.index("load")
        # Stages on the data path (ingest..load) and on the model path (ingest..feeder, model).
        self._data_path = [i for i, s in enumerate(self.topo.stages) if s != MODEL_STAGE]
        self._model_path = []
        if self._model >= 0:
            p = self._model
            while p >= 0:
                self._model_path.append(p)
                p = self._parent[p]
        headroom = np.array([self.params.headroom[s] for s in self.topo.stages])
        self._cap_per_replica = scenario.load.base_rps * headroom / self.params.replicas
        self._best_cure_action = np.array(
            [_A[best_cure(f).action] for f in FAULT_TYPES], dtype=np.int64
        )
        self._best_cure_delay = np.array([best_cure(f).delay_steps for f in FAULT_TYPES])
        self._action_cost = np.array([self.params.action_cost[a] for a in SIM_ACTIONS])
        # A retrain deploys a fresh model when it finishes, however it was triggered.
        self._retrain_steps = cure_for("data_drift", "retrain_model").delay_steps
        self.t = 0

    # ------------------------------------------------------------------ episode control
    def reset(self, seeds: Sequence[int]) -> Telemetry:
        """Start new episodes, one per seed; returns the first observation."""
        if len(seeds) != self.n:
            raise ValueError(f"reset needs {self.n} seeds, one per pipeline; got {len(seeds)}")
        p, n, S = self.params, self.n, self.n_stages
        self.rng = np.random.default_rng([*map(int, seeds), 0x5EED])
        # One generator per episode seed: faults first, then bursts, so a scenario without
        # random bursts meets exactly the faults it met before they existed.
        episode_rngs = [np.random.default_rng(int(s)) for s in seeds]
        self._set_faults([draw_fault_schedule(self.scenario, r) for r in episode_rngs])
        self._set_bursts([draw_bursts(self.scenario, r) for r in episode_rngs])
        self.t = 0
        self.replicas = np.full((n, S), p.replicas, dtype=np.int64)
        self.queue = np.zeros((n, S))
        self.backlog = np.zeros((n, S))  # records held back by throttle, admitted later
        self.mem = np.full((n, S), HEALTHY_MEMORY)
        self.retry_until = np.zeros((n, S), dtype=np.int64)
        self.dedupe_until = np.zeros((n, S), dtype=np.int64)
        self.throttle_until = np.zeros((n, S), dtype=np.int64)
        self.down_until = np.zeros((n, S), dtype=np.int64)
        self.half_until = np.zeros((n, S), dtype=np.int64)  # failover: half capacity
        self.replay_until = np.zeros((n, S), dtype=np.int64)
        self.replay_is_dup = np.zeros((n, S), dtype=bool)
        self.stale_s = np.zeros(n)
        self.rollback_penalty = np.zeros(n)
        self.retrain_done_at = np.full(n, NEVER, dtype=np.int64)
        self.model_age = self.rng.integers(2_000, 20_000, size=n).astype(np.float64)
        self.human_at = np.full(n, NEVER, dtype=np.int64)
        self._acc_history = np.full((p.label_delay_steps + 1, n), p.base_accuracy)
        self.history: list[StepOutcome] = []
        self._last_action_cost = np.zeros(n)
        self._escalated = np.zeros(n, dtype=bool)
        self._dropped_by_action = np.zeros(n)
        self.last_action_addressed = np.zeros(n, dtype=bool)
        return self._simulate_and_observe()

    def _set_faults(self, schedules: list[FaultSchedule]) -> None:
        n = self.n
        f_max = max(1, max(len(s) for s in schedules))
        self.f_type = np.zeros((n, f_max), dtype=np.int64)
        self.f_stage = np.zeros((n, f_max), dtype=np.int64)
        self.f_onset = np.full((n, f_max), NEVER, dtype=np.int64)
        self.f_sev = np.zeros((n, f_max))
        self.f_end = np.full((n, f_max), NEVER, dtype=np.int64)
        self.f_valid = np.zeros((n, f_max), dtype=bool)
        for b, s in enumerate(schedules):
            k = len(s)
            self.f_type[b, :k] = s.types
            self.f_stage[b, :k] = s.stages
            self.f_onset[b, :k] = s.onsets
            self.f_sev[b, :k] = s.severities
            self.f_end[b, :k] = s.ends
            self.f_valid[b, :k] = True
        self.f_clear_at = np.full((n, f_max), NEVER, dtype=np.int64)  # a cure will take effect
        self.f_cleared_at = np.full((n, f_max), NEVER, dtype=np.int64)
        self.f_first_cure_at = np.full((n, f_max), NEVER, dtype=np.int64)
        # One-hot of (fault slot -> type, stage) to turn faults into effects with one einsum.
        self._f_type_onehot = np.eye(_N_FAULT_TYPES)[self.f_type] * self.f_valid[..., None]
        self._f_stage_onehot = np.eye(self.n_stages)[self.f_stage]

    def _set_bursts(self, bursts: list[tuple[Burst, ...]]) -> None:
        """Each pipeline's traffic bursts as (n, b_max) arrays; padding never starts."""
        b_max = max(1, max(len(b) for b in bursts))
        self.burst_start = np.full((self.n, b_max), NEVER, dtype=np.int64)
        self.burst_end = np.full((self.n, b_max), NEVER, dtype=np.int64)
        self.burst_factor = np.ones((self.n, b_max))
        for i, pipeline_bursts in enumerate(bursts):
            for j, burst in enumerate(pipeline_bursts):
                self.burst_start[i, j] = burst.at
                self.burst_end[i, j] = burst.at + burst.duration
                self.burst_factor[i, j] = burst.factor

    @property
    def done(self) -> bool:
        """True once the episode's last step has been simulated (truncation)."""
        return self.t >= self.scenario.duration_steps

    def fault_active(self) -> np.ndarray:
        """Ground truth (n, f_max): which fault slots are active now. Only the oracle and the
        metrics may look at this."""
        t = self.t
        return self.f_valid & (self.f_onset <= t) & (t < self.f_end) & (self.f_cleared_at > t)

    def ground_truth(self, *, shown_only: bool = False) -> GroundTruth:
        """The true faults right now. Only the oracle and the tests may look at this.

        ``shown_only`` reports as inactive the faults that telemetry cannot show yet, so a
        teacher that reads this one acts when a telemetry-only agent could. Today that covers
        the one fault whose onset is hidden in the noise for many steps: a memory leak, until
        its stage's true memory is ``SHOWN_SIGMAS`` noise sigmas above the healthy level (with
        the default 0.1 noise, 61% against 50%; it climbs 2 points × severity a step). A restart
        that did not cure the leak puts memory back to healthy, which hides it again."""
        active = self.fault_active()
        if shown_only:
            shown_at = HEALTHY_MEMORY * np.exp(SHOWN_SIGMAS * self.params.telemetry_noise)
            rows = np.arange(self.n)[:, None]
            memory = self.mem[rows, self.f_stage]
            hidden = (self.f_type == _F["memory_leak"]) & (memory < shown_at)
            active = active & ~hidden
        return GroundTruth(
            active=active,
            types=self.f_type,
            stages=self.f_stage,
            cure_pending=self.f_clear_at != NEVER,
        )

    def episode_metrics(self) -> list[EpisodeMetrics]:
        """Per pipeline, the metrics of the episode so far (normally called once it is done)."""
        slo = np.stack([h.slo_ok for h in self.history])
        lost = np.stack([h.records_lost for h in self.history])
        cost = np.stack([h.cost for h in self.history])
        esc = np.stack([h.escalated for h in self.history])
        last = len(self.history) - 1

        def when(step: int) -> int | None:
            return None if step > last else int(step)

        result = []
        for b in range(self.n):
            incidents = [
                Incident(
                    fault=FAULT_TYPES[self.f_type[b, k]],
                    onset=int(self.f_onset[b, k]),
                    cleared=when(self.f_cleared_at[b, k]),
                    first_cure=when(self.f_first_cure_at[b, k]),
                )
                for k in range(self.f_type.shape[1])
                if self.f_valid[b, k] and self.f_onset[b, k] <= last
            ]
            result.append(
                episode_metrics(
                    slo_ok=slo[:, b],
                    records_lost=lost[:, b],
                    cost=cost[:, b],
                    escalations=esc[:, b],
                    incidents=incidents,
                )
            )
        return result

    # ------------------------------------------------------------------ stepping
    def step(self, actions: np.ndarray, targets: np.ndarray) -> Telemetry:
        """Apply one action per pipeline to its target stage, then simulate 10 s."""
        actions = np.asarray(actions, dtype=np.int64)
        targets = np.asarray(targets, dtype=np.int64)
        if actions.shape != (self.n,) or targets.shape != (self.n,):
            raise ValueError(f"actions and targets must have shape ({self.n},)")
        if actions.min() < 0 or actions.max() >= _N_ACTIONS:
            raise ValueError(f"action ids must be in [0, {_N_ACTIONS}); got {actions}")
        if targets.min() < 0 or targets.max() >= self.n_stages:
            raise ValueError(f"target stages must be in [0, {self.n_stages}); got {targets}")
        if self.done:
            raise RuntimeError("episode is over; call reset() first")
        self.t += 1
        self._apply_actions(actions, targets)
        return self._simulate_and_observe()

    def counterfactual_rollout(
        self, actions: np.ndarray, targets: np.ndarray, steps: int = 1
    ) -> list[StepOutcome]:
        """The outcomes (SLO, records lost, cost) of ``step(actions, targets)`` followed by
        ``steps - 1`` steps in which every pipeline observes (fewer where the episode ends
        first), leaving the simulator exactly as it was, its random generator included: a
        following ``step`` draws the same numbers it would have drawn. Training uses it to
        credit a specialist with what its own action did (``envs.multi_agent_env``), over more
        than one step for a replica added or removed. The state arrays are put back as copies:
        a reference to ``sim.queue`` taken before the call sees the hypothetical values."""
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        saved = {k: v.copy() if isinstance(v, np.ndarray) else v for k, v in vars(self).items()}
        rng_state = self.rng.bit_generator.state
        steps_done = len(self.history)
        waiting = np.full(self.n, _A["observe"], dtype=np.int64)
        try:
            self.step(actions, targets)
            for _ in range(steps - 1):
                if self.done:
                    break
                self.step(waiting, targets)
            return self.history[steps_done:]
        finally:
            del self.history[steps_done:]
            for name in set(vars(self)) - set(saved):  # first set by this step
                delattr(self, name)
            vars(self).update(saved)
            self.rng.bit_generator.state = rng_state

    def _apply_actions(self, a: np.ndarray, s: np.ndarray) -> None:
        p, t, rows = self.params, self.t, np.arange(self.n)
        self._last_action_cost = self._action_cost[a]

        # Cures: which active faults does this action address, and does it work?
        active = self.fault_active()
        ft, fs = self.f_type, self.f_stage
        addresses = self._cure_target_ok[ft, a[:, None], fs, s[:, None]] & active
        self.f_first_cure_at = np.where(
            addresses & (self.f_first_cure_at == NEVER), t, self.f_first_cure_at
        )
        # For rewards: did this action address an active fault that had no cure under way?
        self.last_action_addressed = (addresses & (self.f_clear_at == NEVER)).any(axis=1)
        works = addresses & (self.rng.random(addresses.shape) < self._cure_prob[ft, a[:, None]])
        self.f_clear_at = np.where(
            works,
            np.minimum(self.f_clear_at, t + self._cure_delay[ft, a[:, None]]),
            self.f_clear_at,
        )

        # Side effects of each action, whatever the fault.
        def at(action: str) -> tuple[np.ndarray, np.ndarray]:
            hit = a == _A[action]
            return rows[hit], s[hit]

        b, st = at("scale_out")
        self.replicas[b, st] = np.minimum(self.replicas[b, st] + 1, p.max_replicas)
        b, st = at("scale_in")
        self.replicas[b, st] = np.maximum(self.replicas[b, st] - 1, 1)
        b, st = at("restart_stage")
        self._drop_queue(b, st)
        self.down_until[b, st] = t + 1
        self.mem[b, st] = HEALTHY_MEMORY
        b, st = at("failover")
        self.half_until[b, st] = t + 1
        b, st = at("retry_backoff")
        self.retry_until[b, st] = t + p.retry_window_steps
        b, st = at("deduplicate")
        self.dedupe_until[b, st] = t + p.dedupe_window_steps
        b, st = at("throttle")
        self.throttle_until[b, st] = t + p.throttle_window_steps
        b, st = at("quarantine_batch")
        self.queue[b, st] = 0.0  # set aside for review: not delivered, not counted lost
        b, st = at("replay_from_backup")
        self.replay_until[b, st] = t + p.replay_steps
        # A replay restores data only when something was missing or corrupt at that stage;
        # otherwise it re-sends records that were already delivered. Only pipelines that
        # replay this step are looked at: this runs every step.
        restores = (ft[b] == _F["late_data"]) | (ft[b] == _F["corrupt_batch"])
        self.replay_is_dup[b, st] = ~(active[b] & restores & (fs[b] == st[:, None])).any(axis=1)
        b, _ = at("rollback_model")
        bad_deploy = (active[b] & (ft[b] == _F["bad_model_deploy"])).any(axis=1)
        stale = b[~bad_deploy]
        self.rollback_penalty[stale] = np.minimum(
            self.rollback_penalty[stale] + p.rollback_staleness, 3 * p.rollback_staleness
        )
        self.model_age[b] += 5_000  # the previous version is older
        b, _ = at("retrain_model")
        self.retrain_done_at[b] = np.minimum(self.retrain_done_at[b], t + self._retrain_steps)
        b, _ = at("escalate")
        newly = b[self.human_at[b] == NEVER]
        delay = self.rng.lognormal(
            np.log(p.human_delay_median_steps), p.human_delay_sigma, size=len(newly)
        )
        self.human_at[newly] = t + np.maximum(1, np.round(delay)).astype(np.int64)
        self._escalated[newly] = True
        # Paging again while someone is on the way calls nobody new and costs nothing.
        self._last_action_cost[b[~np.isin(b, newly)]] = 0.0

    def _drop_queue(self, b: np.ndarray, st: np.ndarray) -> None:
        np.add.at(self._dropped_by_action, b, self.queue[b, st])
        self.queue[b, st] = 0.0

    def _traffic_factor(self, t: int) -> np.ndarray:
        """(n,): each pipeline's load relative to ``base_rps`` at step ``t`` (the daily cycle
        times every burst in progress)."""
        daily = 1.0
        if self.scenario.load.pattern == "diurnal":
            daily += self.params.diurnal_amplitude * np.sin(2 * np.pi * t / DAY_STEPS)
        in_burst = (self.burst_start <= t) & (t < self.burst_end)
        return daily * np.where(in_burst, self.burst_factor, 1.0).prod(axis=1)

    def _effects(self, active: np.ndarray) -> np.ndarray:
        """(n, n_fault_types, n_stages): summed severity of each active fault type per stage.
        Drift builds up over time (ramp); everything else is felt at once."""
        weight = self.f_sev * active
        since = np.maximum(self.t - self.f_onset, 0)
        ramp = np.ones_like(weight)
        ramp = np.where(self.f_type == _F["data_drift"], np.minimum(since / 30.0, 1.0), ramp)
        ramp = np.where(self.f_type == _F["concept_drift"], np.minimum(since / 20.0, 1.0), ramp)
        return np.einsum(
            "bf,bft,bfs->bts", weight * ramp, self._f_type_onehot, self._f_stage_onehot
        )

    def _human_fix(self) -> None:
        """An on-call engineer who was paged arrives now and fixes every active fault."""
        arriving = self.human_at == self.t
        if not arriving.any():
            return
        active = self.fault_active() & arriving[:, None]
        delay = self._best_cure_delay[self.f_type]
        self.f_clear_at = np.where(
            active, np.minimum(self.f_clear_at, self.t + delay), self.f_clear_at
        )
        self.f_first_cure_at = np.where(
            active & (self.f_first_cure_at == NEVER), self.t, self.f_first_cure_at
        )
        self.human_at[arriving] = NEVER

    def _simulate_and_observe(self) -> Telemetry:
        p, t, n, S = self.params, self.t, self.n, self.n_stages
        dt = STEP_SECONDS
        self._human_fix()
        clearing = (self.f_clear_at <= t) & (self.f_cleared_at == NEVER)
        ending = (self.f_end <= t) & (self.f_cleared_at == NEVER)
        self.f_cleared_at = np.where(
            clearing | ending, np.minimum(self.f_clear_at, self.f_end), self.f_cleared_at
        )
        active = self.fault_active()
        E = self._effects(active)
        fx = {name: E[:, _F[name], :] for name in FAULT_TYPES}

        # A fresh deploy is when a bad model arrives; a finished retrain is a fresh deploy too.
        deploy_now = (
            (self.f_type == _F["bad_model_deploy"]) & (self.f_onset == t) & self.f_valid
        ).any(axis=1)
        retrained = self.retrain_done_at == t
        self.model_age = np.where(deploy_now | retrained, 0.0, self.model_age + 1)
        self.rollback_penalty[retrained] = 0.0
        self.retrain_done_at[retrained] = NEVER

        # Memory: leaks grow it, otherwise it settles back; at the limit the stage is OOM-killed.
        self.mem = np.where(
            fx["memory_leak"] > 0,
            self.mem + 0.02 * fx["memory_leak"],
            np.maximum(HEALTHY_MEMORY, self.mem - 0.05),
        )
        oom = self.mem >= 1.0
        dropped = self._dropped_by_action
        # For rewards: what this step's action dropped (a copy: OOM and overflow add to `dropped`).
        self.last_action_dropped = dropped.copy()
        self._dropped_by_action = np.zeros(n)
        if oom.any():
            dropped += (self.queue * oom).sum(axis=1)
            self.queue[oom] = 0.0
            self.down_until[oom] = t + 1
            self.mem[oom] = HEALTHY_MEMORY

        # A failed node takes up to three quarters of the stage's replicas with it.
        lost_replicas = np.floor(0.75 * np.minimum(fx["node_failure"], 1.0) * self.replicas + 0.5)
        ready = np.maximum(self.replicas - lost_replicas, 0)
        gc_slowdown = 1.0 - 0.5 * np.clip((self.mem - 0.8) / 0.2, 0.0, 1.0)
        capacity = (
            ready
            * self._cap_per_replica
            * (1.0 - 0.6 * np.minimum(fx["cpu_contention"], 1.0))
            * gc_slowdown
            * np.where(self.dedupe_until > t, 0.9, 1.0)  # dedupe costs compute
            * np.where(self.half_until > t, 0.5, 1.0)
            * np.where(self.down_until > t, 0.0, 1.0)
        )
        retry_on = self.retry_until > t
        dedupe_on = self.dedupe_until > t
        throttle_on = self.throttle_until > t

        # Arrivals: the scenario's traffic, thinned while an upstream feed is late.
        normal_rps = self.scenario.load.base_rps * self._traffic_factor(t)
        arrivals = (
            normal_rps
            * self.rng.lognormal(0.0, p.traffic_noise, size=n)
            * (1.0 - 0.8 * np.minimum(fx["late_data"][:, 0], 1.0))
        )

        # Fault-induced shares of records, per stage where they originate.
        corrupt = 0.4 * np.minimum(fx["corrupt_batch"], 1.0)
        schema_fail = 0.5 * np.minimum(fx["schema_drift"], 1.0)
        err_add = (
            0.3 * fx["transient_timeout"]
            + np.minimum(fx["downstream_outage"], 1.0)
            + schema_fail
            + corrupt / 2
        )
        if self._model >= 0:
            err_add[:, self._model] += 0.05 * fx["bad_model_deploy"][:, self._model]
        error_rate = np.minimum(p.base_error_rate + err_add, 1.0)
        timeout_rate = np.minimum(0.3 * fx["transient_timeout"], 1.0)

        inflow = np.zeros((n, S))
        out = np.zeros((n, S))
        processed_all = np.zeros((n, S))
        failed_lost = np.zeros((n, S))
        null_sh = np.zeros((n, S))  # bad shares of the records leaving each stage
        dup_sh = np.zeros((n, S))
        oor_sh = np.zeros((n, S))
        bad_sh = np.zeros((n, S))  # corrupt rows that passed
        schema_null = np.zeros((n, S))
        psi = np.zeros((n, S))
        for s in range(S):
            parent = self._parent[s]
            if parent < 0:
                incoming = arrivals.copy()
                null_in = dup_in = oor_in = bad_in = sch_in = psi_in = np.zeros(n)
            else:
                incoming = out[:, parent].copy()
                null_in, dup_in, oor_in = null_sh[:, parent], dup_sh[:, parent], oor_sh[:, parent]
                bad_in, sch_in, psi_in = bad_sh[:, parent], schema_null[:, parent], psi[:, parent]
            # Extra load entering here: a surge, a duplicate burst, a replay.
            incoming = incoming * (1.0 + 1.5 * fx["traffic_surge"][:, s])
            dup_new = 0.4 * np.minimum(fx["duplicate_burst"][:, s], 1.0)
            incoming = incoming * (1.0 + dup_new)
            replaying = self.replay_until[:, s] > t
            replay = np.where(replaying, p.replay_rate * self.scenario.load.base_rps, 0.0)
            replay_dup = np.where(replaying & self.replay_is_dup[:, s], replay, 0.0)
            incoming = incoming + replay
            # Throttle admits up to a limit per second; the rest waits at the source.
            limit = np.where(throttle_on[:, s], p.throttle_limit * normal_rps, np.inf)
            offered = incoming + self.backlog[:, s] / dt
            admitted = np.minimum(offered, limit)
            self.backlog[:, s] = (offered - admitted) * dt
            inflow[:, s] = admitted
            available = self.queue[:, s] + admitted * dt
            processed = np.minimum(available, capacity[:, s] * dt)
            failed = processed * error_rate[:, s]
            self.queue[:, s] = available - processed + np.where(retry_on[:, s], failed, 0.0)
            failed_lost[:, s] = np.where(retry_on[:, s], 0.0, failed)
            overflow = np.maximum(
                self.queue[:, s] - p.max_queue_s * self.scenario.load.base_rps, 0.0
            )
            self.queue[:, s] -= overflow
            dropped += overflow
            out[:, s] = (processed - failed_lost[:, s] - np.where(retry_on[:, s], failed, 0.0)) / dt
            processed_all[:, s] = processed
            # Record shares downstream of here.
            dup_total = 1 - (1 - dup_in) * (1 - dup_new) + replay_dup / np.maximum(incoming, 1e-9)
            dup_sh[:, s] = np.where(dedupe_on[:, s], 0.0, np.minimum(dup_total, 1.0))
            null_sh[:, s] = 1 - (1 - null_in) * (1 - 0.5 * np.minimum(fx["null_spike"][:, s], 1.0))
            oor_sh[:, s] = 1 - (1 - oor_in) * (1 - 0.4 * np.minimum(fx["out_of_range"][:, s], 1.0))
            # Half of a corrupt batch fails parsing, half slips through. A retry re-sends the
            # whole batch through the lenient retry path: the failed corrupt rows now land at
            # the sink, and the ones that had slipped through land a second time.
            passed_corrupt = corrupt[:, s] / 2 * np.where(retry_on[:, s], 3.0, 1.0)
            bad_sh[:, s] = 1 - (1 - bad_in) * (1 - passed_corrupt)
            schema_null[:, s] = 1 - (1 - sch_in) * (1 - 0.6 * schema_fail[:, s])
            psi[:, s] = psi_in + (0.1 + 0.4 * fx["data_drift"][:, s]) * (fx["data_drift"][:, s] > 0)

        # Latency: service time plus queueing wait (FIFO: the last record waits queue/capacity).
        stage_latency = p.service_time_s * (1 + 10 * timeout_rate) + self.queue / np.maximum(
            capacity, 1.0
        )
        if self._model >= 0:
            stage_latency[:, self._model] *= 1 + fx["bad_model_deploy"][:, self._model]
        e2e_latency = stage_latency[:, self._data_path].sum(axis=1)
        if self._model_path:
            e2e_latency = np.maximum(e2e_latency, stage_latency[:, self._model_path].sum(axis=1))
        # End to end, a record survives only if no stage loses it to an error.
        lost_share = failed_lost / np.maximum(processed_all, 1e-9)
        e2e_error = 1.0 - np.prod(1.0 - lost_share, axis=1)

        # Freshness: pipeline latency, plus how late the feed is, plus throttled backlog, plus
        # how long the sink has received (almost) nothing.
        starving = out[:, self._load] < 0.2 * normal_rps
        self.stale_s = np.where(starving, self.stale_s + dt, 0.0)
        late_lag = 600.0 * np.minimum(fx["late_data"][:, 0], 1.0)
        freshness = e2e_latency + late_lag + self.backlog.sum(axis=1) / normal_rps + self.stale_s

        # Model quality: drift, stale rollbacks, and broken inputs cost accuracy.
        accuracy = np.full(n, np.nan)
        wrong = np.zeros(n)
        if self._model >= 0:
            m, feeder = self._model, self._parent[self._model]
            loss = (
                0.15 * np.minimum(fx["data_drift"].sum(axis=1), 1.0)
                + 0.25 * np.minimum(fx["concept_drift"][:, m], 1.0)
                + 0.4 * np.minimum(fx["bad_model_deploy"][:, m], 1.0)
                + 0.15 * oor_sh[:, feeder]
                + 0.2 * schema_null[:, feeder]
                + self.rollback_penalty
            )
            accuracy = np.clip(p.base_accuracy - loss, 0.05, 1.0)
            wrong = out[:, m] * dt * (p.base_accuracy - accuracy)

        load = self._load
        bad_at_sink = 1 - (1 - null_sh[:, load]) * (1 - dup_sh[:, load]) * (1 - oor_sh[:, load]) * (
            1 - bad_sh[:, load]
        ) * (1 - schema_null[:, load])
        records_lost = dropped + failed_lost.sum(axis=1) + out[:, load] * dt * bad_at_sink + wrong

        slo = p.slo
        slo_ok = (
            (e2e_latency <= slo.p99_latency_s)
            & (e2e_error <= slo.error_rate)
            & (freshness <= slo.freshness_s)
        )
        cost = (self.replicas.sum(axis=1) * p.replica_price) + self._last_action_cost
        self.history.append(StepOutcome(slo_ok, records_lost, cost, self._escalated.copy()))
        self._escalated = np.zeros(n, dtype=bool)
        self._last_action_cost = np.zeros(n)

        # ---- what the pipeline reports: noisy, partial, accuracy late.
        self._acc_history = np.roll(self._acc_history, -1, axis=0)
        self._acc_history[-1] = accuracy
        schema_seen = (schema_fail > 0) & (self.rng.random((n, S)) < p.schema_detect_prob)
        stage_true = np.stack(
            [
                inflow,
                out,
                self.queue,
                stage_latency,
                error_rate,
                timeout_rate,
                np.minimum(
                    np.clip(processed_all / dt / np.maximum(capacity, 1.0), 0.0, 1.0) * 0.85
                    + 0.4 * np.minimum(fx["cpu_contention"], 1.0)
                    + 0.2 * (self.mem > 0.8),
                    1.0,
                ),
                self.mem,
                self.replicas.astype(float),
                ready,
                p.base_null_rate + null_sh + schema_null,
                dup_sh,
                oor_sh,
                corrupt,
                schema_seen.astype(float),
                psi,
                retry_on.astype(float),
                dedupe_on.astype(float),
                throttle_on.astype(float),
            ],
            axis=-1,
        )
        # Accuracy is measured on a sample of labelled records: additive sampling noise.
        observed_accuracy = self._acc_history[0] + self.rng.normal(0.0, 0.01, size=n)
        pipe_true = np.stack(
            [
                e2e_latency,
                e2e_error,
                freshness,
                observed_accuracy,
                0.05 + 0.3 * (fx["concept_drift"].sum(axis=1) + fx["bad_model_deploy"].sum(axis=1)),
                self.model_age,
                (self.human_at != NEVER).astype(float),
            ],
            axis=-1,
        )
        return Telemetry(
            topology=self.topo.stages,
            stage=self._noisy(stage_true, exact=_EXACT_STAGE),
            pipeline=self._noisy(pipe_true, exact=_EXACT_PIPELINE),
            step=t,
        )

    def _noisy(self, values: np.ndarray, *, exact: np.ndarray) -> np.ndarray:
        p = self.params
        noise = self.rng.lognormal(0.0, p.telemetry_noise, size=values.shape)
        observed = np.where(exact, values, values * noise)
        missing = (self.rng.random(values.shape) < p.telemetry_missing) & ~exact
        return np.where(missing, np.nan, observed)


# Counters and settings the pipeline knows exactly (no noise, never missing).
_EXACT_STAGE = np.isin(
    np.arange(len(STAGE_METRICS)),
    [
        STAGE_INDEX[m]
        for m in (
            "replicas",
            "replicas_ready",
            "schema_mismatch",
            "retry_on",
            "dedupe_on",
            "throttle_on",
        )
    ],
)
_EXACT_PIPELINE = np.isin(
    np.arange(len(PIPELINE_METRICS)),
    [PIPELINE_METRICS.index(m) for m in ("model_accuracy", "model_age_steps", "human_paged")],
)
