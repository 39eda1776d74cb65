"""Deciding without Ray: load an exported policy and run master → specialist in one call.

A *policy bundle* is a folder written by training (``export_bundle``)::

    policy.json            kind (hierarchical|flat), per-agent sizes, training facts
    master.safetensors     one weights file per agent (safetensors: loading runs no code)
    drift.safetensors ...

The same manifest and weights are what the Delta checkpoints table stores per version
(``checkpoints.policies``); ``LearnedPolicy.from_store(kind)`` loads the promoted one, which is
what ``--policy hierarchical`` / ``--policy flat`` mean.

``LearnedPolicy`` is the one code path that turns telemetry into a decision for a learned
policy: the evaluation harness uses it for ``hierarchical`` and ``flat``, and serving will too.
Decisions are greedy (the most probable allowed action) unless ``sample=True`` or the bundle
carries another decision rule: an ``act_threshold``, raised hands or a delegation gate.

The act threshold
    The top agent (``master``, or ``flat``) splits its probability between *acting* (a
    delegation; for ``flat`` any remediation) and *waiting* (``observe``, ``escalate``). Greedy
    choice acts only when one acting choice beats every waiting one, so probability spread
    over several delegations loses to ``observe`` even when acting as a whole is more likely.
    With ``act_threshold`` t the top agent acts, with its most probable acting choice, whenever
    acting as a whole has probability above t, and otherwise waits with its most probable
    waiting choice. Training picks t (or greedy) by validation score (``cluster.train``).
    Serving reports the chosen choice's probability as its confidence, and a delegation chosen
    by the threshold can be below 0.5, so with a threshold the service's ``escalate_below``
    guardrail escalates more often than validation (which has no guardrails) shows.

Raised hands (``hand_raise``, hierarchical only)
    The master gates every remediation: a specialist is asked only if the master delegates,
    so a fault the specialist would cure goes unhandled while the master is unsure (the two
    gates in series of the README). With ``hand_raise`` {domain: t}, on a step where the
    master's choice is ``observe``, that domain's specialist is asked anyway, on its own view;
    if its most probable remediation has probability above t, it acts (the domains in
    ``DOMAINS`` order, the first sure one wins). The master's own choice is still what
    ``Decision.chosen`` records for it; ``Decision.raised_hand`` marks these rows, and their
    ``Decision.confidence`` (what serving's guardrails read) is the specialist's probability. Training picks the
    thresholds (or none) by validation score (``cluster.train``).

The delegation gate (``delegation_gate``, hierarchical only)
    A learned replacement for the master's own argmax (``agents.delegation_gate``): a small
    logistic model over the master's probabilities and each specialist's wish to act, all
    computed on every step, that picks the master's action. ``Decision.chosen`` and
    ``Decision.confidence`` and ``Decision.master_probs`` then carry the gate's probabilities
    for the master's part (the behaviour probabilities serving logs as experience). A rule has
    the gate or an act threshold / raised hands, not both.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load, save

from agents.delegation_gate import DelegationGate, gate_features
from agents.networks import MASKED_LOGIT, PolicyValueNet
from agents.policy import EpisodeContext, register_policy
from envs.catalogue import ACTION_ID, DOMAINS, MASTER_ACTIONS, STAGES
from envs.errors import CheckpointError
from envs.observation import (
    LAYOUTS,
    N_SLOTS,
    OBS_BOUND,
    UNTARGETED_ACTIONS,
    ActionLayout,
    ObservationEncoder,
    clip,
    observation_size,
)
from envs.simulator import GroundTruth
from envs.telemetry import Telemetry

BUNDLE_FORMAT = "pipemedic-policy-v1"
AGENTS_OF_KIND: dict[str, tuple[str, ...]] = {
    "hierarchical": ("master", *DOMAINS),
    "flat": ("flat",),
}
_VIEW = {"master": "master", "flat": "master", **{d: d for d in DOMAINS}}
#: The manifest keys (and ``LearnedPolicy.set_rule`` keywords) of a decision rule.
RULE_KEYS: tuple[str, ...] = ("act_threshold", "hand_raise", "delegation_gate")
#: The choices that wait instead of acting (see the act threshold and raised hands).
WAITING = frozenset({"observe", "escalate"})
_OBSERVE = MASTER_ACTIONS.index("observe")
#: Per agent, which entries of its layout are acting choices (for a specialist: its
#: remediations, everything but ``observe``).
ACTING: dict[str, np.ndarray] = {
    agent: np.array([layout.decode(i)[0] not in WAITING for i in range(layout.size)])
    for agent, layout in LAYOUTS.items()
}


def agent_sizes(agent: str) -> tuple[int, int]:
    """(observation size, number of actions) of an agent's network."""
    return observation_size(_VIEW[agent]), LAYOUTS[agent].size


