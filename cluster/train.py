"""Train the hierarchical (or flat) policy with RLlib PPO on simulated pipelines.

Run it here (an embedded local Ray)::

    python -m cluster.train --config configs/train.yaml

or, unchanged, as a job on a running Ray cluster::

    ray job submit --working-dir . -- python -m cluster.train --config configs/train.yaml

The run: warm start (``agents.warm_start``, imitating the oracle), then PPO iterations. After
the warm start and every ``evaluate_every`` iterations the current policy is scored on a
validation set (the training scenarios on other seeds plus a random one, never the held-out
ones) with the training objective; the best so far is kept as ``policy/`` (early stopping).

What it writes under ``--out`` (default ``store/runs/KIND``):

    metrics.jsonl      one line per iteration: pipeline steps, steps/s, return per agent;
                       validation score and held-out metrics (for watching) at each review
    checkpoints/       RLlib checkpoints every ``checkpoint_every`` iterations; ``latest``
                       names the newest complete one
    policy/            the selected policy bundle (``agents.inference``), Ray-free
    candidate/         the policy of the latest review
    learning_curves.png

and in the Delta store (``checkpoints/``, under ``PIPEMEDIC_STORE_URI``): every reviewed policy
as a new version in the checkpoints table, with its validation score and held-out metrics; at
the end the selected version is *promoted* (what ``--policy KIND`` and serving load; skip with
``--no-promote``). With ``experience.enabled`` the env runners also append samples of their
transitions to the experience table. The figures of ``metrics.jsonl`` are also exported as
Prometheus gauges on Ray's metrics port (``cluster.train_metrics`` lists their names).

Killing the job and starting it again with the same ``--out`` resumes from the latest
checkpoint (``--fresh`` starts over); the run keeps its run id, so no version is published twice.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from agents.delegation_gate import DelegationGate, fit_delegation_gate
from agents.inference import (
    AGENTS_OF_KIND,
    LearnedPolicy,
    agent_sizes,
    check_sizes,
    export_bundle,
    fresh_nets,
    load_bundle,
    manifest_for,
    weights_of,
)
from agents.networks import PolicyValueNet
from agents.policy import Policy
from agents.ppo_config import TrainConfig, build_ppo_config, load_train_config
from agents.rollout import episode_seeds, rollout
from checkpoints.storage import local_store_dir
from envs.catalogue import ACTION_ID
from envs.errors import CheckpointError, ConfigError, PipemedicError
from envs.metrics import summarise
from envs.multi_agent_env import ScenarioMix
from envs.params import STEP_SECONDS, load_sim_params
from envs.scenario import Scenario, load_scenario

if TYPE_CHECKING:
    from agents.warm_start import WarmStartConfig

log = logging.getLogger(__name__)
KEEP_CHECKPOINTS = 2


# ---------------------------------------------------------------------- weights and bundles
def current_nets(algo, cfg: TrainConfig) -> dict[str, PolicyValueNet]:
    """The learner's current weights as plain networks (what the bundle stores)."""
    import torch

    weights = algo.learner_group.get_weights()
    nets = {}
    for agent in AGENTS_OF_KIND[cfg.kind]:
        state = {
            k.removeprefix("net."): torch.as_tensor(np.asarray(v))
            for k, v in weights[agent].items()
        }
        net = PolicyValueNet(*agent_sizes(agent), list(cfg.ppo.hidden))
        net.load_state_dict(state)
        nets[agent] = net
    return nets


def review_seed(cfg: TrainConfig) -> int:
    """The episode seed of the held-out metrics training's reviews log: ``pipemedic evaluate
    --seed`` with this value meets the same episodes; the README's figures use ``--seed 0``."""
    return cfg.seed + 1000


def evaluate_bundle(bundle: Path, cfg: TrainConfig, episodes: int | None = None) -> dict[str, Any]:
    """Held-out metrics of a bundle (with its own act threshold, if any), in this process:
    overall, per scenario and per fault type, over ``episodes`` per scenario (default
    ``cfg.eval_episodes``), on the episodes of ``review_seed(cfg)``."""
    params = load_sim_params(cfg.env.sim_config)
    policy = LearnedPolicy.load(bundle)  # rollout() resets it for every scenario
    by_scenario = {}
    for path in cfg.held_out:
        scenario = load_scenario(path)
        seeds = episode_seeds(scenario, review_seed(cfg), episodes or cfg.eval_episodes)
        by_scenario[scenario.name] = rollout(policy, scenario, seeds, params=params)
    return summarise(by_scenario)


