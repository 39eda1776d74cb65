"""Warm start: the teacher's labels map onto the hierarchy correctly, and imitation learns them."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from agents.inference import agent_sizes
from agents.networks import PolicyValueNet
from agents.warm_start import (
    LabelBalance,
    WarmStartConfig,
    _domain_labels,
    class_weight_cap,
    collect,
    fit,
    label_weights,
    sample_weights,
)
from envs.catalogue import ACTION_ID, DOMAINS, STAGES, best_cure
from envs.multi_agent_env import EnvConfig, PipelineMedicEnv
from envs.observation import LAYOUTS, N_SLOTS
from envs.scenario import Scenario
from tests.conftest import single_fault_scenario

# A later stage than ingest: slot 0 is also the labels' default, so it would prove nothing.
LEAK_AT_TRANSFORM = Scenario.model_validate(
    {
        "name": "leak-at-transform",
        "duration_steps": 20,
        "faults": [{"type": "memory_leak", "stage": "transform", "at": 1, "severity": 0.8}],
    }
)


def leak_env_with_fault_active(pipelines: int) -> PipelineMedicEnv:
    env = PipelineMedicEnv(
        EnvConfig(scenarios=(LEAK_AT_TRANSFORM,), random={"share": 0.0}, pipelines=pipelines)
    )
    env.reset(seed=0)
    env.step({f"master/{i}": 3 for i in range(pipelines)})  # observe: the fault is now active
    return env


def test_each_specialist_is_labelled_with_its_domains_cure_at_the_fault_stage():
    env = leak_env_with_fault_active(2)
    scenario = LEAK_AT_TRANSFORM
    teacher_observes = np.full(2, ACTION_ID["observe"]), np.zeros(2, dtype=np.int64)
    labels = _domain_labels(env, *teacher_observes, env.sim.ground_truth())
    stage = STAGES.index(scenario.faults[0].stage)
    action, slot = labels["infra"]
    assert (action == ACTION_ID[best_cure("memory_leak").action]).all()
    assert (slot == stage).all() and stage == 2
    for quiet in ("drift", "quality"):
        assert (labels[quiet][0] == ACTION_ID["observe"]).all()
    # A capacity action the teacher takes (no fault of that domain behind it) labels its
    # domain's specialist in that pipeline only.
    scale_out = np.array([ACTION_ID["observe"], ACTION_ID["scale_out"]]), np.array([0, 3])
    labels = _domain_labels(env, *scale_out, env.sim.ground_truth())
    assert labels["infra"][0][1] == ACTION_ID["scale_out"] and labels["infra"][1][1] == 3
    assert labels["infra"][0][0] == ACTION_ID[best_cure("memory_leak").action]


def test_teacher_episodes_label_the_master_with_the_right_delegation():
    scenario = single_fault_scenario("duplicate_burst", at=3, steps=30)
    cfg = EnvConfig(scenarios=(scenario,), random={"share": 0.0}, pipelines=4)
    data, used = collect(cfg, None, steps=100, teacher_share=1.0, pipelines=4, seed=0)
    assert used >= 100
    master = np.array(data["master"].label)
    delegate_quality = LAYOUTS["master"].encode("delegate_quality")
    assert (master == delegate_quality).any()
    assert set(master) <= {delegate_quality, LAYOUTS["master"].encode("observe")}
    # Rewards were recorded for the value fit, one per master decision.
    assert len(data["master"].reward) == len(master) and min(data["master"].reward) < 0
    dedupe = {LAYOUTS["quality"].encode("deduplicate", s) for s in range(5)}
    assert set(data["quality"].label) & dedupe


def _first_step_labelled(role: str, labels: set[int], **options) -> int:
    """The first step on which the teacher's episodes of a leak at ``transform`` (two
    pipelines) label ``role`` with one of ``labels``. Every ``observe`` label is kept, so the
    samples come step by step, pipeline by pipeline: index // 2 is the step."""
    cfg = EnvConfig(scenarios=(LEAK_AT_TRANSFORM,), random={"share": 0.0}, pipelines=2)
    data, _ = collect(
        cfg, None, steps=40, teacher_share=1.0, pipelines=2, seed=0, observe_keep=1.0, **options
    )
    return int(np.flatnonzero(np.isin(data[role].label, list(labels)))[0]) // 2


