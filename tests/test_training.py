"""Real (short) RLlib training: learning, resuming after a kill, Ray-free inference, ray job."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from agents.inference import AGENTS_OF_KIND, LearnedPolicy, load_bundle
from agents.policy import EpisodeContext
from agents.ppo_config import build_ppo_config, load_train_config
from agents.rollout import episode_seeds, rollout
from cluster.train import (
    _check_resumable,
    _warm_start,
    current_nets,
    imitate,
    initial_nets,
    train,
)
from envs.catalogue import ACTION_ID
from envs.errors import CheckpointError, ConfigError
from envs.metrics import aggregate
from envs.multi_agent_env import PipelineMedicEnv
from envs.scenario import load_scenario

ROOT = Path(__file__).resolve().parents[1]
EASY = "configs/scenarios/duplicate-burst.yaml"


def tiny_config(tmp_path: Path, **overrides) -> Path:
    """A training config small enough for a test: one scenario, small batches."""
    cfg = {
        "kind": "hierarchical",
        "env": {
            "scenarios": [str(ROOT / EASY)],
            "random": {"share": 0.0},
            "max_episode_steps": 60,
            "pipelines": 8,
        },
        "held_out": [],
        "ppo": {
            "env_runners": 0,
            "envs_per_runner": 1,
            "train_batch_size": 400,
            "minibatch_size": 400,
            "num_epochs": 8,
            "lr": 0.001,
            "hidden": [64, 64],
        },
        "stop": {"pipeline_steps": 10**9, "minutes": 10},
        "checkpoint_every": 1,
        "evaluate_every": 1000,
        "warm_start": {"enabled": False},
    }
    for key, value in overrides.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


class UniformRandomPolicy:
    """Any allowed (action, stage), uniformly: what an untrained agent would do."""

    name = "random"
    needs_ground_truth = False

    def reset(self, ctx: EpisodeContext) -> None:
        from envs.observation import ObservationEncoder

        self.enc = ObservationEncoder(ctx.topology, ctx.params, n=ctx.n)
        self.rng = np.random.default_rng(0)

    def act(self, tel, truth=None):
        self.enc.update(tel)
        mask = self.enc.action_mask("flat")
        index = np.array([self.rng.choice(np.flatnonzero(m)) for m in mask])
        actions, stages = self.enc.to_sim("flat", index)
        self.enc.record_action(actions, self.enc.slots[stages])
        return actions, stages


def test_short_training_beats_a_random_policy_on_an_easy_scenario(ray_session, tmp_path):
    # The shipped recipe, small: imitate the oracle briefly, then a few PPO iterations.
    warm = {"enabled": True, "pipeline_steps": 16000, "rounds": 2, "pipelines": 16}
    gate = {"enabled": True, "pipeline_steps": 480, "episodes_per_scenario": 4}
    cfg = load_train_config(
        tiny_config(
            tmp_path,
            warm_start=warm,
            hand_raise_thresholds={"quality": [0.5]},
            delegation_gate=gate,
        )
    )
    summary = train(cfg, tmp_path / "run", promote=False, max_iterations=3)
    assert summary["iteration"] == 3 and summary["warm_start_steps"] >= 16000
    scenario = load_scenario(ROOT / EASY).model_copy(update={"duration_steps": 60})
    seeds = episode_seeds(scenario, 0, 8)
    trained = aggregate(rollout(LearnedPolicy.load(summary["bundle"]), scenario, seeds))
    random = aggregate(rollout(UniformRandomPolicy(), scenario, seeds))
    # The random policy restarts, replays and scales at random; the trained one deduplicates.
    assert trained["mttr_s"] < 0.5 * random["mttr_s"], (trained, random)
    assert trained["records_lost"] < random["records_lost"], (trained, random)
    assert trained["slo_adherence"] >= random["slo_adherence"], (trained, random)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    iterations = [r for r in rows if "pipeline_steps_per_s" in r]
    assert [r["iteration"] for r in iterations] == [1, 2, 3]
    assert all(r["pipeline_steps_per_s"] > 0 for r in iterations)
    # Reviews (validation score) after the warm start and at the end.
    assert [r["iteration"] for r in rows if "validation_score" in r] == [0, 3]
    assert (tmp_path / "run" / "learning_curves.png").stat().st_size > 0
    # Each review published a version to the checkpoints table, and the runner logged samples
    # of its transitions to the experience table under this run's id.
    from checkpoints.experience import ReplaySampler
    from checkpoints.policies import CheckpointStore
    from envs.observation import observation_size

    versions = CheckpointStore().list_versions("hierarchical")
    mine = [v for v in versions if v["run_id"] == summary["run_id"]]
    assert [v["iteration"] for v in mine] == [0, 3]
    assert all(set(v["agents"]) == {"master", "drift", "infra", "quality"} for v in mine)
    # Each review scored every decision rule, kept their scores, and stored the one it chose
    # with the version; a version stored with a gate decides with it when loaded.
    for review in (r for r in rows if "validation_score" in r):
        assert set(review["rule_scores"]) == {
            "greedy",
            "quality raises its hand above 0.5",
            "delegation gate, observe offset 0.0",
        }
        assert review["validation_score"] == min(review["rule_scores"].values())
        assert review["hand_raise"] in (None, {"quality": 0.5})
        stored = CheckpointStore().load("hierarchical", review["version"]).manifest
        assert stored["hand_raise"] == review["hand_raise"]
        gated = review["gate_observe_offset"] is not None
        assert (stored["delegation_gate"] is not None) == gated
        loaded = LearnedPolicy.from_store("hierarchical", version=review["version"])
        assert (loaded.delegation_gate is not None) == gated
    # The selected bundle's manifest names the review its weights come from.
    bundle = json.loads((Path(summary["bundle"]) / "policy.json").read_text())
    assert bundle["best_version"] == summary["best_version"]
    assert bundle["best_iteration"] == bundle["selected_iteration"] == summary["best_iteration"]
    chosen = CheckpointStore().load("hierarchical", summary["best_version"])
    assert chosen.weights == {
        a: (Path(summary["bundle"]) / f"{a}.safetensors").read_bytes() for a in chosen.weights
    }
    logged = ReplaySampler().read(run_ids=[summary["run_id"]]).to_pylist()
    assert logged and {"master"} <= {r["agent"] for r in logged}
    for r in logged:
        assert 0 < r["action_prob"] <= 1 and r["action_mask"][r["action"]]
        assert len(r["observation"]) == len(r["next_observation"])
        assert len(r["observation"]) == observation_size(r["agent"])
        assert r["source"] == "sim" and r["policy_version"].startswith(
            f"train:{summary['run_id']}:"
        )


def test_inference_wrapper_agrees_with_the_rllib_modules_greedy_action(ray_session, tmp_path):
    from ray.rllib.core.columns import Columns

    cfg = load_train_config(tiny_config(tmp_path))
    algo = build_ppo_config(cfg).build_algo()
    try:
        algo.train()  # move the weights away from their initial values
        nets = current_nets(algo, cfg)
        modules = {m: algo.learner_group._learner.module[m] for m in nets}
    finally:
        algo.stop()
    policy = LearnedPolicy({"kind": "hierarchical"}, nets)
    env = PipelineMedicEnv(cfg.env_config())
    obs, _ = env.reset(seed=4)
    policy.encoder = env.encoder  # decide on exactly the env's observations
    rng = np.random.default_rng(0)
    compared = {}
    for _ in range(60):
        for aid, o in obs.items():
            role, i = aid.split("/")
            batch = {Columns.OBS: {k: torch.from_numpy(v[None]) for k, v in o.items()}}
            with torch.no_grad():
                logits = modules[role].forward_inference(batch)[Columns.ACTION_DIST_INPUTS]
            ours = policy._probs(role, env.encoder, np.array([int(i)]))[0]
            assert int(ours.argmax()) == int(logits.argmax()), aid
            compared[role] = compared.get(role, 0) + 1
        if any(a.startswith("master/") for a in obs):
            decision = policy.decide(env.encoder)  # the one-call path agrees with the master
            for aid in obs:
                i = int(aid.split("/")[1])
                assert (
                    decision.master_probs[i].argmax()
                    == policy._probs("master", env.encoder, np.array([i]))[0].argmax()
                )
        # Random allowed actions, so every specialist gets turns.
        actions = {aid: int(rng.choice(np.flatnonzero(o["action_mask"]))) for aid, o in obs.items()}
        obs, _, _, truncated, _ = env.step(actions)
        if truncated["__all__"]:
            break
    assert set(compared) == {"master", "drift", "infra", "quality"} and compared["master"] >= 40


def test_inference_decides_master_then_specialist_in_one_call(tmp_path):
    from agents.inference import export_bundle
    from agents.networks import PolicyValueNet
    from envs.observation import LAYOUTS, ObservationEncoder, observation_size
    from envs.params import SimParams
    from envs.simulator import PipelineSim

    nets = {
        a: PolicyValueNet(observation_size("master" if a == "master" else a), LAYOUTS[a].size, [8])
        for a in ("master", "drift", "infra", "quality")
    }
    # Force the master to delegate to infra and infra to scale out the transform stage.
    with torch.no_grad():
        nets["master"].pi[-1].bias[1] = 50.0
        nets["infra"].pi[-1].bias[LAYOUTS["infra"].encode("scale_out", 2)] = 50.0
    export_bundle(tmp_path / "bundle", "hierarchical", nets, {"iteration": 0})
    policy = LearnedPolicy.load(tmp_path / "bundle")
    scenario = load_scenario(ROOT / EASY)
    sim = PipelineSim(scenario, n=2)
    enc = ObservationEncoder(scenario.topology, SimParams(), n=2)
    enc.update(sim.reset([1, 2]))
    d = policy.decide(enc)
    assert d.specialist == ["infra", "infra"]
    assert (d.action == ACTION_ID["scale_out"]).all() and (d.stage == 2).all()
    assert d.master_probs[0, 1] > 0.99
    assert "scale_out@transform" in d.action_probs[0]["infra"]


def test_the_act_threshold_acts_on_the_total_probability_of_acting(tmp_path):
    from agents.inference import ACTING, export_bundle, fresh_nets
    from envs.catalogue import MASTER_ACTIONS, SIM_ACTIONS
    from envs.observation import LAYOUTS, ObservationEncoder
    from envs.params import SimParams
    from envs.simulator import PipelineSim

    nets = fresh_nets("hierarchical", hidden=(8,))
    # The master's probabilities, whatever it sees: no delegation beats observe (0.38) alone,
    # but the three together (0.60) are more likely than waiting.
    wanted = {
        "delegate_drift": 0.25,
        "delegate_infra": 0.30,
        "delegate_quality": 0.05,
        "observe": 0.38,
        "escalate": 0.02,
    }
    with torch.no_grad():
        nets["master"].pi[-1].weight.zero_()
        nets["master"].pi[-1].bias.copy_(
            torch.log(torch.tensor([wanted[a] for a in MASTER_ACTIONS]))
        )
    scenario = load_scenario(ROOT / EASY)
    sim = PipelineSim(scenario, n=1)
    enc = ObservationEncoder(scenario.topology, SimParams(), n=1)
    enc.update(sim.reset([1]))

    def master_choice(**kw) -> str:
        export_bundle(tmp_path / "bundle", "hierarchical", nets, kw)
        d = LearnedPolicy.load(tmp_path / "bundle").decide(enc)
        return MASTER_ACTIONS[d.chosen[0]["master"][0]].removeprefix("delegate_")

    assert master_choice() == "observe"  # greedy
    assert master_choice(act_threshold=0.5) == "infra"  # the most probable delegation
    assert master_choice(act_threshold=0.65) == "observe"
    # The argument overrides the bundle's own threshold; sampling ignores it.
    policy = LearnedPolicy.load(tmp_path / "bundle", act_threshold=0.5)
    assert policy.act_threshold == 0.5 and policy.decide(enc).specialist == ["infra"]
    sampled = LearnedPolicy.load(tmp_path / "bundle", act_threshold=0.5, sample=True)
    picks = {MASTER_ACTIONS[sampled.decide(enc).chosen[0]["master"][0]] for _ in range(200)}
    assert {"observe", "delegate_drift", "delegate_infra"} <= picks
    with pytest.raises(CheckpointError, match="act_threshold"):
        LearnedPolicy.load(tmp_path / "bundle", act_threshold=1.5)
    # flat: the same rule over every remediation against observe and escalate.
    flat = fresh_nets("flat", hidden=(8,))
    flat_probs = np.full(LAYOUTS["flat"].size, 1e-6)
    flat_probs[LAYOUTS["flat"].encode("observe")] = 0.45
    flat_probs[LAYOUTS["flat"].encode("scale_out", 2)] = 0.3
    flat_probs[LAYOUTS["flat"].encode("failover", 2)] = 0.25
    with torch.no_grad():
        flat["flat"].pi[-1].weight.zero_()
        flat["flat"].pi[-1].bias.copy_(torch.log(torch.tensor(flat_probs, dtype=torch.float32)))
    for kw, expected in (({}, "observe"), ({"act_threshold": 0.5}, "scale_out")):
        export_bundle(tmp_path / "flat", "flat", flat, kw)
        d = LearnedPolicy.load(tmp_path / "flat").decide(enc)
        assert SIM_ACTIONS[d.action[0]] == expected, kw
    # flat: acting is every remediation, waiting is observe and escalate.
    waiting = {LAYOUTS["flat"].decode(i)[0] for i in np.flatnonzero(~ACTING["flat"])}
    assert waiting == {"observe", "escalate"}
    assert [MASTER_ACTIONS[i] for i in np.flatnonzero(ACTING["master"])] == [
        "delegate_drift",
        "delegate_infra",
        "delegate_quality",
    ]


def _fixed_probs(net, probs) -> None:
    """Make ``net``'s policy give ``probs`` whatever it sees."""
    with torch.no_grad():
        net.pi[-1].weight.zero_()
        net.pi[-1].bias.copy_(torch.log(torch.tensor(probs, dtype=torch.float32)))