def set_nets(algo, nets: dict[str, PolicyValueNet]) -> None:
    """Load plain networks into the learner's modules and push them to the env runners."""
    current = algo.learner_group.get_weights()
    weights = {}
    for agent, net in nets.items():
        like = next(iter(current[agent].values()))
        convert = (
            (lambda t: t.detach().numpy())
            if isinstance(like, np.ndarray)
            else (lambda t: t.detach().clone())
        )
        weights[agent] = {f"net.{k}": convert(v) for k, v in net.state_dict().items()}
    algo.learner_group.set_weights(weights)
    algo.env_runner_group.sync_weights(
        from_worker_or_learner_group=algo.learner_group, inference_only=True
    )


def _warm_start(algo, cfg: TrainConfig, console: Console) -> int:
    """Imitate the oracle (agents.warm_start), then hand the weights to RLlib."""
    ws = cfg.warm_start
    if ws.from_bundle:
        manifest, nets = load_bundle(Path(ws.from_bundle))
        if manifest["kind"] != cfg.kind:
            raise CheckpointError(
                f"warm_start.from_bundle is a {manifest['kind']} policy, not {cfg.kind}"
            )
        set_nets(algo, nets)
        console.print(f"warm start from the bundle {ws.from_bundle}")
        return int(manifest.get("pipeline_steps", 0))  # what the bundle cost, if it says
    nets = initial_nets(cfg)
    used = imitate(nets, cfg, ws, console)
    set_nets(algo, nets)
    return used


def initial_nets(cfg: TrainConfig) -> dict[str, PolicyValueNet]:
    """The networks a warm start begins from: ``fresh_nets`` seeded with ``cfg.seed``.
    Not the weights RLlib builds: those are not the same from one run to the next with the
    same seed (the same warm start from them scored 2.76 and 3.79 in validation; README), so a
    training could not be repeated, nor its warm start tried alone with
    ``pipemedic bench imitation``, which begins here too."""
    return fresh_nets(cfg.kind, hidden=tuple(cfg.ppo.hidden), seed=cfg.seed)


def imitate(
    nets: dict[str, PolicyValueNet], cfg: TrainConfig, ws: WarmStartConfig, console: Console
) -> int:
    """Run the warm start ``ws`` on ``nets`` in ``cfg``'s training environment, printing each
    DAgger round; returns the simulated pipeline steps used."""
    from agents.warm_start import warm_start

    return warm_start(
        nets,
        cfg.env_config(),
        ws,
        gamma=cfg.ppo.gamma,
        seed=cfg.seed,
        on_round=functools.partial(print_warm_start_round, console, ws.rounds),
    )


def print_warm_start_round(
    console: Console, rounds: int, round_: int, used: int, accuracy: dict[str, float]
) -> None:
    """One line per DAgger round of the warm start: steps so far and label accuracy per role."""
    acc = "  ".join(f"{k} {v:.0%}" for k, v in sorted(accuracy.items()))
    console.print(
        f"warm start round {round_}/{rounds}: {used:,} pipeline steps; label accuracy {acc}"
    )


def _check_resumable(saved_config: Path, cfg: TrainConfig) -> None:
    """Refuse to resume a run whose networks have other observation or action sizes than this
    code's (trained before an encoder change: RLlib would fail deep in a weight copy), or with
    a different ``ppo.train_modules``: RLlib's checkpoint restores which modules its learner
    updates, so the new setting would be silently ignored."""
    manifest_file = saved_config.parent / "policy" / "policy.json"
    if manifest_file.exists():
        for agent, spec in json.loads(manifest_file.read_text()).get("agents", {}).items():
            try:
                check_sizes(agent, spec, where=f"the run in {saved_config.parent}")
            except CheckpointError as exc:
                raise CheckpointError(f"{exc}; start over with --fresh") from None
    if not saved_config.exists() or cfg.kind == "flat":
        return  # flat trains its one module whatever the list says
    before = json.loads(saved_config.read_text()).get("ppo", {}).get("train_modules", [])
    if list(before) != list(cfg.ppo.train_modules):
        raise ConfigError(
            f"ppo.train_modules is {list(cfg.ppo.train_modules)} but the run in "
            f"{saved_config.parent} was started with {list(before)}; the checkpoint would keep "
            "the old setting. Start over with --fresh, or train into another folder."
        )


