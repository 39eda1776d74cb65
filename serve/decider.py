"""The decision service without any web framework: telemetry in, a decision people can trust out.

``DecisionService`` is what the Ray Serve deployment (``serve.app``) and the plain-uvicorn
benchmark app both wrap, so they answer identically. Per decision it:

1. turns the request into ``envs.telemetry.Telemetry`` (PSI/KS computed here when the request
   carries distributions, ``serve.drift``), and updates that pipeline's ``ObservationEncoder``
   (the encoder training used: history, "usual" values, last action);
2. runs the promoted policy master → specialist (``agents.inference.LearnedPolicy``);
3. applies the guardrails (``serve.settings.Guardrails``): escalate when unsure or when a
   destructive action is not sure enough, hold actions back during a per-pipeline cooldown or
   beyond the hourly cap, shadow mode only recommends;
4. explains itself: the signals that moved most from the pipeline's usual values, SLO breaches,
   who chose what with which probability, and what the guardrails did;
5. remembers the decision (inputs the agents saw, what they chose) so ``feedback`` can turn the
   outcome into experience rows (``checkpoints.experience``, source ``prod`` or ``shadow``).

State (pipeline histories, guardrail clocks, the decision log) lives in this object, so one
replica owns it; see the README for what that means with several replicas.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from agents.inference import LearnedPolicy
from envs.catalogue import ACTION_ID, DOMAINS, SIM_ACTIONS, STAGES
from envs.errors import CheckpointError
from envs.observation import (
    DOMAIN_STAGE_METRICS,
    LAYOUTS,
    N_SLOTS,
    UNTARGETED_ACTIONS,
    ObservationEncoder,
)
from envs.params import SimParams, SloParams
from envs.telemetry import PIPELINE_INDEX, PIPELINE_METRICS, STAGE_INDEX, STAGE_METRICS, Telemetry
from serve import drift as drift_scores
from serve import schemas
from serve.settings import PIPELINE_HEADER, Guardrails, ServiceSettings

log = logging.getLogger(__name__)

#: Reward of a feedback outcome (what the experience table records for the decision).
OUTCOME_REWARD: dict[str, float] = {
    "resolved": 1.0,
    "improved": 0.5,
    "unchanged": 0.0,
    "worse": -1.0,
}
_HOUR_S = 3600.0
_N_SIGNALS = 3
# A departure from usual (in the encoder's normalised units) below this is not worth naming.
_SIGNAL_FLOOR = 0.05


class DecisionError(ValueError):
    """A request that is well-formed but cannot be decided (the API answers 4xx)."""

    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.field = status, field


@dataclass
class _Pipeline:
    """What the service remembers about one pipeline."""

    topology: tuple[str, ...]
    encoder: ObservationEncoder
    steps: int = 0
    acted_at: deque[float] = field(default_factory=deque)  # monotonic times of autonomous actions


@dataclass
class _LoggedDecision:
    """A decision kept for its feedback: what each deciding agent saw and chose."""

    pipeline_id: str
    step: int
    mode: str
    policy_version: str
    agents: dict[str, tuple[np.ndarray, np.ndarray, int, float]]  # obs, mask, index, prob
    encoder: ObservationEncoder  # a copy, as it was when deciding
    stages: tuple[str, ...]


class _StackedEncoders:
    """Many single-pipeline encoders seen as one batch, the shape ``LearnedPolicy.decide`` takes.

    Targets are reported by slot (``stage_of_slot`` is the identity): serving names stages, so it
    never needs the topology index the simulator wants.
    """

    stage_of_slot = np.arange(N_SLOTS)

    def __init__(self, encoders: list[ObservationEncoder]):
        self.encoders = encoders
        self.n = len(encoders)

    def observe(self, view: str) -> np.ndarray:
        return np.concatenate([e.observe(view) for e in self.encoders])

    def action_mask(self, agent: str) -> np.ndarray:
        return np.concatenate([e.action_mask(agent) for e in self.encoders])

    def to_sim(self, agent: str, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        layout = LAYOUTS[agent]
        ids = np.array([ACTION_ID[a] for a in layout.actions])[np.asarray(index) // N_SLOTS]
        return ids, np.asarray(index) % N_SLOTS


class DecisionService:
    """Decides, explains, applies guardrails and records feedback for many pipelines."""

    def __init__(
        self,
        settings: ServiceSettings,
        *,
        policy: LearnedPolicy | None = None,
        clock=time.monotonic,
    ):
        self.settings = settings
        self.guardrails: Guardrails = settings.guardrails
        self.clock = clock
        self.policy = policy or self._load_policy()
        self.loaded_at = datetime.now(UTC)
        self._pipelines: OrderedDict[str, _Pipeline] = OrderedDict()
        self._decisions: OrderedDict[str, _LoggedDecision] = OrderedDict()
        self._writers: dict[str, Any] = {}
        self._writer_lock = threading.Lock()

    # ------------------------------------------------------------------ policy lifecycle
    def _load_policy(self) -> LearnedPolicy:
        return LearnedPolicy.from_store(self.settings.policy, root=self.settings.store_uri)

    def promoted_version(self) -> str | None:
        """``KIND:vN`` promoted in the store now (None when nothing is)."""
        from checkpoints.policies import CheckpointStore

        v = CheckpointStore(self.settings.store_uri).promoted_version(self.settings.policy)
        return None if v is None else f"{self.settings.policy}:v{v}"

    def reload_if_promoted(self) -> bool:
        """Load a newly promoted version; in-flight decisions finish on the old one (the swap
        is one reference assignment). A version that fails to load is logged and skipped."""
        current = self.promoted_version()
        if current is None or current == self.policy.version:
            return False
        try:
            policy = self._load_policy()
        except CheckpointError as exc:
            log.error(
                "newly promoted %s not loaded, still serving %s: %s",
                current,
                self.policy.version,
                exc,
            )
            return False
        self.policy, self.loaded_at = policy, datetime.now(UTC)
        log.info("now serving %s", policy.version)
        return True

    def set_guardrails(self, guardrails: Guardrails) -> None:
        self.guardrails = guardrails

    def policy_info(self) -> schemas.PolicyInfo:
        stored = self.policy.manifest.get("stored", {})
        return schemas.PolicyInfo(
            kind=self.policy.name,
            version=self.policy.version,
            loaded_at=self.loaded_at,
            trained={
                k: stored.get(k) for k in ("run_id", "iteration", "pipeline_steps", "created_at")
            },
            settings={**self.guardrails.model_dump(), "policy_poll_s": self.settings.policy_poll_s},
        )

    # ------------------------------------------------------------------ deciding
    def decide(self, request: schemas.DecideRequest) -> schemas.Decision:
        return self.decide_many([request])[0]

    def decide_many(self, requests: list[schemas.DecideRequest]) -> list[schemas.Decision]:
        """Decide for many snapshots with one forward pass per agent."""
        if len({r.pipeline_id for r in requests}) != len(requests):
            raise DecisionError(422, "each pipeline_id may appear once per batch", "requests")
        policy = self.policy  # one version for the whole batch, even if a reload swaps it
        states, scores = [], []
        for r in requests:
            state, drift = self._observe(r)
            states.append(state)
            scores.append(drift)
        d = policy.decide(_StackedEncoders([s.encoder for s in states]))
        now = self.clock()
        out = []
        for i, (r, state) in enumerate(zip(requests, states, strict=True)):
            out.append(self._answer(r, state, d, i, policy, scores[i], now))
        return out

    def _observe(self, r: schemas.DecideRequest) -> tuple[_Pipeline, list[schemas.DriftScore]]:
        topology = tuple(s for s in STAGES if s in r.stages)
        slo = SloParams(**{k: v for k, v in r.slo.model_dump().items() if v is not None})
        state = self._pipelines.get(r.pipeline_id)
        if state is None or state.topology != topology:
            params = SimParams(slo=slo)
            state = _Pipeline(topology, ObservationEncoder(topology, params, n=1))
            self._pipelines[r.pipeline_id] = state
            while len(self._pipelines) > self.settings.max_pipelines:
                self._pipelines.popitem(last=False)
        elif state.encoder.params.slo != slo:
            state.encoder.params = state.encoder.params.model_copy(update={"slo": slo})
        self._pipelines.move_to_end(r.pipeline_id)
        telemetry, scores = to_telemetry(r, topology)
        state.encoder.update(telemetry)
        state.steps += 1
        return state, scores

    def _answer(
        self,
        r: schemas.DecideRequest,
        state: _Pipeline,
        d,
        i: int,
        policy: LearnedPolicy,
        scores: list[schemas.DriftScore],
        now: float,
    ) -> schemas.Decision:
        g = self.guardrails
        action = SIM_ACTIONS[int(d.action[i])]
        slot = int(d.slot[i])
        target = None if action in UNTARGETED_ACTIONS else STAGES[slot]
        chosen = d.chosen[i]
        specialist = d.specialist[i]
        confidence = float(d.confidence[i])
        raised = bool(d.raised_hand[i])

        requested = r.mode or g.default_mode
        mode, why = requested, []
        if action == "escalate":
            mode = "escalate"
            why.append("the policy itself chose to page a human")
        elif confidence < g.escalate_below:
            mode = "escalate"
            why.append(f"confidence {confidence:.2f} is under the threshold {g.escalate_below:.2f}")
        elif (
            action in g.destructive_min_confidence
            and confidence < g.destructive_min_confidence[action]
        ):
            mode = "escalate"
            why.append(
                f"{action} is destructive and its confidence {confidence:.2f} is under "
                f"{g.destructive_min_confidence[action]:.2f}"
            )

        held = None
        if mode == "autonomous" and action != "observe":
            held = self._hold(state, action, target, now)
        executed = mode == "autonomous" and held is None and action != "observe"
        if executed:
            state.acted_at.append(now)
            state.encoder.record_action(np.array([ACTION_ID[action]]), np.array([slot]))

        decision_id = uuid.uuid4().hex
        self._remember(decision_id, r, state, d, i, mode, policy.version)
        signals = explain_signals(state.encoder, specialist or "master")
        answer = "observe" if held else action
        return schemas.Decision(
            decision_id=decision_id,
            pipeline_id=r.pipeline_id,
            action=answer,
            target_stage=None if held else target,
            parameters={} if held else action_parameters(action, slot, state),
            specialist=specialist,
            confidence=round(confidence, 6),
            mode=mode,
            policy_version=policy.version,
            alternatives=alternatives(d.action_probs[i]),
            explanation=explain(
                action,
                target,
                specialist,
                chosen,
                signals,
                state,
                mode,
                why,
                held,
                raised=raised,
                gated=policy.delegation_gate is not None,
            ),
            signals=signals,
            held_back=held,
            drift_scores=scores,
        )

    def _hold(
        self, state: _Pipeline, action: str, target: str | None, now: float
    ) -> schemas.HeldBack | None:
        g = self.guardrails
        while state.acted_at and now - state.acted_at[0] >= _HOUR_S:
            state.acted_at.popleft()
        if state.acted_at and now - state.acted_at[-1] < g.cooldown_s:
            wait = g.cooldown_s - (now - state.acted_at[-1])
            return schemas.HeldBack(
                action=action, target_stage=target, reason="cooldown", retry_after_s=round(wait, 3)
            )
        if len(state.acted_at) >= g.max_actions_per_hour:
            wait = _HOUR_S - (now - state.acted_at[0])
            return schemas.HeldBack(
                action=action,
                target_stage=target,
                reason="hourly_cap",
                retry_after_s=round(wait, 3),
            )
        return None

    def _remember(self, decision_id, r, state, d, i, mode, version) -> None:
        agents = {}
        for agent, (index, prob) in d.chosen[i].items():
            rows, obs, mask = d.inputs[agent]
            j = int(np.searchsorted(rows, i))  # rows are sorted pipeline indices
            agents[agent] = (obs[j], mask[j] > 0, index, prob)
        self._decisions[decision_id] = _LoggedDecision(
            pipeline_id=r.pipeline_id,
            step=state.steps,
            mode=mode,
            policy_version=version,
            agents=agents,
            encoder=state.encoder.copy(),
            stages=state.topology,
        )
        while len(self._decisions) > self.settings.decision_log_size:
            self._decisions.popitem(last=False)

    # ------------------------------------------------------------------ feedback
    def feedback(self, fb: schemas.FeedbackRequest) -> schemas.FeedbackResponse:
        """Join an outcome with its decision and queue the experience rows (one per agent that
        decided); they reach the table within ``feedback_flush_s``."""
        from checkpoints.experience import Transitions

        logged = self._decisions.get(fb.decision_id)
        if logged is None:
            raise DecisionError(
                404,
                f"decision {fb.decision_id!r} is unknown to this replica (never made, made by "
                f"another replica: send {PIPELINE_HEADER} as for the decision, or "
                f"older than the last {self.settings.decision_log_size} decisions)",
                "decision_id",
            )
        next_obs: dict[str, np.ndarray | None] = dict.fromkeys(logged.agents)
        if fb.telemetry_after is not None:
            after = fb.telemetry_after
            if after.pipeline_id != logged.pipeline_id:
                raise DecisionError(
                    422,
                    f"telemetry_after.pipeline_id is {after.pipeline_id!r} but decision "
                    f"{fb.decision_id} was for {logged.pipeline_id!r}",
                    "telemetry_after.pipeline_id",
                )
            topology = tuple(s for s in STAGES if s in after.stages)
            if topology != logged.stages:
                raise DecisionError(
                    422,
                    f"telemetry_after has stages {list(topology)}, the decision saw {list(logged.stages)}",
                    "telemetry_after.stages",
                )
            enc = logged.encoder.copy()
            enc.update(to_telemetry(after, topology)[0])
            next_obs = {a: enc.observe(_view(a))[0] for a in logged.agents}
        del self._decisions[fb.decision_id]

        source = "shadow" if logged.mode == "shadow" else "prod"
        reward = OUTCOME_REWARD[fb.outcome]
        agents = list(logged.agents)
        n = len(agents)
        rows = Transitions(
            episode=[logged.pipeline_id] * n,
            step=np.full(n, logged.step, dtype=np.int32),
            agent=agents,
            observation=[logged.agents[a][0] for a in agents],
            action_mask=[logged.agents[a][1] for a in agents],
            action=np.array([logged.agents[a][2] for a in agents], dtype=np.int32),
            action_prob=np.array([logged.agents[a][3] for a in agents], dtype=np.float32),
            reward=np.full(n, reward, dtype=np.float32),
            next_observation=[next_obs[a] for a in agents],
            terminated=np.full(n, fb.outcome == "resolved"),
            truncated=np.zeros(n, dtype=bool),
            policy_version=logged.policy_version,
            scenario=f"pipeline:{logged.pipeline_id}",
        )
        with self._writer_lock:
            self._writer(source).add(rows)
        return schemas.FeedbackResponse(
            decision_id=fb.decision_id, recorded_rows=n, source=source, reward=reward
        )

    def _writer(self, source: str):
        from checkpoints.experience import ExperienceWriter, experience_uri

        if source not in self._writers:
            self._writers[source] = ExperienceWriter(
                run_id=f"serve:{self.settings.policy}",
                source=source,
                uri=experience_uri(self.settings.store_uri),
                flush_rows=10_000,
            )
        return self._writers[source]

    def flush_feedback(self) -> int:
        """Append buffered feedback rows to the experience table; returns the rows written."""
        written = 0
        with self._writer_lock:
            for w in self._writers.values():
                before = w.rows_written
                w.flush()
                written += w.rows_written - before
        return written

    # ------------------------------------------------------------------ health
    def self_test(self) -> None:
        """Decide once on a synthetic snapshot without touching any pipeline's state; raises
        when the loaded policy cannot decide."""
        enc = ObservationEncoder(STAGES, SimParams(), n=1)
        enc.update(
            Telemetry(
                STAGES,
                np.zeros((1, len(STAGES), len(STAGE_METRICS))),
                np.zeros((1, len(PIPELINE_METRICS))),
                0,
            )
        )
        d = self.policy.decide(enc)
        probs = [p for _, p in d.chosen[0].values()]
        if not (np.isfinite(probs).all() and 0 <= int(d.action[0]) < len(SIM_ACTIONS)):
            raise RuntimeError(
                f"policy {self.policy.version} cannot decide: action id {int(d.action[0])}, "
                f"probabilities {probs}"
            )


# ---------------------------------------------------------------------- request → telemetry
def to_telemetry(
    r: schemas.DecideRequest, topology: tuple[str, ...]
) -> tuple[Telemetry, list[schemas.DriftScore]]:
    """The request as a one-pipeline ``Telemetry`` (missing metrics NaN) and its drift scores."""
    stage = np.full((1, len(topology), len(STAGE_METRICS)), np.nan)
    for j, name in enumerate(topology):
        for metric, value in r.stages[name].model_dump(exclude_none=True).items():
            stage[0, j, STAGE_INDEX[metric]] = value
    pipe = np.full((1, len(PIPELINE_METRICS)), np.nan)
    for metric, value in r.pipeline.model_dump(exclude_none=True).items():
        pipe[0, PIPELINE_INDEX[metric]] = value

    scores = []
    for k, item in enumerate(r.drift):
        try:
            if item.reference_counts is not None:
                s = drift_scores.drift_from_histograms(item.reference_counts, item.current_counts)
            else:
                s = drift_scores.drift_from_samples(item.reference_sample, item.current_sample)
        except drift_scores.DriftInputError as exc:
            raise DecisionError(422, str(exc), f"drift[{k}]") from exc
        scores.append(
            schemas.DriftScore(
                feature=item.feature, stage=item.stage, target=item.target, **asdict(s)
            )
        )
    # Computed scores fill in what the request did not report itself; the worst one counts.
    for s in scores:
        if s.target == "predictions":
            if r.pipeline.prediction_psi is None:
                j = PIPELINE_INDEX["prediction_psi"]
                pipe[0, j] = np.fmax(pipe[0, j], s.psi)
        elif s.stage in topology and r.stages[s.stage].feature_psi is None:
            j, m = topology.index(s.stage), STAGE_INDEX["feature_psi"]
            stage[0, j, m] = np.fmax(stage[0, j, m], s.psi)
    return Telemetry(topology, stage, pipe, 0), scores


# ---------------------------------------------------------------------- explaining
def _view(agent: str) -> str:
    return "master" if agent in ("master", "flat") else agent


#: Levels at which a stage metric is worth naming even without history to compare with (the
#: first snapshot of a pipeline): common paging thresholds, not anything the policy uses.
ALARMS: dict[str, float] = {
    "error_rate": 0.01,
    "timeout_rate": 0.01,
    "cpu": 0.9,
    "mem": 0.9,
    "null_rate": 0.05,
    "dup_rate": 0.01,
    "oor_rate": 0.01,
    "invalid_rate": 0.01,
    "schema_mismatch": 0.5,
    "feature_psi": 0.25,
}


def explain_signals(enc: ObservationEncoder, view: str) -> list[schemas.Signal]:
    """Up to three stage metrics of ``view``: those that moved most from the pipeline's usual
    values, then those over their alarm level (``ALARMS``)."""
    metrics = STAGE_METRICS if view == "master" else DOMAIN_STAGE_METRICS[view]
    cols = np.array([STAGE_INDEX[m] for m in metrics])
    stage_departure, _ = enc.block("departure")
    departure = stage_departure[0][:, cols]  # a copy: zeroing absent stages leaves enc alone
    departure[~enc.present] = 0.0
    raw, _ = enc.last_values()
    value = np.zeros((N_SLOTS, len(cols)))
    value[enc.slots] = raw[0][:, cols]
    level = np.array([ALARMS.get(m, np.inf) for m in metrics])
    alarmed = (value > level) & enc.present[:, None]
    # Moved from usual first (largest first), then alarms by how far over their level.
    moved = np.abs(departure) >= _SIGNAL_FLOOR
    score = np.where(moved, 10.0 + np.abs(departure), np.where(alarmed, value / level, 0.0))
    out = []
    for flat in np.argsort(-score, axis=None)[:_N_SIGNALS]:
        slot, k = divmod(int(flat), len(cols))
        if score[slot, k] <= 0:
            break
        out.append(
            schemas.Signal(
                metric=metrics[k],
                stage=STAGES[slot],
                value=float(value[slot, k]),
                departure=round(float(departure[slot, k]), 4),
                alarm_level=float(level[k]) if alarmed[slot, k] else None,
            )
        )
    return out


def _describe(s: schemas.Signal) -> str:
    if abs(s.departure) >= _SIGNAL_FLOOR:
        how = "above usual" if s.departure > 0 else "below usual"
    else:
        how = f"over its alarm level {s.alarm_level:.4g}"
    return f"{s.stage} {s.metric} {s.value:.4g} ({how})"


def slo_breaches(enc: ObservationEncoder) -> list[str]:
    _, pipe = enc.last_values()
    slo = enc.params.slo
    checks = (
        ("e2e latency p99", pipe[0, PIPELINE_INDEX["e2e_latency_p99_s"]], slo.p99_latency_s, "s"),
        ("e2e error rate", pipe[0, PIPELINE_INDEX["e2e_error_rate"]], slo.error_rate, ""),
        ("freshness", pipe[0, PIPELINE_INDEX["freshness_s"]], slo.freshness_s, "s"),
    )
    return [
        f"{name} {value:.4g}{unit} exceeds its SLO {bound:.4g}{unit}"
        for name, value, bound, unit in checks
        if value > bound
    ]


def explain(
    action, target, specialist, chosen, signals, state, mode, why, held, *, raised, gated
) -> str:
    """One paragraph a person on call can act on. ``gated``: the master's choice came from
    the delegation gate, which weighs the specialists' reports with the master's own view."""
    what = f"{action} on {target}" if target else action
    master = "The master, weighing its specialists' reports," if gated else "The master"
    if raised:
        who = (
            f"The master chose to observe (p={chosen['master'][1]:.2f}), but the {specialist} "
            f"specialist, asked anyway, was sure enough to act: it chose {what} "
            f"(p={chosen[specialist][1]:.2f})."
        )
    elif specialist is not None:
        p_master = chosen["master"][1]
        p_spec = chosen[specialist][1]
        who = (
            f"{master} delegated to the {specialist} specialist (p={p_master:.2f}), "
            f"which chose {what} (p={p_spec:.2f})."
        )
    else:
        agent = next(iter(chosen))
        top = "The policy" if agent == "flat" else master
        who = f"{top} chose {what} (p={chosen[agent][1]:.2f})."
    parts = [who]
    if signals:
        parts.append(f"Signals: {', '.join(_describe(s) for s in signals)}.")
    else:
        parts.append("No stage signal stands out from this pipeline's usual values.")
    breaches = slo_breaches(state.encoder)
    if breaches:
        parts.append("SLO: " + "; ".join(breaches) + ".")
    if mode == "escalate":
        parts.append("Escalated to a human: " + "; ".join(why) + ".")
    elif mode == "shadow":
        parts.append("Shadow mode: recommended only, nothing was done.")
    if held is not None:
        rule = "the per-pipeline cooldown" if held.reason == "cooldown" else "the hourly action cap"
        parts.append(
            f"Held back by {rule}: answer is observe; retry after {held.retry_after_s:.0f} s."
        )
    return " ".join(parts)


def alternatives(action_probs: dict[str, dict[str, float]]) -> list[schemas.Alternative]:
    """The choices the policy weighed, with their joint probability (master × specialist)."""
    out: dict[tuple[str, str | None], float] = {}
    master = action_probs.get("master", {})
    for agent, probs in action_probs.items():
        scale = 1.0
        if agent in DOMAINS:
            scale = master.get(f"delegate_{agent}", 1.0)
        for label, p in probs.items():
            if label.startswith("delegate_"):
                continue
            action, _, stage = label.partition("@")
            key = (action, stage or None)
            out[key] = out.get(key, 0.0) + scale * p
    ranked = sorted(out.items(), key=lambda kv: -kv[1])[:5]
    return [
        schemas.Alternative(action=a, target_stage=s, probability=round(p, 6))
        for (a, s), p in ranked
    ]


def action_parameters(action: str, slot: int, state: _Pipeline) -> dict[str, float | int | str]:
    """Concrete parameters of an action where it has any (replica counts for scaling)."""
    if action in ("scale_out", "scale_in"):
        now = int(round(state.encoder.replicas[0, slot]))
        return {"replicas_from": now, "replicas_to": now + (1 if action == "scale_out" else -1)}
    return {}