def weights_of(nets: dict[str, PolicyValueNet]) -> dict[str, bytes]:
    """Each agent's weights as safetensors bytes (what bundles and the checkpoints table hold)."""
    return {
        agent: save({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()})
        for agent, net in nets.items()
    }


def manifest_for(kind: str, nets: dict[str, PolicyValueNet], info: dict[str, Any]) -> dict:
    agents = {
        a: {"obs_size": n.obs_size, "n_actions": n.n_actions, "hidden": n.hidden}
        for a, n in nets.items()
    }
    return {"format": BUNDLE_FORMAT, "kind": kind, "agents": agents, **info}


def export_bundle(
    out: Path, kind: str, nets: dict[str, PolicyValueNet], info: dict[str, Any]
) -> Path:
    """Write a bundle atomically (to a temporary folder, then renamed into place)."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for agent, data in weights_of(nets).items():
        (tmp / f"{agent}.safetensors").write_bytes(data)
    (tmp / "policy.json").write_text(json.dumps(manifest_for(kind, nets, info), indent=2))
    if out.exists():
        old = out.with_name(out.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)
    return out


def load_bundle(path: Path) -> tuple[dict[str, Any], dict[str, PolicyValueNet]]:
    """Manifest and networks of a bundle folder; a clear CheckpointError when anything is off."""
    path = Path(path)
    manifest_file = path / "policy.json"
    if not manifest_file.exists():
        raise CheckpointError(
            f"no policy bundle at {path} (missing policy.json); train one with "
            "`python -m cluster.train --config configs/train.yaml`"
        )
    manifest = json.loads(manifest_file.read_text())
    files = {
        a: path / f"{a}.safetensors"
        for a in AGENTS_OF_KIND.get(manifest.get("kind"), ())
        if (path / f"{a}.safetensors").exists()
    }
    weights = {a: f.read_bytes() for a, f in files.items()}
    return manifest, nets_from_weights(manifest, weights, where=str(path))


def check_sizes(agent: str, spec: dict[str, Any], *, where: str) -> None:
    """A clear CheckpointError when a manifest's agent ``spec`` was trained for other
    observation or action sizes than this code's (``agent_sizes``)."""
    expected = agent_sizes(agent)
    if (spec.get("obs_size"), spec.get("n_actions")) != expected:
        raise CheckpointError(
            f"{where}: agent {agent!r} was trained for observation/action sizes "
            f"{(spec.get('obs_size'), spec.get('n_actions'))}, this code uses {expected}"
        )


def nets_from_weights(
    manifest: dict[str, Any], weights: dict[str, bytes], *, where: str
) -> dict[str, PolicyValueNet]:
    """Networks from a manifest and each agent's safetensors bytes, checked against this code's
    observation and action sizes."""
    if manifest.get("format") != BUNDLE_FORMAT:
        raise CheckpointError(f"{where}: format {manifest.get('format')!r} is not {BUNDLE_FORMAT}")
    kind = manifest.get("kind")
    if kind not in AGENTS_OF_KIND:
        raise CheckpointError(f"{where}: unknown kind {kind!r}")
    nets = {}
    for agent in AGENTS_OF_KIND[kind]:
        spec = manifest.get("agents", {}).get(agent)
        if spec is None:
            raise CheckpointError(f"{where}: agent {agent!r} missing from the manifest")
        check_sizes(agent, spec, where=where)
        if agent not in weights:
            raise CheckpointError(f"{where}: the weights of agent {agent!r} are missing")
        net = PolicyValueNet(spec["obs_size"], spec["n_actions"], spec["hidden"])
        net.load_state_dict(load(weights[agent]))
        net.eval()
        nets[agent] = net
    return nets