def validation_scenarios(cfg: TrainConfig) -> list[Scenario]:
    """The validation set: the training scenario files and one random-fault scenario like the
    training ones, on seeds training never draws. Never the held-out scenarios. Like the
    training ones, the random scenario's faults and traffic bursts are drawn per episode."""
    env = cfg.env_config()
    mix = ScenarioMix(env)
    random = Scenario(
        name="validation-random",
        duration_steps=env.random.duration_steps,
        seed=cfg.seed + 7,
        **mix.random_events(),
    )
    return [*mix.files, random]


def validation_weights(cfg: TrainConfig) -> list[float]:
    """Each validation scenario's weight in the validation score (``validation_scenarios``
    order), so the score mirrors the training mix: the random scenario weighs
    ``env.random.share``, the files share the rest equally (with no files, the random one
    weighs everything). Before this, every scenario weighed the same, so the one scenario with
    faults at once, most like the held-out ones, counted 1/16 where training draws 60% of its
    episodes like it (README)."""
    files = len(validation_scenarios(cfg)) - 1
    if files == 0:
        return [1.0]
    share = cfg.env.random.share
    return [(1.0 - share) / files] * files + [share]


#: The terms of the validation penalty, in the order they are summed.
PENALTY_TERMS: tuple[str, ...] = ("slo", "open", "lost", "cost")


@dataclass(frozen=True)
class ScenarioPenalty:
    """One scenario's penalty, per episode and per term of the training objective,
    each weighted as in the reward (``PENALTY_TERMS``): SLO-breach steps × ``rewards.slo``,
    incident-open steps × ``rewards.open``, records lost in steps' worth of inflow ×
    ``rewards.lost``, replica and action cost × ``rewards.cost``. ``idle_actions``: per
    episode, the policy's actions (anything but ``observe``) on steps with no fault active,
    when asked for (it needs the simulator's ground truth)."""

    scenario: str
    per_episode: np.ndarray  # (episodes, len(PENALTY_TERMS))
    idle_actions: float | None = None

    @property
    def episodes(self) -> int:
        return len(self.per_episode)

    def mean(self, term: str) -> float:
        return float(self.per_episode[:, PENALTY_TERMS.index(term)].mean())

    @property
    def total(self) -> float:
        """Mean penalty per episode, all terms."""
        return float(self.per_episode.sum(axis=1).mean())


class _IdleActionCounter:
    """Wraps a policy and counts its actions (anything but ``observe``) on steps where the
    simulator has no fault active as the policy decides. It asks for the ground truth and
    passes it on only to a policy that reads it (a baseline such as ``oracle_capacity``); a
    learned policy decides on telemetry alone as before. For a policy that is told of a fault
    only once telemetry shows it (``oracle_shown``), "no fault active" means none shown.
    (``bench quiet``, ``cluster.quiet_probe``, also leaves out the steps on which a fault
    starts.)"""

    needs_ground_truth = True

    def __init__(self, policy: Policy):
        self.policy, self.name, self.count = policy, policy.name, 0
        self.ground_truth_shown_only = getattr(policy, "ground_truth_shown_only", False)

    def reset(self, ctx) -> None:
        self.policy.reset(ctx)

    def act(self, telemetry, truth):
        action, stage = self.policy.act(
            telemetry, truth if self.policy.needs_ground_truth else None
        )
        quiet = ~truth.active.any(axis=1)
        self.count += int(((action != ACTION_ID["observe"]) & quiet).sum())
        return action, stage