def test_a_sure_specialist_raises_its_hand_while_the_master_observes(tmp_path):
    from agents.inference import export_bundle, fresh_nets
    from envs.catalogue import MASTER_ACTIONS, SIM_ACTIONS
    from envs.observation import LAYOUTS, ObservationEncoder
    from envs.params import SimParams
    from envs.simulator import PipelineSim

    nets = fresh_nets("hierarchical", hidden=(8,))
    master = np.full(len(MASTER_ACTIONS), 0.05)
    master[MASTER_ACTIONS.index("observe")] = 0.8  # the master waits
    _fixed_probs(nets["master"], master / master.sum())
    infra = np.full(LAYOUTS["infra"].size, 1e-6)
    infra[LAYOUTS["infra"].encode("observe")] = 0.15
    infra[LAYOUTS["infra"].encode("restart_stage", 2)] = 0.85  # infra is sure: restart transform
    _fixed_probs(nets["infra"], infra / infra.sum())
    scenario = load_scenario(ROOT / EASY)
    enc = ObservationEncoder(scenario.topology, SimParams(), n=1)
    enc.update(PipelineSim(scenario, n=1).reset([1]))

    def decide(**kw):
        export_bundle(tmp_path / "bundle", "hierarchical", nets, kw)
        return LearnedPolicy.load(tmp_path / "bundle").decide(enc)

    plain = decide()
    assert SIM_ACTIONS[plain.action[0]] == "observe" and not plain.raised_hand[0]
    raised = decide(hand_raise={"infra": 0.8})
    assert SIM_ACTIONS[raised.action[0]] == "restart_stage" and raised.stage[0] == 2
    assert raised.raised_hand[0] and raised.specialist == ["infra"]
    # What each agent chose: the master still observed; infra restarted, with its probability.
    assert MASTER_ACTIONS[raised.chosen[0]["master"][0]] == "observe"
    assert raised.chosen[0]["infra"][1] == pytest.approx(0.85, abs=1e-3)
    # Its confidence is infra's alone; an ordinary decision's is the product of its agents'.
    assert raised.confidence[0] == pytest.approx(0.85, abs=1e-3)
    assert plain.confidence[0] == pytest.approx(plain.chosen[0]["master"][1])
    assert plain.confidence[0] == pytest.approx(0.8 / (0.8 + 4 * 0.05), abs=1e-3)
    # Not sure enough, or another specialist named: the master's observe stands.
    assert SIM_ACTIONS[decide(hand_raise={"infra": 0.9}).action[0]] == "observe"
    assert SIM_ACTIONS[decide(hand_raise={"drift": 0.5}).action[0]] == "observe"
    # The argument overrides the bundle; sampling ignores raised hands.
    policy = LearnedPolicy.load(tmp_path / "bundle", hand_raise={"infra": 0.5})
    assert policy.decide(enc).raised_hand[0]
    assert not LearnedPolicy.load(tmp_path / "bundle", sample=True).decide(enc).raised_hand.any()
    for bad, match in (
        ({"infra": 1.0}, "strictly between 0 and 1"),
        ({"master": 0.5}, "not a specialist"),
    ):
        with pytest.raises(CheckpointError, match=match):
            LearnedPolicy.load(tmp_path / "bundle", hand_raise=bad)
    export_bundle(tmp_path / "flat", "flat", fresh_nets("flat", hidden=(8,)), {})
    with pytest.raises(CheckpointError, match="hierarchical policies only"):
        LearnedPolicy.load(tmp_path / "flat", hand_raise={"infra": 0.5})


