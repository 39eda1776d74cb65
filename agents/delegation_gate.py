"""The delegation gate: the master's choice made with its specialists' reports in view.

Why
    The master gates every remediation: a specialist is asked only if the master delegates.
    Measured (README), the master waits where flat acts on every infrastructure cure, although
    the infra specialist, asked on the same steps, is usually sure and right. The specialists
    are fitted on finer labels (the concrete cure and its stage, on every step, asked or not),
    so on their own domain they are the better detectors. The raised hand (``hand_raise`` in
    ``agents.inference``) lets one specialist override ``observe`` above a fixed threshold; it
    buys MTTR with needless actions on quiet steps, because it ignores what the master sees.

What
    A multinomial logistic regression over the master's actions whose inputs are what the
    hierarchy already computes (``FEATURES``): the master's own log-probabilities and, per
    specialist, the logit of its probability of acting and of its most probable remediation.
    It is fitted to the warm start's teacher (``warm_start.teacher``, waiting until a fault
    shows when ``warm_start.teacher_waits``) on the policy's own states in the training mix,
    with DAgger: the first round runs the policy greedily, the later ones run it with the gate
    fitted so far, and every round's samples are kept. The networks are not touched; the gate
    is a decision rule over them, chosen or not by validation score like the others
    (``cluster.train.choose_decision_rule``), and stored in the bundle's manifest as plain
    numbers (``DelegationGate.to_manifest``).

``observe_offset`` lowers the gate's ``observe`` logit before the argmax: the teacher waits on
most steps, so an unweighted fit is cautious, and validation picks how much eagerness pays.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from agents.policy import EpisodeContext, make_policy
from envs.catalogue import DOMAINS, MASTER_ACTIONS, master_action_name
from envs.errors import CheckpointError
from envs.observation import LAYOUTS

if TYPE_CHECKING:
    from agents.inference import LearnedPolicy
    from agents.ppo_config import TrainConfig
    from envs.simulator import GroundTruth
    from envs.telemetry import Telemetry

log = logging.getLogger(__name__)

#: The gate's inputs, in order.
FEATURES: tuple[str, ...] = (
    *(f"master_logp_{a}" for a in MASTER_ACTIONS),
    *(f"{d}_{what}" for d in DOMAINS for what in ("act_logit", "top_logit")),
)
_EPS = 1e-6
_OBSERVE = MASTER_ACTIONS.index("observe")
_SPECIALIST_OBSERVE = {d: LAYOUTS[d].encode("observe") for d in DOMAINS}


class DelegationGateConfig(BaseModel):
    """``delegation_gate`` in ``configs/train.yaml`` (hierarchical only; flat ignores it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(False, description="fit a gate at every review and score it")
    pipeline_steps: int = Field(
        60_000, ge=100, description="simulated pipeline steps collected per fit, all rounds"
    )
    rounds: int = Field(2, ge=1, description="DAgger rounds (the first runs the policy greedily)")
    episodes_per_scenario: int = Field(
        16, ge=1, description="episodes simulated side by side per drawn scenario"
    )
    observe_offsets: tuple[float, ...] = Field(
        (0.0,), min_length=1, description="offsets tried, each a decision rule of its own"
    )
    l2: float = Field(1e-3, ge=0, description="ridge penalty on the weights (not the biases)")

    @model_validator(mode="after")
    def _every_round_collects(self) -> DelegationGateConfig:
        if self.pipeline_steps < self.rounds * self.episodes_per_scenario:
            raise ValueError(
                f"pipeline_steps ({self.pipeline_steps}) must cover at least one step of "
                f"episodes_per_scenario ({self.episodes_per_scenario}) pipelines in each of the "
                f"{self.rounds} rounds"
            )
        return self


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def gate_features(master_probs: np.ndarray, specialist_probs: dict[str, np.ndarray]) -> np.ndarray:
    """(n, len(FEATURES)) inputs of the gate from the master's probabilities and each
    specialist's, all on the same rows."""
    cols = [np.log(np.clip(master_probs, _EPS, 1.0))]
    for d in DOMAINS:
        p = specialist_probs[d]
        # A specialist's acting choices are all but observe (agents.inference.ACTING, which
        # this module cannot import: inference imports the gate).
        acting = np.ones(p.shape[1], dtype=bool)
        acting[_SPECIALIST_OBSERVE[d]] = False
        cols.append(_logit(1.0 - p[:, _SPECIALIST_OBSERVE[d]])[:, None])
        cols.append(_logit(p[:, acting].max(axis=1))[:, None])
    return np.concatenate(cols, axis=1).astype(np.float64)


@dataclass(frozen=True, eq=False)  # arrays have no single truth value: compare by identity
class DelegationGate:
    """Logits over ``MASTER_ACTIONS`` = features @ weights + bias; ``observe_offset`` is
    subtracted from the ``observe`` logit."""

    weights: np.ndarray  # (len(FEATURES), len(MASTER_ACTIONS))
    bias: np.ndarray  # (len(MASTER_ACTIONS),)
    observe_offset: float = 0.0

    def probs(self, features: np.ndarray, master_mask: np.ndarray) -> np.ndarray:
        """Gate probabilities over the master's actions; masked actions get none."""
        z = features @ self.weights + self.bias
        z[:, _OBSERVE] -= self.observe_offset
        z = np.where(master_mask > 0, z, -np.inf)
        z = np.exp(z - z.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)

    def with_offset(self, offset: float) -> DelegationGate:
        """The same fit with another ``observe_offset`` (each offset is a rule of its own)."""
        return DelegationGate(self.weights, self.bias, offset)

    def to_manifest(self) -> dict[str, Any]:
        """The gate as plain JSON numbers, unrounded, so the stored gate is the scored one."""
        return {
            "features": list(FEATURES),
            "actions": list(MASTER_ACTIONS),
            "weights": self.weights.tolist(),
            "bias": self.bias.tolist(),
            "observe_offset": self.observe_offset,
        }

    @classmethod
    def from_manifest(cls, entry: Any, *, where: str = "policy.json") -> DelegationGate:
        """The gate a manifest stores; a CheckpointError naming what is wrong when the entry
        is malformed or was fitted for other inputs."""
        if not isinstance(entry, dict):
            raise CheckpointError(f"{where}: delegation_gate must be a mapping, got {entry!r}")
        missing = sorted({"features", "actions", "weights", "bias", "observe_offset"} - set(entry))
        if missing:
            raise CheckpointError(f"{where}: delegation_gate lacks {', '.join(missing)}")
        if entry["features"] != list(FEATURES) or entry["actions"] != list(MASTER_ACTIONS):
            raise CheckpointError(
                f"{where}: delegation_gate was fitted for features {entry['features']} and "
                f"actions {entry['actions']}; this code computes {list(FEATURES)} for "
                f"{list(MASTER_ACTIONS)}"
            )
        try:
            weights = np.asarray(entry["weights"], dtype=np.float64)
            bias = np.asarray(entry["bias"], dtype=np.float64)
            offset = float(entry["observe_offset"])
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{where}: delegation_gate holds non-numbers: {exc}") from None
        if weights.shape != (len(FEATURES), len(MASTER_ACTIONS)) or bias.shape != (
            len(MASTER_ACTIONS),
        ):
            raise CheckpointError(
                f"{where}: delegation_gate weights {weights.shape} / bias {bias.shape}, expected "
                f"{(len(FEATURES), len(MASTER_ACTIONS))} / {(len(MASTER_ACTIONS),)}"
            )
        return cls(weights, bias, offset)


def fit_gate(features: np.ndarray, labels: np.ndarray, *, l2: float) -> DelegationGate:
    """Multinomial logistic regression of ``labels`` (indices into ``MASTER_ACTIONS``) on
    ``features``, by L-BFGS on the mean cross-entropy plus ``l2`` × the squared weights.
    Features are standardised for the fit and the scaling folded back into the weights."""
    mean = features.mean(axis=0)
    std = features.std(axis=0)
    std[std < 1e-8] = 1.0
    x = torch.from_numpy((features - mean) / std)
    y = torch.from_numpy(labels.astype(np.int64))
    w = torch.zeros(x.shape[1], len(MASTER_ACTIONS), dtype=torch.float64, requires_grad=True)
    b = torch.zeros(len(MASTER_ACTIONS), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    weights = w.detach().numpy() / std[:, None]
    bias = b.detach().numpy() - mean @ weights
    return DelegationGate(weights, bias)


class _GateDataRecorder:
    """Runs a learned policy (with its own decision rule) and records, on every step, the
    gate's features and the teacher's choice mapped onto the master's actions."""

    needs_ground_truth = True

    def __init__(self, policy: LearnedPolicy, teacher: str, teacher_waits: bool):
        self.policy, self.name = policy, policy.name
        self.teacher = make_policy(teacher)
        self.ground_truth_shown_only = teacher_waits
        self.features: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []

    def reset(self, ctx: EpisodeContext) -> None:
        self.policy.reset(ctx)
        self.teacher.reset(ctx)

    def act(
        self, telemetry: Telemetry, truth: GroundTruth | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        teach_action, _ = self.teacher.act(telemetry, truth)
        enc = self.policy.encoder
        enc.update(telemetry)
        # As the warm start labels the master: a choice its mask forbids becomes observe.
        label = np.array([MASTER_ACTIONS.index(master_action_name(a)) for a in teach_action])
        allowed = enc.action_mask("master")[np.arange(enc.n), label] > 0
        self.labels.append(np.where(allowed, label, _OBSERVE))
        self.features.append(self.policy.gate_inputs(enc))
        d = self.policy.decide(enc)
        enc.record_action(d.action, d.slot)
        return d.action, d.stage


def fit_delegation_gate(
    policy: LearnedPolicy, cfg: TrainConfig, *, seed: int
) -> tuple[DelegationGate, dict[str, Any]]:
    """Fit the gate for ``policy``'s networks on its own states in ``cfg``'s training mix
    (see the module docstring); returns the gate (offset 0) and facts about the fit.
    ``policy`` keeps the decision rule it came with."""
    from agents.rollout import rollout
    from envs.multi_agent_env import ScenarioMix
    from envs.params import load_sim_params

    if policy.name != "hierarchical":
        raise CheckpointError(f"a delegation gate is for hierarchical policies, not {policy.name}")
    gate_cfg = cfg.delegation_gate
    ws = cfg.warm_start
    mix = ScenarioMix(cfg.env_config())
    params = load_sim_params(cfg.env.sim_config)
    rng = np.random.default_rng(seed)
    saved = policy.rule()
    features: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    gate = None
    per_round = gate_cfg.pipeline_steps // gate_cfg.rounds
    try:
        for r in range(gate_cfg.rounds):
            policy.set_rule(delegation_gate=gate)  # greedy in round 0, then the gate so far
            recorder = _GateDataRecorder(policy, ws.teacher, ws.teacher_waits)
            used = 0
            while used < per_round:
                scenario = mix.draw(rng)
                seeds = [int(s) for s in rng.integers(2**31, size=gate_cfg.episodes_per_scenario)]
                rollout(recorder, scenario, seeds, params=params)
                used += scenario.duration_steps * len(seeds)
            features += recorder.features
            labels += recorder.labels
            gate = fit_gate(np.concatenate(features), np.concatenate(labels), l2=gate_cfg.l2)
            log.info("delegation gate round %d/%d: %d samples", r + 1, gate_cfg.rounds, used)
    finally:
        policy.set_rule(**saved)
    y = np.concatenate(labels)
    facts = {
        "samples": int(len(y)),
        "teacher_acting_share": round(float((y != _OBSERVE).mean()), 4),
    }
    return gate, facts
