"""Warm start: pre-train the agents by imitating a teacher before PPO takes over.

Why: PPO from scratch has to discover, by trial, which of ~70 (action, stage) pairs cures each
of 15 faults, while the master learns whom to ask from specialists that are still guessing;
early guesses do harm, so the master learns to stop asking. Imitating a teacher first gives
every agent a sensible starting point; PPO then optimises the real reward from there.

The teacher is the ``oracle`` (it knows the true faults and applies their best cure). The
student only sees telemetry, so imitating it is learning to diagnose. Data are collected with
DAgger: round 0 follows the teacher; round ``r`` lets the teacher act with probability
``teacher_share ** r`` and the student otherwise, while the teacher labels every state, so the
student also sees (and learns to recover from) the states its own mistakes lead to, such as a
memory leak left to grow until it is plain to see. Labels map onto the hierarchy: the oracle's cure ``a`` at
stage ``s`` becomes ``delegate_<domain of a>`` for the master and ``(a, s)`` for that
specialist; ``observe`` stays ``observe``. The value heads are fitted to the discounted returns
of the same episodes (the environment's own rewards), so PPO's first advantages make sense.

The simulated steps spent here count against the training budget (``cluster.train`` adds them
to ``pipeline_steps``), so a warm-started run and a cold one get the same number of steps.

``source: experience`` takes round 0, the teacher's own episodes, from the experience table
(``checkpoints.experience``) instead of simulating them: by default the ``oracle``'s episodes,
which ``record_episodes`` (``pipemedic experience record``) writes once for any number of later
runs. The later DAgger rounds stay live: they need the current student acting. (Cloning the
stored episodes alone, with no live rounds, was measured and is much worse: the student never
sees the states its own mistakes lead to, and specialists are only labelled where the oracle
asked them; see the README.)
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from agents.networks import PolicyValueNet
from agents.policy import EpisodeContext, make_policy
from envs.catalogue import (
    ACTION_DOMAIN,
    ACTION_ID,
    DOMAINS,
    FAULT_DOMAIN_INDEX,
    FAULT_TYPES,
    SIM_ACTIONS,
    best_cure,
    master_action_name,
)
from envs.errors import ConfigError
from envs.multi_agent_env import (
    MASTER,
    OBS_BOUND,
    EnvConfig,
    PipelineMedicEnv,
    agent_id,
    split_agent_id,
)
from envs.observation import LAYOUTS, MODEL_SLOT
from envs.simulator import GroundTruth

log = logging.getLogger(__name__)
OBSERVE = ACTION_ID["observe"]
_DOMAIN_OF_FAULT = np.array(FAULT_DOMAIN_INDEX)


class WarmStartConfig(BaseModel):
    """``warm_start`` in ``configs/train.yaml``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    source: Literal["dagger", "experience"] = Field(
        "dagger", description="imitate the oracle live (DAgger) or clone stored experience"
    )
    experience_policies: tuple[str, ...] = Field(
        ("oracle",), description="source: experience — policy_version values to clone"
    )
    experience_rows: int = Field(
        2_000_000, ge=1, description="source: experience — at most this many transitions"
    )
    teacher: Literal["oracle", "oracle_capacity"] = Field(
        "oracle",
        description="whom to imitate: the oracle's cures, or those plus capacity management",
    )
    from_bundle: str | None = Field(
        None, description="start from this policy bundle's weights instead of imitating"
    )
    pipeline_steps: int = Field(200_000, ge=1000, description="simulated steps to collect")
    rounds: int = Field(3, ge=1, description="DAgger rounds (the first follows the teacher)")
    teacher_share: float = Field(
        0.5, ge=0, le=1, description="teacher acts, rounds after the first"
    )
    pipelines: int = Field(64, ge=1, description="pipelines per environment while collecting")
    epochs: int = Field(4, ge=1)
    batch_size: int = Field(512, ge=16)
    lr: float = Field(1e-3, gt=0)
    max_class_weight: float = Field(10.0, ge=1, description="cap on up-weighting rare labels")
    master_max_class_weight: float | None = Field(
        None,
        ge=1,
        description="the master's own cap (None: max_class_weight): its rare labels are "
        "delegations, the specialists' are cures",
    )
    observe_weight: dict[str, float] = Field(
        default_factory=dict,
        description="per role (master, drift, infra, quality, flat): the weight of its observe "
        "labels; a role not named weights them by frequency like every other label, which "
        "gives the master's ten times what flat's get (the master has 4-5 labels, flat over "
        "40; README)",
    )
    label_smoothing: float = Field(0.05, ge=0, lt=1)

    @field_validator("observe_weight")
    @classmethod
    def _known_roles(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(value) - set(LAYOUTS))
        if unknown:
            raise ValueError(f"unknown role(s) {unknown}; roles are {sorted(LAYOUTS)}")
        bad = {role: w for role, w in value.items() if not w > 0}
        if bad:
            raise ValueError(f"weights must be above 0, got {bad}")
        return value

    teacher_waits: bool = Field(
        False,
        description="the teacher acts on a fault only once telemetry can show it "
        "(PipelineSim.ground_truth(shown_only=True)): no labels a student cannot learn",
    )
    specialists_wait: bool = Field(
        True,
        description="with teacher_waits, the specialists' labels also leave out the faults "
        "telemetry does not show yet; false: a specialist asked is taught the cure of every "
        "active fault of its domain, so the master alone decides when to act (README)",
    )
    specialist_observe_keep: float = Field(
        0.1,
        gt=0,
        le=1,
        description="share of a specialist's observe labels kept (most steps are quiet)",
    )