def penalties(
    policy: Policy,
    cfg: TrainConfig,
    scenarios: list[Scenario],
    *,
    seed: int,
    episodes: int,
    count_idle_actions: bool = False,
) -> list[ScenarioPenalty]:
    """``policy``, with its own decision rule, on ``episodes`` episodes of each scenario (the
    episodes of ``seed``, as ``pipemedic evaluate --seed`` draws them): the training
    objective's penalty, per episode and term (``ScenarioPenalty``)."""
    params = load_sim_params(cfg.env.sim_config)
    w = cfg.env.rewards
    out = []
    for scenario in scenarios:
        seeds = episode_seeds(scenario, seed, episodes)
        runner = _IdleActionCounter(policy) if count_idle_actions else policy
        per_step = scenario.load.base_rps * STEP_SECONDS
        parts = [
            (
                w.slo * (m.steps - m.slo_ok_steps),
                w.open * sum(o.recovery_steps for o in m.incidents),
                w.lost * m.records_lost / per_step,
                w.cost * m.cost,
            )
            for m in rollout(runner, scenario, seeds, params=params)
        ]
        idle = runner.count / len(seeds) if count_idle_actions else None
        out.append(ScenarioPenalty(scenario.name, np.array(parts, dtype=np.float64), idle))
    return out


def validation_penalties(
    policy: Policy, cfg: TrainConfig, *, count_idle_actions: bool = False
) -> list[ScenarioPenalty]:
    """``penalties`` on the validation set (``validation_scenarios``, ``eval_episodes`` each,
    on seeds training never draws); ``validation_score`` weighs their totals with
    ``validation_weights``."""
    return penalties(
        policy,
        cfg,
        validation_scenarios(cfg),
        seed=cfg.seed + 2000,
        episodes=cfg.eval_episodes,
        count_idle_actions=count_idle_actions,
    )


def held_out_penalties(
    policy: Policy,
    cfg: TrainConfig,
    *,
    episodes: int,
    seed: int,
    count_idle_actions: bool = False,
) -> list[ScenarioPenalty]:
    """``penalties`` on the config's held-out scenarios: the training objective where the
    README's figures are measured. For reporting only; nothing is chosen by it."""
    if not cfg.held_out:
        raise ConfigError("the config lists no held_out scenarios")
    scenarios = [load_scenario(path) for path in cfg.held_out]
    return penalties(
        policy, cfg, scenarios, seed=seed, episodes=episodes, count_idle_actions=count_idle_actions
    )


def validation_score(bundle: Path, cfg: TrainConfig, **rule: Any) -> float:
    """The training objective measured on the validation set with the greedy policy (or with
    the decision rule ``rule``, keywords of ``LearnedPolicy.set_rule``): the per-episode
    penalty (SLO-breach steps, incident-open steps, records lost in steps' worth, cost) with
    the reward weights, averaged per scenario and weighted like the training mix
    (``validation_weights``). Lower is better; it picks the exported policy.
    ``validation_penalties`` splits it up."""
    policy = LearnedPolicy.load(bundle)
    policy.set_rule(**rule)  # no keywords is greedy, whatever the bundle says
    rows = validation_penalties(policy, cfg)
    return weighted_score(rows, validation_weights(cfg))


def weighted_score(rows: list[ScenarioPenalty], weights: list[float]) -> float:
    """The weighted sum of each scenario's mean penalty per episode."""
    return float(sum(w * r.total for w, r in zip(weights, rows, strict=True)))


@dataclass(frozen=True)
class DecisionRule:
    """How a bundle's networks are turned into decisions (agents.inference), with its score."""

    score: float
    act_threshold: float | None = None
    hand_raise: dict[str, float] | None = None
    delegation_gate: DelegationGate | None = None

    @property
    def label(self) -> str:
        """The rule in words (the keys of ``rule_scores`` in metrics.jsonl)."""
        if self.act_threshold is not None:
            return f"act threshold {self.act_threshold}"
        if self.hand_raise:
            return ", ".join(f"{d} raises its hand above {t}" for d, t in self.hand_raise.items())
        if self.delegation_gate is not None:
            return f"delegation gate, observe offset {self.delegation_gate.observe_offset}"
        return "greedy"

    @property
    def is_greedy(self) -> bool:
        """No rule but the networks' own argmax."""
        return self.act_threshold is None and not self.hand_raise and self.delegation_gate is None

    def manifest_entries(self) -> dict[str, Any]:
        """The rule as a bundle's manifest keeps it (``LearnedPolicy`` reads these keys)."""
        gate = self.delegation_gate
        return {
            "act_threshold": self.act_threshold,
            "hand_raise": self.hand_raise,
            "delegation_gate": gate.to_manifest() if gate is not None else None,
        }