def fresh_nets(
    kind: str, *, hidden: tuple[int, ...] = (64, 64), seed: int = 0
) -> dict[str, PolicyValueNet]:
    """Freshly initialised networks of ``kind`` (near-uniform over allowed actions): what a
    service runs before any training, and what the serving tests publish."""
    if kind not in AGENTS_OF_KIND:
        raise CheckpointError(f"unknown kind {kind!r}; expected one of {sorted(AGENTS_OF_KIND)}")
    torch.manual_seed(seed)
    nets = {a: PolicyValueNet(*agent_sizes(a), list(hidden)) for a in AGENTS_OF_KIND[kind]}
    for net in nets.values():
        net.eval()
    return nets


def publish_nets(
    kind: str,
    nets: dict[str, PolicyValueNet],
    *,
    root: str | None,
    run_id: str,
    iteration: int,
    promote_reason: str | None = None,
) -> int:
    """Store ``nets`` as a new version of ``kind`` in the checkpoints table (promoted when a
    reason is given); returns the version. For policies made outside training: a fresh policy
    to serve before any training, the tests' hand-set ones."""
    from checkpoints.policies import CheckpointStore

    store = CheckpointStore(root)
    version = store.publish(
        kind,
        weights_of(nets),
        run_id=run_id,
        iteration=iteration,
        pipeline_steps=0,
        manifest=manifest_for(kind, nets, {"run_id": run_id}),
    )
    if promote_reason is not None:
        store.promote(kind, version, reason=promote_reason)
    return version


@dataclass
class Decision:
    """Decisions for a batch of pipelines (arrays of shape (n,) unless noted)."""

    action: np.ndarray  # sim action ids (SIM_ACTIONS)
    slot: np.ndarray  # stage slots (envs.observation: STAGES order)
    stage: np.ndarray  # topology indices, what the simulator takes
    specialist: list[str | None]  # the specialist that chose, None when the master acted alone
    # (n, len(MASTER_ACTIONS)): what the master's choice came from, the master network's
    # probabilities or, when a delegation gate decides, the gate's; None for flat.
    master_probs: np.ndarray | None
    # Per pipeline: for each agent that decided, its most probable choices ("action@stage").
    action_probs: list[dict[str, dict[str, float]]] = field(default_factory=list)
    # Per pipeline: for each agent that decided, (index in its layout, probability of it).
    chosen: list[dict[str, tuple[int, float]]] = field(default_factory=list)
    # Per agent that decided: (rows, observations, action masks) it was given.
    inputs: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict)
    # Per pipeline: a specialist acted on its own while the master chose observe (hand_raise;
    # always False for flat).
    raised_hand: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    # Per pipeline: the probability the deciding agents gave this decision, the product of
    # their chosen probabilities; a raised hand's is its specialist's alone (the master chose
    # to wait, so its probability is no factor of this action).
    confidence: np.ndarray = field(default_factory=lambda: np.zeros(0))


class NumpyPolicyHead:
    """A ``PolicyValueNet``'s policy MLP evaluated with NumPy, on views of the torch weights
    (no copy: later changes to the weights show through).

    Deciding for one pipeline, torch's per-call overhead dominates a small MLP: measured with
    ``pipemedic bench serve``, the NumPy forward is several times faster at one row and still
    faster at a few hundred. Training keeps torch; this is inference only."""

    def __init__(self, net: PolicyValueNet):
        linears = [m for m in net.pi if isinstance(m, torch.nn.Linear)]
        self.layers = [(m.weight.detach().numpy(), m.bias.detach().numpy()) for m in linears]

    def probs(self, obs: np.ndarray, mask: np.ndarray) -> np.ndarray:
        x = obs
        for i, (w, b) in enumerate(self.layers):
            x = x @ w.T + b
            if i < len(self.layers) - 1:
                np.tanh(x, out=x)
        x = np.where(mask > 0, x, np.float32(MASKED_LOGIT))
        x = np.exp(x - x.max(axis=1, keepdims=True))
        return x / x.sum(axis=1, keepdims=True)