class _Samples:
    """Per role: observations, masks, labels, and rewards to turn into returns."""

    def __init__(self) -> None:
        self.obs: list[np.ndarray] = []
        self.mask: list[np.ndarray] = []
        self.label: list[int] = []
        self.reward: list[float] = []
        self.episode_of: list[tuple] = []  # (round, agent, episode): returns are per agent run
        # The acting role's samples only: the teacher's own sim action behind each label (a
        # master label merges a domain's actions; cluster.wait_probe tells them apart).
        self.teacher_action: list[int] = []

    def returns(self, gamma: float) -> np.ndarray:
        out = np.zeros(len(self.reward), dtype=np.float32)
        by_agent: dict[tuple, list[int]] = defaultdict(list)
        for i, key in enumerate(self.episode_of):
            by_agent[key].append(i)
        for rows in by_agent.values():
            g = 0.0
            for i in reversed(rows):
                g = self.reward[i] + gamma * g
                out[i] = g
        return out


def _domain_labels(
    env: PipelineMedicEnv,
    teach_action: np.ndarray,
    teach_slot: np.ndarray,
    truth: GroundTruth,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per domain: the best cure (sim action, slot) of the oldest active fault of that domain in
    each pipeline, cure under way or not; ``observe`` where the domain has no active fault.
    This is what a specialist should answer if asked now. Where the teacher's own choice
    this step belongs to a domain (a cure, or capacity it adds), that domain's label is the
    teacher's choice. ``truth``: this step's ground truth (``env.sim.ground_truth()``)."""
    labels = {}
    for domain_index, d in enumerate(DOMAINS):
        action = np.full(env.k, OBSERVE, dtype=np.int64)
        slot = np.zeros(env.k, dtype=np.int64)
        in_domain = truth.active & (_DOMAIN_OF_FAULT[truth.types] == domain_index)
        # Like the oracle: the oldest fault with no cure under way, else the oldest one.
        uncured = in_domain & ~truth.cure_pending
        for i in np.flatnonzero(in_domain.any(axis=1)):
            k = int(np.argmax(uncured[i] if uncured[i].any() else in_domain[i]))
            cure = best_cure(FAULT_TYPES[truth.types[i, k]])
            action[i] = ACTION_ID[cure.action]
            on_model = cure.target == "model"
            slot[i] = MODEL_SLOT if on_model else env.encoder.slots[truth.stages[i, k]]
        labels[d] = (action, slot)
    for i, a in enumerate(teach_action):
        d = ACTION_DOMAIN.get(SIM_ACTIONS[a])
        if d is not None:
            labels[d][0][i], labels[d][1][i] = a, teach_slot[i]
    return labels


def _teacher_labels(env: PipelineMedicEnv, action: np.ndarray, slot: np.ndarray, role: str):
    """The teacher's (sim action, slot) per pipeline as indices in ``role``'s layout; a choice
    the role's mask forbids (or cannot express) becomes ``observe``."""
    layout = LAYOUTS[role]
    mask = env.encoder.action_mask(role)
    labels = np.empty(env.k, dtype=np.int64)
    for i in range(env.k):
        name = SIM_ACTIONS[action[i]]
        if role == MASTER:
            label = layout.encode(master_action_name(action[i]))
        elif name in layout.actions:
            label = layout.encode(name, slot[i] if name != "observe" else 0)
        else:  # a master action (escalate) asked of a specialist: it cannot say that
            label = layout.encode("observe")
        labels[i] = label if mask[i, label] > 0 else layout.encode("observe")
    return labels


def collect(
    env_cfg: EnvConfig,
    nets: dict[str, PolicyValueNet] | None,
    *,
    steps: int,
    teacher_share: float,
    pipelines: int,
    seed: int,
    round_id: int = 0,
    observe_keep: float = 0.1,
    teacher: str = "oracle",
    teacher_waits: bool = False,
    specialists_wait: bool = True,
) -> tuple[dict[str, _Samples], int]:
    """Run episodes in the training environment; return labelled samples and the number of
    simulated pipeline steps used.

    The acting role (master or flat) is labelled with the oracle's decision on every step it
    acts; its rewards are recorded for the value fit. Specialists are labelled on every step,
    asked or not, with their domain's cure (``_domain_labels``); as most steps are quiet, only
    ``observe_keep`` of their ``observe`` labels are kept. With ``teacher_waits`` the teacher
    (labels and acting alike) sees only the faults that telemetry shows already; with
    ``specialists_wait`` false that holds for the acting role only, and the specialists' labels
    come from every active fault.
    """
    env = PipelineMedicEnv(env_cfg.model_copy(update={"pipelines": pipelines}))
    rng = np.random.default_rng(seed)
    oracle = make_policy(teacher)
    samples: dict[str, _Samples] = defaultdict(_Samples)
    last_index: dict[str, int] = {}
    used, episode = 0, 0
    top = env.top
    while used < steps:
        obs, _ = env.reset(seed=int(rng.integers(2**31)))
        oracle.reset(EpisodeContext(env.k, env.scenario.topology, env.params))
        episode += 1
        done = False
        while not done:
            actions = {}
            if any(split_agent_id(a)[0] == top for a in obs):
                used += env.k
                truth = env.sim.ground_truth(shown_only=teacher_waits)
                teach_action, teach_stage = oracle.act(env.telemetry, truth)
                teach_slot = env.encoder.slots[teach_stage]
                follow_teacher = rng.random(env.k) < teacher_share
                if top == MASTER:
                    domain_truth = (
                        truth if specialists_wait or not teacher_waits else env.sim.ground_truth()
                    )
                    domain = _domain_labels(env, teach_action, teach_slot, domain_truth)
                else:
                    domain = {}
                for d, (action, slot) in domain.items():
                    _add_specialist_samples(samples[d], env, d, action, slot, rng, observe_keep)
                labels = _teacher_labels(env, teach_action, teach_slot, top)
                for i in range(env.k):
                    aid = agent_id(top, i)
                    o = obs[aid]
                    label = int(labels[i])
                    s = samples[top]
                    s.obs.append(o["observations"])
                    s.mask.append(o["action_mask"])
                    s.label.append(label)
                    s.reward.append(0.0)
                    s.episode_of.append((round_id, aid, episode))
                    s.teacher_action.append(int(teach_action[i]))
                    last_index[aid] = len(s.reward) - 1
                    acts_itself = follow_teacher[i] or nets is None
                    actions[aid] = label if acts_itself else _student_action(nets[top], o)
            else:  # specialists the master delegated to
                specialist_labels = {}
                for aid, o in obs.items():
                    role, i = split_agent_id(aid)
                    if follow_teacher[i] or nets is None:
                        if role not in specialist_labels:
                            specialist_labels[role] = _teacher_labels(env, *domain[role], role)
                        actions[aid] = int(specialist_labels[role][i])
                    else:
                        actions[aid] = _student_action(nets[role], o)
            obs, rewards, _, truncated, _ = env.step(actions)
            for aid, r in rewards.items():
                if aid in last_index:
                    samples[top].reward[last_index[aid]] += r
            done = truncated["__all__"]
    return samples, used


def _add_specialist_samples(s, env, role, action, slot, rng, observe_keep) -> None:
    """Append one labelled sample per pipeline; an ``observe`` label is kept with probability
    ``observe_keep``."""
    layout = LAYOUTS[role]
    obs = np.clip(env.encoder.observe(role), -OBS_BOUND, OBS_BOUND)
    mask = env.encoder.action_mask(role)
    for i in range(env.k):
        name = SIM_ACTIONS[action[i]]
        label = layout.encode(name, slot[i] if name != "observe" else 0)
        if mask[i, label] == 0 or (name == "observe" and rng.random() > observe_keep):
            continue
        s.obs.append(obs[i])
        s.mask.append(mask[i])
        s.label.append(label)


@torch.no_grad()
def _student_action(net: PolicyValueNet, o: dict[str, np.ndarray]) -> int:
    obs = torch.from_numpy(o["observations"][None])
    mask = torch.from_numpy(o["action_mask"][None])
    return int(net.logits(obs, mask).argmax())


def class_weight_cap(role: str, cfg: WarmStartConfig) -> float:
    """How far ``role``'s rarest labels may be up-weighted: ``master_max_class_weight`` for
    the master when set, else ``max_class_weight``."""
    if role == MASTER and cfg.master_max_class_weight is not None:
        return cfg.master_max_class_weight
    return cfg.max_class_weight


def label_weights(label: torch.Tensor, n_actions: int, cap: float) -> torch.Tensor:
    """Per sample, the inverse of its label's frequency (1 for a label as common as the
    average one), capped at ``cap``: most steps are quiet and some faults are rare, and
    weighting keeps rare cures from being drowned out; ``cap`` 1 weights nothing up."""
    counts = torch.bincount(label, minlength=n_actions).float()
    return (counts[label].reciprocal() * len(label) / counts.count_nonzero()).clamp(max=cap)


def sample_weights(
    label: torch.Tensor, role: str, n_actions: int, cfg: WarmStartConfig
) -> torch.Tensor:
    """Per sample, its weight in the imitation loss: ``label_weights``, except that ``role``'s
    ``observe`` labels weigh ``observe_weight[role]`` where that is set."""
    weight = label_weights(label, n_actions, class_weight_cap(role, cfg))
    if role in cfg.observe_weight:
        weight[label == LAYOUTS[role].encode("observe")] = cfg.observe_weight[role]
    return weight


@dataclass(frozen=True)
class LabelBalance:
    """One role's imitation labels and what ``sample_weights`` makes of them."""

    role: str
    samples: int
    labels: int  # distinct labels present
    observe_share: float
    observe_weight: float  # per observe sample (nan when there is none)
    acting_to_observe: float  # total weight of the acting samples over that of the observe ones

    @classmethod
    def of(cls, role: str, label: list[int], cfg: WarmStartConfig) -> LabelBalance:
        y = torch.tensor(label)
        weight = sample_weights(y, role, LAYOUTS[role].size, cfg)
        quiet = y == LAYOUTS[role].encode("observe")
        return cls(
            role=role,
            samples=len(y),
            labels=int(torch.bincount(y).count_nonzero()),
            observe_share=float(quiet.float().mean()),
            observe_weight=float(weight[quiet][0]) if quiet.any() else float("nan"),
            acting_to_observe=float(weight[~quiet].sum() / weight[quiet].sum())
            if quiet.any()
            else float("inf"),
        )


def fit(
    nets: dict[str, PolicyValueNet],
    data: dict[str, _Samples],
    cfg: WarmStartConfig,
    gamma: float,
    seed: int,
) -> dict[str, float]:
    """Cross-entropy on the teacher's labels and MSE on returns; returns label accuracy per role."""
    torch.manual_seed(seed)
    accuracy = {}
    for role, s in data.items():
        if not s.label:
            continue
        net = nets[role]
        obs = torch.from_numpy(np.stack(s.obs))
        mask = torch.from_numpy(np.stack(s.mask))
        label = torch.tensor(s.label)
        # Only the acting role has a reward per sample; specialists are also labelled on steps
        # they did not act, so their value heads are left to PPO.
        acted = len(s.reward) == len(s.label)
        ret = torch.from_numpy(s.returns(gamma)) if acted else None
        opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
        n = len(label)
        weight = sample_weights(label, role, net.n_actions, cfg)
        # Label smoothing over the allowed actions keeps some probability on the alternatives,
        # so PPO can still explore where the teacher's labels were thin.
        allowed = mask / mask.sum(dim=1, keepdim=True)
        target = (1 - cfg.label_smoothing) * torch.nn.functional.one_hot(
            label, net.n_actions
        ).float() + cfg.label_smoothing * allowed
        acting = label != LAYOUTS[role].encode("observe")
        for _ in range(cfg.epochs):
            for idx in torch.randperm(n).split(cfg.batch_size):
                logits = net.logits(obs[idx], mask[idx])
                ce = -(target[idx] * torch.log_softmax(logits, dim=1)).sum(dim=1)
                loss = (ce * weight[idx]).sum() / weight[idx].sum()
                if ret is not None:
                    loss = loss + 0.5 * torch.nn.functional.mse_loss(net.value(obs[idx]), ret[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        with torch.no_grad():
            hit = net.logits(obs, mask).argmax(1) == label
            accuracy[role] = float(hit.float().mean())
            accuracy[f"{role} (acting labels)"] = (
                float(hit[acting].float().mean()) if acting.any() else float("nan")
            )
    return accuracy


def warm_start(
    nets: dict[str, PolicyValueNet],
    env_cfg: EnvConfig,
    cfg: WarmStartConfig,
    *,
    gamma: float,
    seed: int,
    on_round: Callable[[int, int, dict[str, float]], None] | None = None,
) -> int:
    """Pre-train ``nets`` in place; returns the simulated pipeline steps used.

    With ``source: experience`` round 0 (the teacher's own episodes) is read from the
    experience table instead of simulated; the later rounds, where the student acts and the
    teacher labels, are live as usual (they need the current student, so no table can hold
    them in advance)."""
    total = 0
    per_round = max(1, cfg.pipeline_steps // cfg.rounds)
    merged: dict[str, _Samples] = defaultdict(_Samples)
    first_live_round = 0
    if cfg.source == "experience":
        if cfg.teacher_waits:
            log.warning(
                "warm_start.teacher_waits applies to the live rounds only: the stored episodes "
                "are the teacher's decisions as recorded, leak onsets included"
            )
        data = samples_from_experience(
            policies=cfg.experience_policies, max_rows=cfg.experience_rows, seed=seed
        )
        top = MASTER if env_cfg.mode == "hierarchical" else "flat"
        if top not in data:
            raise ConfigError(
                f"warm_start.source is experience, but the experience table has no {top} "
                f"transitions from {list(cfg.experience_policies)}; record some with "
                f"`pipemedic experience record --policy oracle --kind {env_cfg.mode}`"
            )
        for role in sorted(set(nets) - set(data)):
            log.warning("no %s transitions in the experience: %s keeps its weights", role, role)
        merged.update(data)
        accuracy = fit(nets, merged, cfg, gamma, seed)
        if on_round:
            on_round(1, 0, accuracy)
        first_live_round = 1
    for r in range(first_live_round, cfg.rounds):
        data, used = collect(
            env_cfg,
            None if r == 0 else nets,
            steps=per_round,
            teacher_share=cfg.teacher_share**r,
            pipelines=cfg.pipelines,
            seed=seed * 1000 + r,
            round_id=r,
            observe_keep=cfg.specialist_observe_keep,
            teacher=cfg.teacher,
            teacher_waits=cfg.teacher_waits,
            specialists_wait=cfg.specialists_wait,
        )
        total += used
        for role, s in data.items():  # DAgger: train on everything collected so far
            m = merged[role]
            m.obs += s.obs
            m.mask += s.mask
            m.label += s.label
            m.reward += s.reward
            m.episode_of += s.episode_of
        accuracy = fit(nets, merged, cfg, gamma, seed + r)
        if on_round:
            on_round(r + 1, total, accuracy)
    return total


# ---------------------------------------------------------------------- experience
def record_episodes(
    env_cfg: EnvConfig,
    teacher: str,
    writer,
    *,
    steps: int,
    seed: int,
    pipelines: int = 64,
) -> int:
    """Let the baseline ``teacher`` (``oracle``, ``runbook``, ...) drive the training
    environment and append every agent's transitions to ``writer`` (an ``ExperienceWriter``).

    The teacher's (action, stage) maps onto the agents as in DAgger: the master delegates to the
    action's domain, that specialist picks (action, stage). A transition closes when its agent
    next gets an observation (the master every step, a specialist the next time it is asked, or
    at the end of the episode); the agent's rewards in between are its reward. Returns the
    simulated pipeline steps used.
    """
    from checkpoints.experience import Transitions

    env = PipelineMedicEnv(env_cfg.model_copy(update={"pipelines": pipelines}))
    policy = make_policy(teacher)
    rng = np.random.default_rng(seed)
    used, episode = 0, 0
    while used < steps:
        episode_seed = int(rng.integers(2**31))
        obs, _ = env.reset(seed=episode_seed)
        policy.reset(EpisodeContext(env.k, env.scenario.topology, env.params))
        episode += 1
        name = f"{teacher}-{seed}-{episode}"
        open_: dict[str, dict] = {}  # agent id → its transition waiting for the next observation
        rows: dict[str, list] = defaultdict(list)
        choice = None
        done = False
        while True:
            for aid, o in obs.items():  # an observation closes that agent's open transition
                if aid in open_:
                    t = open_.pop(aid)
                    t["next_observation"] = o["observations"]
                    t["truncated"] = done
                    for k, v in t.items():
                        rows[k].append(v)
            if done:
                break
            if split_agent_id(next(iter(obs)))[0] == env.top:
                used += env.k
                action, stage = policy.act(env.telemetry, env.sim.ground_truth())
                choice = (action, env.encoder.slots[stage])
            labels = {}
            actions = {}
            for aid, o in obs.items():
                role, i = split_agent_id(aid)
                if role not in labels:
                    labels[role] = _teacher_labels(env, choice[0], choice[1], role)
                actions[aid] = int(labels[role][i])
                open_[aid] = {
                    "episode": f"{name}/{i}",
                    "step": int(env.sim.t),
                    "agent": role,
                    "observation": o["observations"],
                    "action_mask": o["action_mask"] > 0,
                    "action": actions[aid],
                    "reward": 0.0,
                }
            obs, rewards, _, truncated, _ = env.step(actions)
            for aid, r in rewards.items():
                open_[aid]["reward"] += r
            done = truncated["__all__"]
        writer.add(
            Transitions(
                episode=rows["episode"],
                step=np.array(rows["step"]),
                agent=rows["agent"],
                observation=rows["observation"],
                next_observation=rows["next_observation"],
                action_mask=rows["action_mask"],
                action=np.array(rows["action"]),
                action_prob=np.ones(len(rows["action"]), dtype=np.float32),
                reward=np.array(rows["reward"]),
                truncated=np.array(rows["truncated"]),
                policy_version=teacher,
                scenario=env.scenario.name,
            )
        )
    writer.flush()
    return used


def samples_from_experience(
    *, policies: tuple[str, ...], max_rows: int, seed: int, uri: str | None = None
) -> dict[str, _Samples]:
    """Imitation samples per role from the experience table's ``sim`` transitions of
    ``policies`` (the recorded action is the label)."""
    import pyarrow.compute as pc

    from agents.inference import agent_sizes
    from checkpoints.experience import ReplaySampler

    sampler = ReplaySampler(uri)
    filters = {"sources": ["sim"], "policy_versions": list(policies)}
    # Returns need whole episodes: pick episodes at random until ``max_rows`` transitions.
    keys = sampler.read(columns=["episode"], **filters).column("episode")
    episodes, counts = np.unique(keys.to_numpy(zero_copy_only=False), return_counts=True)
    order = np.random.default_rng(seed).permutation(len(episodes))
    keep = order[: max(1, int(np.searchsorted(np.cumsum(counts[order]), max_rows, "right")))]
    table = sampler.read(
        columns=["episode", "agent", "step", "observation", "action_mask", "action", "reward"],
        episodes=list(episodes[keep]) if len(keep) < len(episodes) else None,
        **filters,
    )
    table = table.sort_by([("agent", "ascending"), ("episode", "ascending"), ("step", "ascending")])
    out: dict[str, _Samples] = {}
    agents = table.column("agent").to_numpy(zero_copy_only=False)
    for role in np.unique(agents):
        part = table.filter(agents == role)
        # Rows recorded by code with another observation layout cannot be learned from.
        size = agent_sizes(str(role))[0]
        fits = pc.equal(pc.list_value_length(part.column("observation")), size)
        if not pc.all(fits).as_py():
            log.warning(
                "experience: %d %s transitions have observations of another size than this "
                "code's %d (recorded by an older version); they are skipped",
                len(part) - pc.sum(fits).as_py(),
                role,
                size,
            )
            part = part.filter(fits)
            if len(part) == 0:
                continue
        s = _Samples()
        obs = np.stack(part.column("observation").to_numpy(zero_copy_only=False))
        s.obs = list(np.clip(obs.astype(np.float32), -OBS_BOUND, OBS_BOUND))
        s.mask = list(
            np.stack(part.column("action_mask").to_numpy(zero_copy_only=False)).astype(np.float32)
        )
        s.label = part.column("action").to_pylist()
        s.reward = part.column("reward").to_pylist()
        s.episode_of = [(e, role) for e in part.column("episode").to_pylist()]
        out[str(role)] = s
    return out