def test_a_waiting_teacher_delegates_a_leak_only_once_memory_shows_it():
    delegate_infra = {LAYOUTS["master"].encode("delegate_infra")}
    # The oracle delegates on the leak's first step; the waiting teacher lets memory climb
    # from 50% to 61% first (1.6 points a step at severity 0.8).
    assert _first_step_labelled("master", delegate_infra, teacher_waits=False) == 1
    assert _first_step_labelled("master", delegate_infra, teacher_waits=True) == 1 + 6


def test_specialists_that_do_not_wait_learn_the_leak_from_its_onset():
    restarts = {LAYOUTS["infra"].encode("restart_stage", s) for s in range(N_SLOTS)}
    # The master waits for memory to show the leak either way (previous test); a specialist
    # that does not wait is taught the cure from the leak's first step.
    waiting = {"teacher_waits": True}
    assert _first_step_labelled("infra", restarts, **waiting, specialists_wait=True) == 1 + 6
    assert _first_step_labelled("infra", restarts, **waiting, specialists_wait=False) == 1


def test_fit_learns_the_labels():
    scenario = single_fault_scenario("duplicate_burst", at=3, steps=30)
    cfg = EnvConfig(scenarios=(scenario,), random={"share": 0.0}, pipelines=8)
    data, _ = collect(cfg, None, steps=2000, teacher_share=1.0, pipelines=8, seed=1)
    nets = {a: PolicyValueNet(*agent_sizes(a), [64]) for a in data}
    # 40 epochs: at 20 the quality acting labels sat near 0.5, so torch's thread count decided it.
    accuracy = fit(nets, data, WarmStartConfig(epochs=40, batch_size=64), gamma=0.98, seed=0)
    for role in ("master", "quality"):
        labels = np.array(data[role].label)
        majority = np.bincount(labels).max() / len(labels)  # what a constant answer scores
        assert accuracy[role] > majority, (role, accuracy, majority)
    # The acting labels (delegate, deduplicate) are learned, not drowned by the quiet steps.
    assert accuracy["master (acting labels)"] > 0.5 and accuracy["quality (acting labels)"] > 0.5


def test_recorded_oracle_transitions_chain_and_clone_into_a_working_policy(
    tmp_path, monkeypatch, caplog
):
    """``record_episodes`` writes agent-level transitions (each next observation is that agent's
    next observation), and a warm start from them alone beats doing nothing."""
    from agents.inference import LearnedPolicy, manifest_for
    from agents.rollout import episode_seeds, rollout
    from agents.warm_start import record_episodes, samples_from_experience, warm_start
    from checkpoints.experience import ExperienceWriter, ReplaySampler, Transitions
    from envs.metrics import aggregate

    scenario = single_fault_scenario("duplicate_burst", at=3, steps=40)
    cfg = EnvConfig(scenarios=(scenario,), random={"share": 0.0}, pipelines=8)
    monkeypatch.setenv("PIPEMEDIC_STORE_URI", str(tmp_path))
    with ExperienceWriter(run_id="rec", source="sim") as writer:
        used = record_episodes(cfg, "oracle", writer, steps=6000, seed=0, pipelines=16)
    assert used >= 6000
    table = ReplaySampler().read(policy_versions=["oracle"])
    assert table.num_rows == writer.rows_written > 0
    rows = table.sort_by([("episode", "ascending"), ("agent", "ascending"), ("step", "ascending")])
    episode, agent = rows["episode"].to_pylist(), rows["agent"].to_pylist()
    obs, nxt = rows["observation"].to_pylist(), rows["next_observation"].to_pylist()
    masters = [i for i in range(len(agent)) if agent[i] == "master"]
    for i, j in zip(masters, masters[1:], strict=False):
        if episode[i] == episode[j]:
            assert nxt[i] == obs[j]  # transitions chain within an episode
    # The oracle deduplicates: the quality specialist was asked and answered.
    assert "quality" in set(agent)
    assert rows["truncated"].to_pylist().count(True) >= 16  # every episode ends truncated

    # Rows from code with another observation layout are skipped with a warning, not stacked.
    with ExperienceWriter(run_id="old", source="sim") as old_writer:
        old_writer.add(
            Transitions(
                episode=["old-0"] * 2,
                step=np.arange(2),
                agent=["master"] * 2,
                observation=np.zeros((2, agent_sizes("master")[0] - 105), dtype=np.float32),
                action=np.zeros(2, dtype=np.int64),
                reward=np.zeros(2),
                policy_version="oracle",
                action_mask=np.ones((2, LAYOUTS["master"].size), dtype=np.float32),
            )
        )
    with caplog.at_level(logging.WARNING, logger="agents.warm_start"):
        data = samples_from_experience(policies=("oracle",), max_rows=10**9, seed=0)
    assert len(data["master"].label) == table["agent"].to_pylist().count("master")
    assert "2 master transitions have observations of another size" in caplog.text

    nets = {a: PolicyValueNet(*agent_sizes(a), [32, 32]) for a in ("master", *DOMAINS)}
    ws = WarmStartConfig(source="experience", epochs=20, rounds=1)  # no live rounds
    assert warm_start(nets, cfg, ws, gamma=0.98, seed=0) == 0
    cloned = LearnedPolicy(manifest_for("hierarchical", nets, {}), nets)
    idle = LearnedPolicy(manifest_for("hierarchical", nets, {}), _observe_only_nets())
    seeds = episode_seeds(scenario, 0, 6)
    good = aggregate(rollout(cloned, scenario, seeds))
    bad = aggregate(rollout(idle, scenario, seeds))
    assert good["mttr_s"] < 0.5 * bad["mttr_s"], (good, bad)