@pytest.mark.parametrize("kind", ["hierarchical", "flat"])
@pytest.mark.parametrize("config", ["configs/train.yaml", "configs/train-quick.yaml"])
def test_the_shipped_configs_load_for_both_kinds(config, kind):
    """The README trains both kinds from one config file; each must load and build for both,
    and PPO must be told to train only modules the kind has."""
    ppo = build_ppo_config(load_train_config(ROOT / config, kind=kind))
    assert set(ppo.policies_to_train or AGENTS_OF_KIND[kind]) <= set(AGENTS_OF_KIND[kind])


def test_hand_raise_thresholds_name_specialists():
    with pytest.raises(ConfigError, match="not specialists"):
        load_train_config(ROOT / "configs/train-quick.yaml", hand_raise_thresholds={"mastr": [0.5]})


def test_retune_publishes_the_same_weights_with_the_rule_validation_prefers(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from agents.inference import fresh_nets, publish_nets
    from checkpoints.policies import CheckpointStore
    from cluster.cli import app
    from envs.catalogue import MASTER_ACTIONS
    from envs.observation import LAYOUTS

    # A master that always waits, and a quality specialist sure of deduplicate on `load`,
    # which cures the easy scenario's duplicate burst (downstream of `validate`): greedy never
    # acts, a raised quality hand does, so validation must prefer the raised hand.
    nets = fresh_nets("hierarchical", hidden=(8,))
    master = np.full(len(MASTER_ACTIONS), 0.01)
    master[MASTER_ACTIONS.index("observe")] = 0.96
    _fixed_probs(nets["master"], master)
    quality = np.full(LAYOUTS["quality"].size, 1e-6)
    quality[LAYOUTS["quality"].encode("observe")] = 0.1
    quality[LAYOUTS["quality"].encode("deduplicate", 3)] = 0.9
    _fixed_probs(nets["quality"], quality / quality.sum())
    monkeypatch.setenv("PIPEMEDIC_STORE_URI", str(tmp_path / "store"))
    publish_nets(
        "hierarchical", nets, root=None, run_id="retune-test", iteration=3, promote_reason="test"
    )
    config = tiny_config(tmp_path, hand_raise_thresholds={"quality": [0.5]}, eval_episodes=1)
    cli = CliRunner()
    first = cli.invoke(
        app, ["checkpoints", "retune", "hierarchical", "--config", str(config), "--promote"]
    )
    assert first.exit_code == 0, first.output
    assert "best: quality raises its hand above 0.5" in first.output
    store = CheckpointStore()
    retuned = store.load_promoted("hierarchical")
    assert retuned.version == 2 and retuned.manifest["hand_raise"] == {"quality": 0.5}
    assert retuned.manifest["retuned_from"] == "hierarchical:v1"
    assert retuned.weights == store.load("hierarchical", 1).weights
    assert LearnedPolicy.from_store("hierarchical").hand_raise == {"quality": 0.5}
    again = cli.invoke(app, ["checkpoints", "retune", "hierarchical", "--config", str(config)])
    assert again.exit_code == 0 and "already decides that way" in again.output
    # --version retunes a stored version, here with no raised hand to try: greedy wins.
    plain = tiny_config(tmp_path, eval_episodes=1)
    args = ["checkpoints", "retune", "hierarchical", "--config", str(plain), "--version", "2"]
    greedy = cli.invoke(app, args)
    assert greedy.exit_code == 0 and "best: greedy" in greedy.output, greedy.output
    v3 = store.load("hierarchical", 3)
    assert v3.manifest["retuned_from"] == "hierarchical:v2" and not v3.manifest["hand_raise"]
    assert store.promoted_version("hierarchical") == 2
    none = cli.invoke(app, ["checkpoints", "retune", "flat", "--config", str(config)])
    assert none.exit_code == 2 and "Traceback" not in none.output


def test_a_review_fits_a_delegation_gate_and_scores_it_at_each_offset(tmp_path):
    from agents.inference import export_bundle, fresh_nets
    from cluster.train import choose_decision_rule

    config = tiny_config(
        tmp_path,
        eval_episodes=1,
        delegation_gate={
            "enabled": True,
            "pipeline_steps": 2 * 60 * 4,
            "episodes_per_scenario": 4,
            "observe_offsets": [0.0, 1.0],
        },
    )
    cfg = load_train_config(config)
    bundle = export_bundle(tmp_path / "b", "hierarchical", fresh_nets("hierarchical"), {})
    scored = []
    choose_decision_rule(bundle, cfg, on_score=scored.append)
    assert [r.label for r in scored] == [
        "greedy",
        "delegation gate, observe offset 0.0",
        "delegation gate, observe offset 1.0",
    ]
    gated = [r for r in scored if r.delegation_gate is not None]
    assert np.array_equal(gated[0].delegation_gate.weights, gated[1].delegation_gate.weights)
    # flat ignores the gate.
    flat = export_bundle(tmp_path / "f", "flat", fresh_nets("flat"), {})
    flat_scored = []
    choose_decision_rule(flat, cfg.model_copy(update={"kind": "flat"}), on_score=flat_scored.append)
    assert [r.label for r in flat_scored] == ["greedy"]


def test_a_bundle_from_other_code_or_missing_files_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no policy bundle"):
        load_bundle(tmp_path / "nothing")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "policy.json").write_text(
        json.dumps(
            {
                "format": "pipemedic-policy-v1",
                "kind": "flat",
                "agents": {"flat": {"obs_size": 3, "n_actions": 2, "hidden": [4]}},
            }
        )
    )
    with pytest.raises(CheckpointError, match="trained for observation/action sizes"):
        load_bundle(tmp_path / "b")