def choose_decision_rule(
    bundle: Path, cfg: TrainConfig, on_score: Callable[[DecisionRule], None] | None = None
) -> DecisionRule:
    """Score the greedy rule and each alternative the config lists (``act_thresholds``; for
    hierarchical each of ``hand_raise_thresholds`` alone, and with ``delegation_gate.enabled``
    a gate fitted for this bundle's networks at each observe offset) on the validation set;
    the lowest score wins, greedy on a tie. ``on_score`` sees every rule as it is scored."""
    options: list[dict[str, Any]] = [{}]
    options += [{"act_threshold": t} for t in cfg.act_thresholds]
    if cfg.kind == "hierarchical":
        options += [
            {"hand_raise": {d: t}} for d, ts in cfg.hand_raise_thresholds.items() for t in ts
        ]
        if cfg.delegation_gate.enabled:
            gate, facts = fit_delegation_gate(LearnedPolicy.load(bundle), cfg, seed=gate_seed(cfg))
            log.info("delegation gate fitted: %s", facts)
            options += [
                {"delegation_gate": gate.with_offset(o)}
                for o in cfg.delegation_gate.observe_offsets
            ]
    best = None
    for option in options:
        rule = DecisionRule(validation_score(bundle, cfg, **option), **option)
        if on_score:
            on_score(rule)
        if best is None or rule.score < best.score:
            best = rule
    return best


def gate_seed(cfg: TrainConfig) -> int:
    """The seed of the training-mix episodes a delegation gate is fitted on: neither the
    validation episodes (``cfg.seed + 2000``) nor the reviews' held-out ones (``review_seed``)."""
    return cfg.seed + 3000


# ---------------------------------------------------------------------- checkpoints
def _latest_checkpoint(out: Path) -> Path | None:
    """The checkpoint ``latest`` names, or, if a kill interrupted its save, the newest complete
    one (``train_state.json`` is written last, so a folder without it is incomplete)."""
    root = out / "checkpoints"
    pointer = root / "latest"
    if pointer.exists():
        path = root / pointer.read_text().strip()
        if (path / "train_state.json").exists():
            return path
    complete = [p for p in sorted(root.glob("iter_*")) if (p / "train_state.json").exists()]
    return complete[-1] if complete else None


