"""The training objective's penalty split by scenario and term (``pipemedic bench penalty``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from agents.inference import LearnedPolicy, export_bundle, fresh_nets, manifest_for
from agents.ppo_config import TrainConfig
from cluster.train import (
    PENALTY_TERMS,
    held_out_penalties,
    validation_penalties,
    validation_score,
    validation_weights,
)
from envs.catalogue import STAGES
from envs.errors import ConfigError
from envs.observation import LAYOUTS

ROOT = Path(__file__).resolve().parents[1]


def _config(held_out: tuple[str, ...] = (), **rewards: float) -> TrainConfig:
    """The lone-leak scenario and the random one validation always adds, 2 episodes each."""
    return TrainConfig.model_validate(
        {
            "kind": "flat",
            "eval_episodes": 2,
            "held_out": [str(ROOT / p) for p in held_out],
            "env": {
                "scenarios": [str(ROOT / "configs/scenarios/memory-leak.yaml")],
                "random": {"share": 0.0, "duration_steps": 60},
                "max_episode_steps": 120,
                "rewards": rewards,
            },
        }
    )


def _flat(action: str, slot: int = 0):
    """Fresh small flat nets that all but always pick ``action`` at ``slot``."""
    nets = fresh_nets("flat", hidden=(8,))
    with torch.no_grad():
        nets["flat"].pi[-1].bias[LAYOUTS["flat"].encode(action, slot)] = 50.0
    return nets


def test_the_terms_add_up_to_the_validation_score(tmp_path):
    cfg = _config()
    nets = _flat("observe")
    rows = validation_penalties(LearnedPolicy(manifest_for("flat", nets, {}), nets), cfg)
    assert [r.scenario for r in rows] == ["memory-leak", "validation-random"]
    assert all(r.episodes == 2 for r in rows)
    # Nobody cures the leak: its incident is open to the end of the episode.
    assert rows[0].mean("open") > 0
    bundle = export_bundle(tmp_path / "policy", "flat", nets, {})
    # random.share is 0 here: like the training mix, the score is the leak scenario's alone.
    assert validation_weights(cfg) == [1.0, 0.0]
    assert validation_score(bundle, cfg) == pytest.approx(rows[0].total, rel=1e-12)
    assert sum(rows[0].mean(t) for t in PENALTY_TERMS) == pytest.approx(rows[0].total)


def test_each_term_carries_its_reward_weight():
    nets = _flat("observe")
    policy = LearnedPolicy(manifest_for("flat", nets, {}), nets)
    default = validation_penalties(policy, _config())
    no_cost = validation_penalties(policy, _config(cost=0.0))
    double_open = validation_penalties(policy, _config(open=0.4))
    for a, b, c in zip(default, no_cost, double_open, strict=True):
        assert a.mean("cost") > 0 and b.mean("cost") == 0
        assert c.mean("open") == pytest.approx(2 * a.mean("open"))
        assert b.mean("slo") == a.mean("slo") and b.mean("lost") == a.mean("lost")


def test_idle_actions_count_actions_while_no_fault_is_open():
    cfg = _config()
    waiting, restarting = _flat("observe"), _flat("restart_stage", STAGES.index("load"))
    rows = {
        name: validation_penalties(
            LearnedPolicy(manifest_for("flat", nets, {}), nets), cfg, count_idle_actions=True
        )
        for name, nets in (("waiting", waiting), ("restarting", restarting))
    }
    assert all(r.idle_actions == 0 for r in rows["waiting"])
    # Before the leak's onset no fault is open, and this policy restarts on every step.
    assert rows["restarting"][0].idle_actions > 0
    # Without the count the ground truth is never asked for.
    assert (
        validation_penalties(LearnedPolicy(manifest_for("flat", restarting, {}), restarting), cfg)[
            0
        ].idle_actions
        is None
    )


def test_bench_penalty_prints_each_scenario_and_the_validation_score(tmp_path, monkeypatch):
    import yaml
    from typer.testing import CliRunner

    from agents.inference import publish_nets
    from cluster.cli import app

    monkeypatch.setenv("PIPEMEDIC_STORE_URI", str(tmp_path / "store"))
    nets = _flat("observe")
    version = publish_nets("flat", nets, root=None, run_id="test", iteration=0)
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(_config().model_dump(mode="json", by_alias=True)))
    result = CliRunner().invoke(
        app, ["bench", "penalty", "--policy", f"flat:v{version}", "--config", str(config)]
    )
    assert result.exit_code == 0, result.output
    score = validation_score(export_bundle(tmp_path / "policy", "flat", nets, {}), _config())
    assert "memory-leak" in result.output and "validation-random" in result.output
    assert f"{score:.2f}" in result.output.split("all (the validation score)")[1]
    refused = CliRunner().invoke(app, ["bench", "penalty", "--policy", "wizard"])
    assert refused.exit_code == 2 and "unknown policy 'wizard'" in refused.output


def test_bench_penalty_scores_a_baseline_beside_a_learned_version(tmp_path, monkeypatch):
    """A baseline by name: the same validation score as its rollouts give, and a teacher that
    reads the ground truth gets it (while its actions on quiet steps are counted)."""
    import yaml
    from typer.testing import CliRunner

    from agents.inference import publish_nets
    from agents.policy import make_policy
    from cluster.cli import app
    from cluster.train import weighted_score

    monkeypatch.setenv("PIPEMEDIC_STORE_URI", str(tmp_path / "store"))
    version = publish_nets("flat", _flat("observe"), root=None, run_id="test", iteration=0)
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(_config().model_dump(mode="json", by_alias=True)))
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "penalty",
            "--policy",
            f"runbook,flat:v{version},oracle_capacity",
            "--config",
            str(config),
        ],
    )
    assert result.exit_code == 0, result.output
    tables = result.output.split("Penalty of ")[1:]
    assert [t.split(" ")[0] for t in tables] == ["runbook", f"flat:v{version}", "oracle_capacity"]
    for name, table in (("runbook", tables[0]), ("oracle_capacity", tables[2])):
        rows = validation_penalties(make_policy(name), _config())
        score = weighted_score(rows, validation_weights(_config()))
        assert f"{score:.2f}" in table.split("all (the validation score)")[1], name


def test_held_out_penalties_meet_the_episodes_evaluate_meets():
    from agents.rollout import episode_seeds, rollout
    from envs.scenario import load_scenario

    cfg = _config(held_out=("configs/scenarios/leak-duplicates-timeouts.yaml",))
    nets = _flat("observe")
    policy = LearnedPolicy(manifest_for("flat", nets, {}), nets)
    (row,) = held_out_penalties(policy, cfg, episodes=2, seed=0)
    assert row.scenario == "leak-duplicates-timeouts" and row.episodes == 2
    # The same episodes as `pipemedic evaluate --seed 0`: the open term is the incidents'
    # recovery steps of those episodes, weighted.
    scenario = load_scenario(ROOT / "configs/scenarios/leak-duplicates-timeouts.yaml")
    metrics = rollout(policy, scenario, episode_seeds(scenario, 0, 2))
    steps_open = [sum(o.recovery_steps for o in m.incidents) for m in metrics]
    assert row.mean("open") == pytest.approx(cfg.env.rewards.open * sum(steps_open) / 2)
    with pytest.raises(ConfigError, match="no held_out"):
        held_out_penalties(policy, _config(), episodes=1, seed=0)


def test_bench_penalty_refuses_an_unknown_set():
    from typer.testing import CliRunner

    from cluster.cli import app

    result = CliRunner().invoke(app, ["bench", "penalty", "--on", "test"])
    assert result.exit_code == 2 and "--on takes validation or held-out" in result.output


def test_the_validation_weights_mirror_the_training_mix():
    from agents.ppo_config import load_train_config

    cfg = load_train_config(ROOT / "configs/train.yaml")
    weights = validation_weights(cfg)
    assert len(weights) == len(cfg.env.scenarios) + 1 and sum(weights) == pytest.approx(1.0)
    assert weights[-1] == cfg.env.random.share  # the random scenario, last
    assert len(set(weights[:-1])) == 1  # the files share the rest equally
    only_random = cfg.model_copy(update={"env": cfg.env.model_copy(update={"scenarios": ()})})
    assert validation_weights(only_random) == [1.0]


def test_bench_penalty_greedy_scores_the_same_weights_without_their_raised_hand(
    tmp_path, monkeypatch
):
    import yaml
    from typer.testing import CliRunner

    from agents.inference import manifest_for, weights_of
    from checkpoints.policies import CheckpointStore
    from cluster.cli import app

    monkeypatch.setenv("PIPEMEDIC_STORE_URI", str(tmp_path / "store"))
    # A master that always waits and an infra specialist sure it should restart a stage: only
    # the raised hand ever acts, so greedy and the hand must score apart.
    nets = fresh_nets("hierarchical", hidden=(8,))
    with torch.no_grad():
        nets["master"].pi[-1].bias[LAYOUTS["master"].encode("observe")] = 50.0
        nets["infra"].pi[-1].bias[LAYOUTS["infra"].encode("restart_stage", 1)] = 50.0
    hand = {"infra": 0.5}
    version = CheckpointStore(None).publish(
        "hierarchical",
        weights_of(nets),
        run_id="test",
        iteration=0,
        pipeline_steps=0,
        manifest=manifest_for("hierarchical", nets, {"run_id": "test", "hand_raise": hand}),
    )
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(_config().model_dump(mode="json", by_alias=True)))
    args = ["bench", "penalty", "--policy", f"hierarchical:v{version}", "--config", str(config)]
    result = CliRunner().invoke(app, [*args, "--greedy"])
    assert result.exit_code == 0, result.output

    cfg = _config().model_copy(update={"kind": "hierarchical"})
    bundle = export_bundle(tmp_path / "policy", "hierarchical", nets, {})
    with_hand = validation_score(bundle, cfg, hand_raise=hand)
    greedy = validation_score(bundle, cfg)
    assert f"{with_hand:.2f}" != f"{greedy:.2f}"
    own, plain = result.output.split(f"Penalty of hierarchical:v{version}, greedy")
    assert f"{with_hand:.2f}" in own.split("all (the validation score)")[1]
    assert f"{greedy:.2f}" in plain.split("all (the validation score)")[1]
    # Without --greedy, one table: the version with its own rule.
    alone = CliRunner().invoke(app, args)
    assert alone.exit_code == 0 and ", greedy" not in alone.output