def test_ppo_updates_only_the_modules_it_is_told_to_train(ray_session, tmp_path):
    cfg = load_train_config(tiny_config(tmp_path, ppo={"train_modules": ["master"]}))
    algo = build_ppo_config(cfg).build_algo()
    try:
        before = current_nets(algo, cfg)
        algo.train()
        after = current_nets(algo, cfg)
    finally:
        algo.stop()

    def same(a, b) -> bool:
        return all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())

    assert not same(before["master"], after["master"])
    for specialist in ("drift", "infra", "quality"):
        assert same(before[specialist], after[specialist]), specialist


def test_trainings_warm_start_is_the_one_bench_imitation_runs(ray_session, tmp_path):
    """Training's warm start begins from seeded networks, not RLlib's own initial weights
    (which differ between runs with one seed), so ``pipemedic bench imitation`` repeats it."""
    from rich.console import Console

    ws = {"enabled": True, "pipeline_steps": 1000, "rounds": 2, "pipelines": 8, "epochs": 1}
    cfg = load_train_config(tiny_config(tmp_path, warm_start=ws))
    quiet = Console(quiet=True)
    algo = build_ppo_config(cfg).build_algo()
    try:
        _warm_start(algo, cfg, quiet)
        trained = current_nets(algo, cfg)
    finally:
        algo.stop()
    alone = initial_nets(cfg)
    imitate(alone, cfg, cfg.warm_start, quiet)
    for agent, net in trained.items():
        for key, value in net.state_dict().items():
            assert torch.equal(value, alone[agent].state_dict()[key]), (agent, key)