def _save_checkpoint(algo, out: Path, state: dict[str, Any]) -> Path:
    """Save, then point ``latest`` at it; a kill mid-save leaves the previous one in charge."""
    root = out / "checkpoints"
    name = f"iter_{state['iteration']:06d}"
    path = root / name
    if path.exists():
        shutil.rmtree(path)
    algo.save_to_path(str(path.resolve()))
    (path / "train_state.json").write_text(json.dumps(state, default=_plain))
    tmp = root / "latest.tmp"
    tmp.write_text(name)
    tmp.replace(root / "latest")
    for old in sorted(root.glob("iter_*"))[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return path


# ---------------------------------------------------------------------- the loop
def _iteration_record(result: dict, cfg: TrainConfig, before: dict, dt: float) -> dict:
    """One line of metrics.jsonl. ``pipeline_steps`` counts simulated steps of one pipeline
    (10 s each), the unit budgets are set in; RLlib's ``env_steps`` count environment steps,
    each advancing ``env.pipelines`` pipelines (and the hierarchy takes up to two per step)."""
    runners = result.get("env_runners", {})
    top = AGENTS_OF_KIND[cfg.kind][0]
    pipeline_steps = int(runners["num_module_steps_sampled_lifetime"][top]) + before.get(
        "warm_start_steps", 0
    )
    env_steps = int(runners["num_env_steps_sampled_lifetime"])
    returns = runners.get("module_episode_returns_mean", {}) or {}
    return {
        "iteration": before["iteration"] + 1,
        "pipeline_steps": pipeline_steps,
        "env_steps": env_steps,
        "pipeline_steps_per_s": round((pipeline_steps - before["pipeline_steps"]) / dt, 1),
        "env_steps_per_s": round((env_steps - before["env_steps"]) / dt, 1),
        # Per pipeline: RLlib sums the returns of all agents of a module in an episode.
        "return_per_pipeline": {
            k: round(float(v) / cfg.env.pipelines, 3) for k, v in returns.items() if np.isfinite(v)
        },
        "episodes": int(np.nan_to_num(runners.get("num_episodes", 0))),
        "time": time.time(),
    }


def train(
    cfg: TrainConfig,
    out: Path,
    *,
    fresh: bool = False,
    promote: bool = True,
    console: Console | None = None,
    max_iterations: int | None = None,
) -> dict[str, Any]:
    """Train until the budget in ``cfg.stop`` (or ``max_iterations``); return a summary."""
    from checkpoints.policies import CheckpointStore
    from cluster.ray_runtime import ensure_ray
    from cluster.train_metrics import TrainingMetrics

    console = console or Console(stderr=True, soft_wrap=True)
    out.mkdir(parents=True, exist_ok=True)
    if fresh:
        for leftover in ("checkpoints", "metrics.jsonl", "policy"):
            target = out / leftover
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    resume = _latest_checkpoint(out)
    if resume is not None:
        _check_resumable(out / "config.json", cfg)
    (out / "config.json").write_text(cfg.model_dump_json(indent=2, by_alias=True))

    metrics_file = out / "metrics.jsonl"
    bundle_dir = out / "policy"
    saved = json.loads((resume / "train_state.json").read_text()) if resume else {}
    # A resumed run keeps its id, so its versions are not published twice.
    run_id = (
        saved.get("run_id")
        or f"{cfg.kind}-{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    )
    store = CheckpointStore()
    ensure_ray()
    algo = build_ppo_config(cfg, run_id=run_id).build_algo()
    gauges = TrainingMetrics(kind=cfg.kind, run_id=run_id)
    state = {
        "run_id": run_id,
        "started_at": time.time(),
        "iteration": 0,
        "pipeline_steps": 0,
        "env_steps": 0,
        "warm_start_steps": 0,
        "train_seconds": 0.0,
    }
    if resume is not None:
        algo.restore_from_path(str(resume.resolve()))
        state = {"run_id": run_id, **saved}
        # Iterations logged after that checkpoint will be run again: drop their lines.
        kept = [r for r in read_metrics(metrics_file) if r["iteration"] <= state["iteration"]]
        metrics_file.write_text("".join(json.dumps(r, default=_plain) + "\n" for r in kept))
        console.print(
            f"resumed from {resume} (iteration {state['iteration']}, "
            f"{state['pipeline_steps']:,} pipeline steps)"
        )
    elif cfg.warm_start.enabled:
        t0 = time.monotonic()
        used = _warm_start(algo, cfg, console)
        state.update(
            pipeline_steps=used, warm_start_steps=used, train_seconds=time.monotonic() - t0
        )
        record = {"iteration": 0, "pipeline_steps": used, "warm_start": True, "time": time.time()}
        _review(algo, cfg, out, state, record, console, store, prefix="after warm start:")
        with metrics_file.open("a") as f:
            f.write(json.dumps(record, default=_plain) + "\n")
        gauges.record(record)

    deadline = time.monotonic() + cfg.stop.minutes * 60 - state["train_seconds"]
    target = cfg.stop.validation_score
    reached = target is not None and state.get("best_score", float("inf")) <= target
    started_iteration = state["iteration"]
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:,.0f}/{task.total:,.0f} pipeline steps"),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
        disable=not console.is_terminal,
    ) as progress:
        task = progress.add_task(
            f"training {cfg.kind}",
            total=cfg.stop.pipeline_steps,
            completed=state["pipeline_steps"],
            status="",
        )
        while (
            state["pipeline_steps"] < cfg.stop.pipeline_steps
            and time.monotonic() < deadline
            and not reached
        ):
            if (
                max_iterations is not None
                and state["iteration"] - started_iteration >= max_iterations
            ):
                break
            t0 = time.monotonic()
            result = algo.train()
            dt = time.monotonic() - t0
            record = _iteration_record(result, cfg, state, dt)
            state = {
                **state,
                "iteration": record["iteration"],
                "pipeline_steps": record["pipeline_steps"],
                "env_steps": record["env_steps"],
                "train_seconds": state["train_seconds"] + dt,
            }
            if state["iteration"] % cfg.evaluate_every == 0:
                _review(algo, cfg, out, state, record, console, store)
                reached = target is not None and record["validation_score"] <= target
            with metrics_file.open("a") as f:
                f.write(json.dumps(record, default=_plain) + "\n")
            gauges.record(record)
            top_return = record["return_per_pipeline"].get(AGENTS_OF_KIND[cfg.kind][0])
            shown = "-" if top_return is None else f"{top_return:.1f}"  # no episode ended
            status = (
                f"it {state['iteration']}  {record['pipeline_steps_per_s']:.0f} pipeline steps/s"
                f"  return {shown}"
            )
            if "validation_score" in record:
                status += f"  validation {record['validation_score']:.1f}"
            if "eval" in record:
                status += _eval_status(record["eval"], prefix=" ")
            progress.update(task, completed=state["pipeline_steps"], status=status)
            if not console.is_terminal:
                console.print(status)
            if state["iteration"] % cfg.checkpoint_every == 0:
                _save_checkpoint(algo, out, state)

    if state.get("reviewed_iteration") != state["iteration"]:
        record = {
            "iteration": state["iteration"],
            "pipeline_steps": state["pipeline_steps"],
            "final": True,
            "time": time.time(),
        }
        _review(algo, cfg, out, state, record, console, store, prefix="final:")
        with metrics_file.open("a") as f:
            f.write(json.dumps(record, default=_plain) + "\n")
        gauges.record(record)
    _save_checkpoint(algo, out, state)
    algo.stop()
    summary = {**state, "bundle": str(bundle_dir)}
    if promote:
        version = state["best_version"]
        store.promote(
            cfg.kind,
            version,
            reason=f"run {run_id}: best validation score at iteration {state['best_iteration']}",
        )
        summary["promoted"] = f"{cfg.kind}:v{version}"
        console.print(f"promoted {cfg.kind}:v{version} in {store.checkpoints_uri}")
    plot_learning_curves(metrics_file, out / "learning_curves.png")
    return summary