def _observe_only_nets():
    """A master that always observes: what no remediation at all looks like."""
    import torch

    nets = {a: PolicyValueNet(*agent_sizes(a), [8]) for a in ("master", *DOMAINS)}
    with torch.no_grad():
        last = nets["master"].pi[-1]
        last.weight.zero_()
        last.bias.fill_(-10.0)
        last.bias[LAYOUTS["master"].encode("observe")] = 10.0
    return nets


def test_only_the_master_takes_its_own_class_weight_cap():
    cfg = WarmStartConfig(max_class_weight=1.0, master_max_class_weight=3.0)
    assert class_weight_cap("master", cfg) == 3.0
    assert class_weight_cap("infra", cfg) == class_weight_cap("flat", cfg) == 1.0
    assert class_weight_cap("master", WarmStartConfig(max_class_weight=2.0)) == 2.0
    # 8 quiet labels, 2 rare ones: weights are n / (classes * count), capped.
    label = torch.tensor([0] * 8 + [1] * 2)
    assert label_weights(label, 4, 10.0).tolist() == [10 / 16] * 8 + [10 / 4] * 2
    assert label_weights(label, 4, 1.0).tolist() == [10 / 16] * 8 + [1.0] * 2


def test_observe_weight_sets_that_roles_observe_labels_only():
    observe = LAYOUTS["master"].encode("observe")
    infra = LAYOUTS["master"].encode("delegate_infra")
    label = torch.tensor([observe] * 8 + [infra] * 2)
    n = LAYOUTS["master"].size
    cfg = WarmStartConfig(max_class_weight=1.0, observe_weight={"master": 0.05})
    assert sample_weights(label, "master", n, cfg).tolist() == pytest.approx([0.05] * 8 + [1.0] * 2)
    # A role not named keeps the frequency weights, even where its label numbers are the same.
    same = label_weights(label, n, 1.0).tolist()
    assert (
        sample_weights(label, "master", n, WarmStartConfig(max_class_weight=1.0)).tolist() == same
    )
    assert sample_weights(label, "infra", n, cfg).tolist() == same


@pytest.mark.parametrize(
    ("weights", "named"),
    [({"mastr": 0.1}, "mastr"), ({"infra": 0.0}, "infra"), ({"flat": -1}, "flat")],
)
def test_observe_weight_refuses_unknown_roles_and_weights_not_above_zero(weights, named):
    with pytest.raises(ValueError, match=named):
        WarmStartConfig(observe_weight=weights)


def test_label_balance_reports_the_weight_of_acting_against_observe_labels():
    observe = LAYOUTS["master"].encode("observe")
    infra = LAYOUTS["master"].encode("delegate_infra")
    label = [observe] * 8 + [infra] * 2
    # Frequency weights: observe (10 / 2) / 8 = 0.625 each, delegate_infra 2.5 capped at 1.
    b = LabelBalance.of("master", label, WarmStartConfig(max_class_weight=1.0))
    assert (b.samples, b.labels) == (10, 2)
    assert b.observe_share == pytest.approx(0.8)
    assert b.observe_weight == pytest.approx(0.625)
    assert b.acting_to_observe == pytest.approx(2 / (8 * 0.625))
    cfg = WarmStartConfig(max_class_weight=1.0, observe_weight={"master": 0.05})
    assert LabelBalance.of("master", label, cfg).acting_to_observe == pytest.approx(2 / 0.4)