def test_validation_random_scenario_has_the_training_mix_rates_on_its_own_seed(tmp_path):
    from cluster.train import validation_scenarios

    cfg = load_train_config(
        tiny_config(
            tmp_path,
            seed=4,
            env={
                "random": {"share": 0.5, "rate_per_hour": 9, "bursts_per_hour": 3},
                "max_episode_steps": 60,
            },
        )
    )
    *files, random = validation_scenarios(cfg)
    assert [f.name for f in files] == [load_scenario(ROOT / EASY).name]
    assert files[0].duration_steps == 60  # cut like the training episodes
    assert random.random_faults.rate_per_hour == 9
    assert random.random_bursts.rate_per_hour == 3
    assert random.seed == 4 + 7


def test_resume_refuses_a_changed_train_modules(tmp_path):
    from envs.errors import ConfigError

    (tmp_path / "config.json").write_text(json.dumps({"ppo": {"train_modules": []}}))
    cfg = load_train_config(tiny_config(tmp_path, ppo={"train_modules": ["master"]}))
    with pytest.raises(ConfigError, match=r"train_modules is \['master'\] but the run in"):
        _check_resumable(tmp_path / "config.json", cfg)
    _check_resumable(tmp_path / "missing.json", cfg)  # nothing saved: nothing to compare