def _review(
    algo,
    cfg: TrainConfig,
    out: Path,
    state: dict,
    record: dict,
    console: Console,
    store,
    prefix: str = "",
) -> None:
    """Score the current policy on the validation set and publish it as a new version in the
    checkpoints table; keep it as ``out/policy`` when it is the best so far (early stopping on
    validation, never on held-out). Held-out metrics are logged (and stored with the version)
    for watching only. Updates ``state`` and ``record`` in place."""
    candidate = out / "candidate"
    nets = current_nets(algo, cfg)
    state["reviewed_iteration"] = state["iteration"]
    info = {**state, "config": cfg.model_dump(mode="json", by_alias=True)}
    export_bundle(candidate, cfg.kind, nets, info)
    rule_scores: dict[str, float] = {}
    rule = choose_decision_rule(
        candidate, cfg, on_score=lambda r: rule_scores.__setitem__(r.label, round(r.score, 3))
    )
    score = rule.score
    if not rule.is_greedy:
        info.update(rule.manifest_entries())
        export_bundle(candidate, cfg.kind, nets, info)
    record["validation_score"] = round(score, 3)
    record["rule_scores"] = rule_scores  # every rule the review tried, by label
    record["act_threshold"] = rule.act_threshold
    record["hand_raise"] = rule.hand_raise
    gate = rule.delegation_gate
    record["gate_observe_offset"] = gate.observe_offset if gate is not None else None
    if cfg.held_out:
        record["eval"] = evaluate_bundle(candidate, cfg)["overall"]
    version = store.publish(
        cfg.kind,
        weights_of(nets),
        run_id=state["run_id"],
        iteration=state["iteration"],
        pipeline_steps=state["pipeline_steps"],
        manifest=manifest_for(
            cfg.kind,
            nets,
            {"run_id": state["run_id"], **rule.manifest_entries()},
        ),
        eval_metrics={"validation_score": score, "held_out": record.get("eval", {})},
        config=cfg.model_dump(mode="json", by_alias=True),
    )
    record["version"] = version
    if score < state.get("best_score", float("inf")):
        state.update(best_score=score, best_iteration=state["iteration"], best_version=version)
        # The bundle's manifest says which review it is (``info`` was taken before this one
        # became the best).
        best = {k: state[k] for k in ("best_score", "best_iteration", "best_version")}
        selected = {**info, **best, "selected_iteration": state["iteration"]}
        export_bundle(out / "policy", cfg.kind, nets, selected)
    if prefix:
        line = f"{prefix} validation {score:.1f} (best {state['best_score']:.1f} at iteration {state['best_iteration']})"
        if "eval" in record:
            line += _eval_status(record["eval"], prefix=";")
        console.print(line)