class LearnedPolicy:
    """A trained ``hierarchical`` or ``flat`` policy; implements ``agents.policy.Policy``."""

    needs_ground_truth = False

    def __init__(
        self,
        manifest: dict[str, Any],
        nets: dict[str, PolicyValueNet],
        *,
        sample: bool = False,
        act_threshold: float | None = None,
        hand_raise: dict[str, float] | None = None,
        delegation_gate: DelegationGate | None = None,
    ):
        """``act_threshold``, ``hand_raise`` and ``delegation_gate``, when any is given, replace
        the bundle's decision rule (its manifest's keys of those names) as a whole; with none
        given the bundle's own rule holds (absent keys: greedy). See the module docstring."""
        self.manifest = manifest
        self.name = manifest["kind"]
        self.nets = nets
        self.heads = {agent: NumpyPolicyHead(net) for agent, net in nets.items()}
        self.sample = sample
        given = act_threshold is not None or hand_raise is not None or delegation_gate is not None
        if given:  # the rule given replaces the bundle's whole rule
            self.set_rule(
                act_threshold=act_threshold, hand_raise=hand_raise, delegation_gate=delegation_gate
            )
        else:
            stored_gate = manifest.get("delegation_gate")
            self.set_rule(
                act_threshold=manifest.get("act_threshold"),
                hand_raise=manifest.get("hand_raise"),
                delegation_gate=(
                    None
                    if stored_gate is None
                    else DelegationGate.from_manifest(
                        stored_gate, where=manifest.get("policy_version", "policy.json")
                    )
                ),
            )
        self._rng = np.random.default_rng(0)

    def set_rule(
        self,
        *,
        act_threshold: float | None = None,
        hand_raise: dict[str, float] | None = None,
        delegation_gate: DelegationGate | None = None,
    ) -> None:
        """Decide by this rule from now on (all None: greedy); a CheckpointError when the rule
        is malformed or mixes the gate with another rule."""
        if act_threshold is not None and not 0 < act_threshold < 1:
            raise CheckpointError(
                f"act_threshold must lie strictly between 0 and 1, got {act_threshold}"
            )
        check_hand_raise(hand_raise, self.name)
        if delegation_gate is not None:
            if self.name != "hierarchical":
                raise CheckpointError(
                    f"delegation_gate is for hierarchical policies only, not {self.name!r}"
                )
            if act_threshold is not None or hand_raise:
                raise CheckpointError(
                    "delegation_gate replaces the master's act threshold and raised hands; "
                    "a rule may have the gate or those, not both"
                )
        self.act_threshold = act_threshold
        self.hand_raise = hand_raise
        self.delegation_gate = delegation_gate

    def rule(self) -> dict[str, Any]:
        """The decision rule in force, as ``set_rule`` takes it (keys ``RULE_KEYS``)."""
        return {key: getattr(self, key) for key in RULE_KEYS}

    @classmethod
    def load(cls, path: Path | str, **kw: Any) -> LearnedPolicy:
        """From a bundle folder (a training run's ``policy/``)."""
        manifest, nets = load_bundle(Path(path))
        return cls(manifest, nets, **kw)

    @classmethod
    def from_store(
        cls, kind: str, *, root: str | None = None, version: int | None = None, **kw: Any
    ) -> LearnedPolicy:
        """The promoted version of ``kind`` in the checkpoints table (``checkpoints.policies``);
        if its hash check fails, the version promoted before it. With ``version``, that
        version (``CheckpointError`` if it is missing or fails its check)."""
        from checkpoints.policies import CheckpointStore

        store = CheckpointStore(root)
        stored = store.load_promoted(kind) if version is None else store.load(kind, version)
        facts = {
            "run_id": stored.run_id,
            "iteration": stored.iteration,
            "pipeline_steps": stored.pipeline_steps,
            "created_at": stored.created_at.isoformat(),
        }
        manifest = {**stored.manifest, "policy_version": stored.name, "stored": facts}
        nets = nets_from_weights(manifest, stored.weights, where=stored.name)
        return cls(manifest, nets, **kw)

    @property
    def version(self) -> str:
        """``KIND:vN`` for a stored version; ``KIND:bundle`` for a folder."""
        return self.manifest.get("policy_version", f"{self.name}:bundle")

    def reset(self, ctx: EpisodeContext) -> None:
        self.encoder = ObservationEncoder(ctx.topology, ctx.params, n=ctx.n)

    def act(
        self, telemetry: Telemetry, truth: GroundTruth | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        self.encoder.update(telemetry)
        d = self.decide(self.encoder)
        self.encoder.record_action(d.action, d.slot)
        return d.action, d.stage

    # ------------------------------------------------------------------ the decision
    def _probs(
        self, agent: str, enc: ObservationEncoder, rows: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Action probabilities of ``agent`` for ``rows``, with the observations and masks."""
        obs = clip(enc.observe(_VIEW[agent])[rows], -OBS_BOUND, OBS_BOUND)
        mask = enc.action_mask(agent)[rows]
        return self.heads[agent].probs(obs, mask), obs, mask

    def _choose(self, probs: np.ndarray) -> np.ndarray:
        if not self.sample:
            return probs.argmax(axis=1)
        return np.array([self._rng.choice(len(p), p=p / p.sum()) for p in probs])

    def _choose_top(self, agent: str, probs: np.ndarray) -> np.ndarray:
        """The top agent's choice: greedy, sampled, or by the act threshold."""
        if self.sample or self.act_threshold is None:
            return self._choose(probs)
        acting = ACTING[agent]
        best_acting = np.where(acting, probs, -1.0).argmax(axis=1)
        best_waiting = np.where(acting, -1.0, probs).argmax(axis=1)
        act = probs[:, acting].sum(axis=1) > self.act_threshold
        return np.where(act, best_acting, best_waiting)

    def decide(self, enc: ObservationEncoder) -> Decision:
        """Master → specialist for every pipeline the encoder tracks (after ``enc.update``)."""
        n = enc.n
        everyone = np.arange(n)
        action = np.full(n, ACTION_ID["observe"], dtype=np.int64)
        slot = np.zeros(n, dtype=np.int64)
        specialist: list[str | None] = [None] * n
        probs_by_agent: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        inputs: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        master_probs = None
        raised = np.zeros(n, dtype=bool)
        # Per specialist, (probs, obs, mask) for every pipeline, where the gate already ran it.
        seen: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        if self.name == "flat":
            choosers = {"flat": everyone}
        else:
            master_probs, obs, mask = self._probs("master", enc, everyone)
            inputs["master"] = (everyone, obs, mask)
            if self.delegation_gate is not None and not self.sample:
                gate_probs = self.delegation_gate.probs(
                    self._gate_features(enc, master_probs, seen), mask
                )
                master_choice = gate_probs.argmax(axis=1)
                master_probs = gate_probs
                probs_by_agent["master"] = (everyone, gate_probs, master_choice)
            else:
                master_choice = self._choose_top("master", master_probs)
                probs_by_agent["master"] = (everyone, master_probs, master_choice)
            choice, raised = self._raised_hands(enc, master_choice)
            for i, c in enumerate(choice):
                if not MASTER_ACTIONS[c].startswith("delegate_"):
                    action[i] = ACTION_ID[MASTER_ACTIONS[c]]
            choosers = {
                d: np.flatnonzero(choice == MASTER_ACTIONS.index(f"delegate_{d}")) for d in DOMAINS
            }
        for agent, rows in choosers.items():
            if len(rows) == 0:
                continue
            if agent in seen:
                probs, obs, mask = (x[rows] for x in seen[agent])
            else:
                probs, obs, mask = self._probs(agent, enc, rows)
            inputs[agent] = (rows, obs, mask)
            index = self._choose_top(agent, probs) if agent == "flat" else self._choose(probs)
            action[rows], _ = enc.to_sim(agent, index)
            slot[rows] = index % N_SLOTS  # untargeted actions are masked to slot 0
            probs_by_agent[agent] = (rows, probs, index)
            if agent in DOMAINS:
                for i in rows:
                    specialist[i] = agent
        action_probs: list[dict[str, dict[str, float]]] = [{} for _ in range(n)]
        chosen: list[dict[str, tuple[int, float]]] = [{} for _ in range(n)]
        confidence = np.ones(n)
        for agent, (rows, probs, index) in probs_by_agent.items():
            picked = probs[np.arange(len(rows)), index]
            confidence[rows] *= np.where(raised[rows], 1.0, picked) if agent == "master" else picked
            for j, i in enumerate(rows):
                chosen[i][agent] = (int(index[j]), float(picked[j]))
                top = np.argsort(probs[j])[::-1][:5]
                action_probs[i][agent] = {
                    _label(LAYOUTS[agent], k): float(probs[j, k]) for k in top if probs[j, k] > 1e-4
                }
        return Decision(
            action=action,
            slot=slot,
            stage=enc.stage_of_slot[slot],
            specialist=specialist,
            master_probs=master_probs,
            action_probs=action_probs,
            chosen=chosen,
            inputs=inputs,
            raised_hand=raised,
            confidence=confidence,
        )

    def gate_inputs(self, enc: ObservationEncoder) -> np.ndarray:
        """The delegation gate's features for every pipeline the encoder tracks (after
        ``enc.update``): what fitting the gate records (``agents.delegation_gate``)."""
        master_probs, _, _ = self._probs("master", enc, np.arange(enc.n))
        return self._gate_features(enc, master_probs)

    def _gate_features(
        self,
        enc: ObservationEncoder,
        master_probs: np.ndarray,
        seen: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None,
    ) -> np.ndarray:
        """The gate's features; every specialist runs on every pipeline, and ``seen`` (when
        given) keeps each one's (probs, obs, mask) so the one delegated to is not run twice."""
        everyone = np.arange(enc.n)
        seen = {} if seen is None else seen
        for d in DOMAINS:
            seen[d] = self._probs(d, enc, everyone)
        return gate_features(master_probs, {d: seen[d][0] for d in DOMAINS})

    def _raised_hands(
        self, enc: ObservationEncoder, master_choice: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """The master's choices with ``observe`` turned into a delegation wherever a
        ``hand_raise`` specialist is sure enough, and which rows were turned."""
        choice = master_choice.copy()
        raised = np.zeros(len(choice), dtype=bool)
        if not self.hand_raise or self.sample:
            return choice, raised
        for domain in DOMAINS:
            if domain not in self.hand_raise:
                continue
            rows = np.flatnonzero(choice == _OBSERVE)
            if len(rows) == 0:
                break
            probs, _, _ = self._probs(domain, enc, rows)
            sure = np.where(ACTING[domain], probs, 0.0).max(axis=1) > self.hand_raise[domain]
            choice[rows[sure]] = MASTER_ACTIONS.index(f"delegate_{domain}")
            raised[rows[sure]] = True
        return choice, raised


def check_hand_raise(hand_raise: dict[str, float] | None, kind: str) -> None:
    """A clear error unless ``hand_raise`` maps specialists to thresholds in (0, 1)."""
    if not hand_raise:
        return
    if kind != "hierarchical":
        raise CheckpointError(f"hand_raise is for hierarchical policies only, not {kind!r}")
    for domain, t in hand_raise.items():
        if domain not in DOMAINS:
            raise CheckpointError(
                f"hand_raise: {domain!r} is not a specialist; expected one of {list(DOMAINS)}"
            )
        if not 0 < t < 1:
            raise CheckpointError(
                f"hand_raise: {domain}'s threshold must lie strictly between 0 and 1, got {t}"
            )


def _label(layout: ActionLayout, index: int) -> str:
    """``action@stage`` for a targeted choice, the bare action otherwise."""
    action, slot = layout.decode(int(index))
    targeted = layout.targeted and action not in UNTARGETED_ACTIONS
    return f"{action}@{STAGES[slot]}" if targeted else action


def _factory(kind: str):
    """``KIND`` (no version: the promoted one) and ``KIND:vN`` for ``agents.policy``."""

    def make(version: int | None = None) -> LearnedPolicy:
        return LearnedPolicy.from_store(kind, version=version)

    return make


for _kind in AGENTS_OF_KIND:
    _make = _factory(_kind)
    register_policy(_kind, _make, versioned=_make)