def test_resume_refuses_a_run_trained_for_other_observation_sizes(tmp_path):
    from agents.inference import agent_sizes, export_bundle, fresh_nets

    cfg = load_train_config(tiny_config(tmp_path))
    (tmp_path / "config.json").write_text(cfg.model_dump_json(by_alias=True))
    export_bundle(tmp_path / "policy", "hierarchical", fresh_nets("hierarchical", hidden=(8,)), {})
    _check_resumable(tmp_path / "config.json", cfg)  # this code's sizes: fine
    manifest = json.loads((tmp_path / "policy" / "policy.json").read_text())
    old_size = agent_sizes("infra")[0] - 70  # the infra view before the recent block
    manifest["agents"]["infra"]["obs_size"] = old_size
    (tmp_path / "policy" / "policy.json").write_text(json.dumps(manifest))
    with pytest.raises(
        CheckpointError, match=rf"'infra' was trained for .*\({old_size}, .*--fresh"
    ):
        _check_resumable(tmp_path / "config.json", cfg)


def test_config_errors_name_the_key(tmp_path):
    bad = tiny_config(tmp_path, ppo={"lr": -1})
    with pytest.raises(ConfigError, match="ppo.lr"):
        load_train_config(bad)
    both = tiny_config(tmp_path, held_out=[str(ROOT / EASY)])
    with pytest.raises(ConfigError, match="must not be trained on"):
        load_train_config(both)
    typo = tiny_config(tmp_path, ppo={"train_modules": ["infr"]})
    with pytest.raises(ConfigError, match="ppo.train_modules: no module 'infr' in a hier"):
        load_train_config(typo)
    with pytest.raises(ConfigError, match="ppo.train_modules: no module 'flat' in a hier"):
        load_train_config(tiny_config(tmp_path, ppo={"train_modules": ["flat"]}))


def test_one_config_with_frozen_hierarchy_modules_trains_flat_too(tmp_path):
    """``ppo.train_modules`` is a hierarchy setting: the default config freezes the master,
    and ``--kind flat`` with that same config must still train flat's one module."""
    frozen = tiny_config(tmp_path, ppo={"train_modules": ["drift", "infra", "quality"]})
    assert load_train_config(frozen).modules_to_train() == ("drift", "infra", "quality")
    flat = load_train_config(frozen, kind="flat")
    assert flat.modules_to_train() == ()
    assert build_ppo_config(flat).policies_to_train is None
    # A flat run resumes whatever the list said when it started: flat ignored it then too.
    (tmp_path / "config.json").write_text(flat.model_dump_json(by_alias=True))
    unfrozen = load_train_config(tiny_config(tmp_path, ppo={"train_modules": []}), kind="flat")
    _check_resumable(tmp_path / "config.json", unfrozen)


def _train_args(config: Path, out: Path, *extra: str) -> list[str]:
    """Arguments after ``python`` for the training entry point."""
    return [
        "-m",
        "cluster.train",
        "--config",
        str(config),
        "--out",
        str(out),
        "--no-promote",
        *extra,
    ]


def _run_train(config: Path, out: Path, *extra: str, env=None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *_train_args(config, out, *extra)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )


def test_killed_training_resumes_from_the_latest_checkpoint(tmp_path):
    config = tiny_config(tmp_path)
    out = tmp_path / "run"
    proc = _run_train(config, out)
    latest = out / "checkpoints" / "latest"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if latest.exists() and latest.read_text().strip() >= "iter_000002":
            break
        time.sleep(0.5)
    assert proc.poll() is None, proc.stdout.read()
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started
    proc.wait()
    killed_at = json.loads(
        (out / "checkpoints" / latest.read_text().strip() / "train_state.json").read_text()
    )
    again = _run_train(config, out, "--iterations", "1")
    output, _ = again.communicate(timeout=300)
    assert again.returncode == 0, output
    resumed_from = out / "checkpoints" / f"iter_{killed_at['iteration']:06d}"
    assert f"resumed from {resumed_from}" in output
    latest = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    final = json.loads((latest / "train_state.json").read_text())
    assert final["iteration"] == killed_at["iteration"] + 1
    assert final["pipeline_steps"] > killed_at["pipeline_steps"]


def test_ray_job_submit_runs_the_same_entry_point(tmp_path):
    """``ray start --head`` (its own cluster, stopped by signalling only its processes), then
    ``ray job submit --working-dir .`` of the unchanged entry point."""
    import urllib.error
    import urllib.request

    ray_cli = str(Path(sys.executable).parent / "ray")
    config = tiny_config(tmp_path)
    port, dash = "6391", "8271"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # Ray 2.60 protects a started cluster with a token; the head and the client share this one.
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    # As with the venv activated: `python` in the job is this interpreter.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # Ray's Unix sockets live under the temp dir; pytest's tmp_path is too long for them.
    ray_tmp = tempfile.mkdtemp(prefix="rayjob", dir="/tmp")
    head = subprocess.Popen(
        [
            ray_cli,
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--num-cpus=2",
            f"--dashboard-port={dash}",
            "--include-dashboard=true",
            "--disable-usage-stats",
            f"--temp-dir={ray_tmp}",
            # Ports of its own, so it cannot collide with the test session's local Ray.
            "--dashboard-agent-listen-port=52466",
            "--dashboard-agent-grpc-port=52467",
            "--runtime-env-agent-port=52468",
            "--metrics-export-port=52469",
            "--ray-client-server-port=52470",
            "--node-manager-port=52471",
            "--object-manager-port=52472",
            "--min-worker-port=52500",
            "--max-worker-port=52999",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{dash}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:
                break  # it answers (401 without Ray's auth token): the head is up
            except OSError:
                assert time.monotonic() < deadline and head.poll() is None, "ray head did not start"
                time.sleep(1)
        out = tmp_path / "job-run"
        for _ in range(20):  # the job agent comes up a little after the dashboard answers
            job = subprocess.run(
                [
                    ray_cli,
                    "job",
                    "submit",
                    "--address",
                    f"http://127.0.0.1:{dash}",
                    "--working-dir",
                    str(ROOT),
                    "--",
                    "python",
                    *_train_args(config, out, "--iterations", "1"),
                ],
                capture_output=True,
                text=True,
                env=env,
                timeout=400,
            )
            if "No available agent" not in job.stdout + job.stderr:
                break
            time.sleep(3)
        assert job.returncode == 0, job.stdout + job.stderr
        assert "succeeded" in job.stdout + job.stderr
        manifest = json.loads((out / "policy" / "policy.json").read_text())
        assert manifest["iteration"] == 1 and manifest["kind"] == "hierarchical"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_policy_names_load_the_promoted_version_from_the_store(tmp_path, monkeypatch):
    from agents.inference import manifest_for, weights_of
    from agents.networks import PolicyValueNet
    from agents.policy import make_policy
    from checkpoints.policies import CheckpointStore
    from envs.observation import LAYOUTS, observation_size

    monkeypatch.setenv("PIPEMEDIC_STORE_URI", str(tmp_path))
    with pytest.raises(CheckpointError, match="no flat policy has been promoted"):
        make_policy("flat")
    net = PolicyValueNet(observation_size("master"), LAYOUTS["flat"].size, [8])
    nets = {"flat": net}
    store = CheckpointStore()

    def publish(iteration: int) -> int:
        return store.publish(
            "flat",
            weights_of(nets),
            run_id="r",
            iteration=iteration,
            pipeline_steps=100 * iteration,
            manifest=manifest_for("flat", nets, {}),
        )

    store.promote("flat", publish(7))
    policy = make_policy("flat")
    assert policy.name == "flat" and policy.version == "flat:v1"
    # A stored version by name, promoted or not (what `evaluate --policy flat:v2` loads).
    publish(8)
    assert make_policy("flat:v2").version == "flat:v2" and make_policy("flat").version == "flat:v1"
    with pytest.raises(CheckpointError, match="no version 3 of kind .flat."):
        make_policy("flat:v3")
    with pytest.raises(ConfigError, match="KIND:vN names a stored version"):
        make_policy("runbook:v1")
    scenario = load_scenario(ROOT / EASY).model_copy(update={"duration_steps": 20})
    episodes = rollout(policy, scenario, episode_seeds(scenario, 0, 2))
    assert len(episodes) == 2


def test_evaluate_cli_names_a_missing_policy_in_one_line(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from cluster.cli import app

    monkeypatch.setenv("PIPEMEDIC_STORE_URI", str(tmp_path))
    result = CliRunner().invoke(app, ["evaluate", "--policy", "hierarchical", "--held-out"])
    assert result.exit_code == 2
    assert "no hierarchical policy has been promoted" in result.output
    assert "Traceback" not in result.output


def test_evaluate_bundle_reports_every_held_out_incident_once_per_fault(tmp_path):
    from agents.inference import export_bundle, fresh_nets
    from cluster.train import evaluate_bundle
    from envs.catalogue import FAULT_TYPES

    held_out = [
        str(ROOT / "configs/scenarios/leak-duplicates-timeouts.yaml"),
        str(ROOT / "configs/scenarios/outage-with-corrupt-batch.yaml"),
    ]
    cfg = load_train_config(tiny_config(tmp_path, held_out=held_out, eval_episodes=1))
    bundle = export_bundle(tmp_path / "b", "hierarchical", fresh_nets("hierarchical"), {})
    r = evaluate_bundle(bundle, cfg, episodes=2)
    per_fault = r["per_fault"]
    # Two episodes of each scenario: each of its scheduled faults is one incident per episode.
    expected = {f.type for p in held_out for f in load_scenario(p).faults}
    assert set(per_fault) == expected
    assert list(per_fault) == [f for f in FAULT_TYPES if f in expected]
    scheduled = sum(len(load_scenario(p).faults) for p in held_out)
    assert sum(m["incidents"] for m in per_fault.values()) == 2 * scheduled
    assert per_fault["memory_leak"]["incidents"] == 2


def test_bench_imitation_prints_the_students_figures_per_fault(tmp_path):
    from typer.testing import CliRunner

    from cluster.cli import app

    held_out = [str(ROOT / "configs/scenarios/outage-with-corrupt-batch.yaml")]
    config = tiny_config(tmp_path, held_out=held_out, eval_episodes=1)
    result = CliRunner().invoke(
        app,
        ["bench", "imitation", "--config", str(config), "--episodes", "2"]
        + ["--set", "pipeline_steps=2000", "--set", "rounds=1", "--set", "pipelines=8"],
    )
    assert result.exit_code == 0, result.output
    assert "warm start round 1/1:" in result.output  # progress while it imitates
    assert "Held-out, 2 episodes per scenario, episode seed 1000" in result.output
    assert "Per fault type" in result.output
    for fault in ("downstream_outage", "corrupt_batch"):
        assert fault in result.output
    # Without a held-out set it says so instead of printing empty tables.
    result = CliRunner().invoke(
        app,
        ["bench", "imitation", "--config", str(tiny_config(tmp_path))]
        + ["--set", "pipeline_steps=2000", "--set", "rounds=1", "--set", "pipelines=8"],
    )
    assert result.exit_code == 0, result.output
    assert "lists no held_out scenarios" in result.output


def test_bench_labels_prints_each_roles_balance_and_refuses_a_bad_override(tmp_path):
    from typer.testing import CliRunner

    from cluster.cli import app

    config = str(tiny_config(tmp_path))
    small = ["--steps", "2000", "--set", "pipelines=8"]
    result = CliRunner().invoke(
        app,
        ["bench", "labels", "--config", config, *small, "--set", "observe_weight={master: 0.05}"],
    )
    assert result.exit_code == 0, result.output
    rows = {line.split()[1]: line.split() for line in result.output.splitlines() if "│" in line}
    assert {"master", "infra"} <= set(rows)
    assert rows["master"][9] == "0.050"  # the override, not the frequency weight
    assert rows["infra"][9] != "0.050"
    result = CliRunner().invoke(
        app, ["bench", "labels", "--config", config, *small, "--set", "observe_weight={mastr: 1}"]
    )
    assert result.exit_code == 2
    assert "mastr" in result.output and "Traceback" not in result.output


def test_both_train_commands_take_the_same_options():
    """`pipemedic train` and `python -m cluster.train` are one command under two names."""
    import typer.main

    from cluster.cli import app as pipemedic
    from cluster.train import app as module_app

    def options(command) -> dict[str, tuple]:
        return {p.name: (tuple(p.opts), tuple(p.secondary_opts)) for p in command.params}

    train_cmd = typer.main.get_command(pipemedic).commands["train"]
    module_cmd = typer.main.get_command(module_app)
    assert options(train_cmd) == options(module_cmd)
    assert {"iterations", "env_runners", "promote"} <= set(options(train_cmd))