def _eval_status(ev: dict[str, Any], *, prefix: str) -> str:
    return (
        f"{prefix} held-out MTTR {ev['mttr_s']:.0f}s SLO {ev['slo_adherence']:.1%} "
        f"unresolved {ev['unresolved_pct']:.1f}% lost {ev['records_lost']:,.0f}"
    )


def _plain(value: Any) -> Any:
    """JSON for NumPy scalars."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_learning_curves(metrics_file: Path, png: Path) -> None:
    """Return per pipeline by agent, validation score and held-out MTTR/SLO against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_metrics(metrics_file) if "pipeline_steps" in r]
    if not rows:
        return
    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    steps = [r["pipeline_steps"] for r in rows]
    agents = sorted({a for r in rows for a in r.get("return_per_pipeline", {})})
    for a in agents:
        values = [r.get("return_per_pipeline", {}).get(a, np.nan) for r in rows]
        axes[0].plot(steps, values, label=a)
    axes[0].set(title="episode return per pipeline, by agent", xlabel="pipeline steps")
    if agents:
        axes[0].legend()
    panels = [
        ("validation_score", "validation score (lower is better; picks the policy)"),
        ("mttr_s", "held-out MTTR (s), watched only"),
        ("slo_adherence", "held-out SLO adherence, watched only"),
    ]
    for ax, (key, title) in zip(axes[1:], panels, strict=True):
        pts = [(r["pipeline_steps"], r.get(key, r.get("eval", {}).get(key))) for r in rows]
        pts = [(x, y) for x, y in pts if y is not None]
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o")
        ax.set(title=title, xlabel="pipeline steps")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)


def train_from_options(
    config: Path,
    *,
    kind: str | None = None,
    out: Path | None = None,
    fresh: bool = False,
    iterations: int | None = None,
    env_runners: int | None = None,
    promote: bool = True,
    console: Console | None = None,
) -> tuple[TrainConfig, dict]:
    """What both train commands do with their options: load and override the config, train.

    ``python -m cluster.train`` and ``pipemedic train`` take the same options and differ only
    in what they print at the end; returns the config trained with and training's summary.
    """
    cfg = load_train_config(config, kind=kind)
    if env_runners is not None:
        cfg = cfg.model_copy(
            update={"ppo": cfg.ppo.model_copy(update={"env_runners": env_runners})}
        )
    run_dir = out or local_store_dir() / "runs" / cfg.kind
    summary = train(
        cfg, run_dir, fresh=fresh, promote=promote, console=console, max_iterations=iterations
    )
    return cfg, summary


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(
    config: Annotated[Path, typer.Option(help="training config (YAML)")] = Path(
        "configs/train.yaml"
    ),
    kind: Annotated[str | None, typer.Option(help="override: hierarchical or flat")] = None,
    out: Annotated[Path | None, typer.Option(help="run folder (default STORE/runs/KIND)")] = None,
    fresh: Annotated[bool, typer.Option(help="ignore checkpoints in --out, start over")] = False,
    iterations: Annotated[int | None, typer.Option(help="stop after this many")] = None,
    env_runners: Annotated[
        int | None,
        typer.Option(min=0, help="override ppo.env_runners (a cluster sizes this to its CPUs)"),
    ] = None,
    promote: Annotated[
        bool, typer.Option(help="promote the selected version in the checkpoints table")
    ] = True,
) -> None:
    """Train with RLlib PPO; resumes from the latest checkpoint in --out."""
    logging.basicConfig(level=logging.WARNING)
    console = Console(stderr=True, soft_wrap=True)  # log lines stay whole in files
    try:
        _, summary = train_from_options(
            config,
            kind=kind,
            out=out,
            fresh=fresh,
            iterations=iterations,
            env_runners=env_runners,
            promote=promote,
            console=console,
        )
    except PipemedicError as exc:
        console.print(f"[red]error:[/red] {exc}")
        sys.exit(2)
    console.print(json.dumps(summary, default=_plain))


if __name__ == "__main__":
    app()
