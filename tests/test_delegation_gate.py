"""The delegation gate: a learned rule for the master's choice over the hierarchy's outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from agents.delegation_gate import (
    FEATURES,
    DelegationGate,
    fit_delegation_gate,
    fit_gate,
    gate_features,
)
from agents.inference import LearnedPolicy, export_bundle, fresh_nets
from agents.ppo_config import load_train_config
from envs.catalogue import ACTION_ID, DOMAINS, MASTER_ACTIONS, master_action_name
from envs.errors import CheckpointError
from envs.observation import LAYOUTS, ObservationEncoder
from envs.params import SimParams
from envs.scenario import load_scenario
from envs.simulator import PipelineSim

ROOT = Path(__file__).resolve().parents[1]
OBSERVE = MASTER_ACTIONS.index("observe")
INFRA = MASTER_ACTIONS.index("delegate_infra")
INFRA_TOP = FEATURES.index("infra_top_logit")


def _fixed_probs(net, probs) -> None:
    """Make ``net``'s policy give ``probs`` whatever it sees."""
    with torch.no_grad():
        net.pi[-1].weight.zero_()
        net.pi[-1].bias.copy_(torch.log(torch.tensor(probs, dtype=torch.float32)))


def _one_pipeline_encoder() -> ObservationEncoder:
    scenario = load_scenario(ROOT / "configs/scenarios/memory-leak.yaml")
    enc = ObservationEncoder(scenario.topology, SimParams(), n=1)
    enc.update(PipelineSim(scenario, n=1).reset([1]))
    return enc


def test_features_are_the_masters_log_probs_and_each_specialists_logits():
    master = np.array([[0.1, 0.2, 0.1, 0.5, 0.1]])
    specialists = {}
    for d in DOMAINS:
        p = np.full((1, LAYOUTS[d].size), 0.0)
        p[0, LAYOUTS[d].encode("observe")] = 0.75
        p[0, 1 + LAYOUTS[d].encode("observe")] = 0.2  # its top remediation
        p[0, 2 + LAYOUTS[d].encode("observe")] = 0.05
        specialists[d] = p
    f = gate_features(master, specialists)
    assert f.shape == (1, len(FEATURES))
    np.testing.assert_allclose(f[0, :5], np.log(master[0]))
    for d in DOMAINS:
        act = FEATURES.index(f"{d}_act_logit")
        top = FEATURES.index(f"{d}_top_logit")
        assert f[0, act] == pytest.approx(np.log(0.25 / 0.75))  # P(act) = 1 - P(observe)
        assert f[0, top] == pytest.approx(np.log(0.2 / 0.8))


def test_fitted_gate_learns_to_delegate_when_the_infra_specialist_is_sure():
    # The teacher delegates to infra exactly when infra's top remediation has a logit above 1,
    # whatever the master says; the other features are noise.
    rng = np.random.default_rng(0)
    x = rng.normal(0.0, 2.0, size=(4000, len(FEATURES)))
    y = np.where(x[:, INFRA_TOP] > 1.0, INFRA, OBSERVE)
    gate = fit_gate(x, y, l2=1e-4)
    test = rng.normal(0.0, 2.0, size=(1000, len(FEATURES)))
    choice = gate.probs(test, np.ones((1000, len(MASTER_ACTIONS)))).argmax(axis=1)
    expected = np.where(test[:, INFRA_TOP] > 1.0, INFRA, OBSERVE)
    assert (choice == expected).mean() > 0.97
    # The infra-top weight carries the decision between the two classes it was shown.
    margin = gate.weights[:, INFRA] - gate.weights[:, OBSERVE]
    assert np.argmax(np.abs(margin)) == INFRA_TOP and margin[INFRA_TOP] > 0


def test_observe_offset_makes_the_gate_act_sooner():
    weights = np.zeros((len(FEATURES), len(MASTER_ACTIONS)))
    bias = np.log(np.array([0.05, 0.35, 0.05, 0.5, 0.05]))
    x, mask = np.zeros((1, len(FEATURES))), np.ones((1, len(MASTER_ACTIONS)))
    assert DelegationGate(weights, bias).probs(x, mask).argmax() == OBSERVE
    assert DelegationGate(weights, bias, observe_offset=1.0).probs(x, mask).argmax() == INFRA
    # A masked action gets no probability, however large its logit.
    mask[0, INFRA] = 0
    assert DelegationGate(weights, bias, observe_offset=1.0).probs(x, mask)[0, INFRA] == 0


def test_gate_round_trips_through_the_manifest_and_refuses_other_features():
    rng = np.random.default_rng(1)
    gate = DelegationGate(
        rng.normal(size=(len(FEATURES), len(MASTER_ACTIONS))), rng.normal(size=5), 0.5
    )
    back = DelegationGate.from_manifest(gate.to_manifest())
    np.testing.assert_allclose(back.weights, gate.weights, atol=1e-6)
    assert back.observe_offset == 0.5
    entry = gate.to_manifest() | {"features": ["something_else"]}
    with pytest.raises(CheckpointError, match="fitted for features"):
        DelegationGate.from_manifest(entry, where="hierarchical:v3")
    entry = gate.to_manifest() | {"bias": [0.0, 1.0]}
    with pytest.raises(CheckpointError, match="weights .* bias"):
        DelegationGate.from_manifest(entry)
    with pytest.raises(CheckpointError, match="lacks observe_offset, weights"):
        DelegationGate.from_manifest({"features": list(FEATURES), "actions": [], "bias": []})
    with pytest.raises(CheckpointError, match="must be a mapping"):
        DelegationGate.from_manifest([1, 2])
    with pytest.raises(CheckpointError, match="non-numbers"):
        DelegationGate.from_manifest(gate.to_manifest() | {"observe_offset": "lots"})


def test_a_rule_given_to_the_constructor_replaces_the_bundles_whole_rule(tmp_path):
    nets = fresh_nets("hierarchical", hidden=(8,))
    gate = DelegationGate(np.zeros((len(FEATURES), len(MASTER_ACTIONS))), np.zeros(5), 0.5)
    export_bundle(tmp_path / "b", "hierarchical", nets, {"delegation_gate": gate.to_manifest()})
    assert LearnedPolicy.load(tmp_path / "b").delegation_gate.observe_offset == 0.5
    replaced = LearnedPolicy.load(tmp_path / "b", hand_raise={"infra": 0.9})
    assert replaced.rule() == {
        "act_threshold": None,
        "hand_raise": {"infra": 0.9},
        "delegation_gate": None,
    }


def test_a_bundle_with_a_gate_delegates_where_the_gate_says(tmp_path):
    nets = fresh_nets("hierarchical", hidden=(8,))
    _fixed_probs(nets["master"], [0.05, 0.2, 0.05, 0.65, 0.05])  # the master would wait
    infra = np.full(LAYOUTS["infra"].size, 1e-4)
    infra[LAYOUTS["infra"].encode("restart_stage", 2)] = 0.9  # infra is sure
    infra[LAYOUTS["infra"].encode("observe")] = 0.1
    infra /= infra.sum()
    _fixed_probs(nets["infra"], infra)
    enc = _one_pipeline_encoder()
    # A gate that follows infra's confidence: delegate_infra's logit is infra's top logit.
    weights = np.zeros((len(FEATURES), len(MASTER_ACTIONS)))
    weights[INFRA_TOP, INFRA] = 1.0
    bias = np.array([-10.0, 0.0, -10.0, 1.0, -10.0])
    gate = DelegationGate(weights, bias)
    export_bundle(tmp_path / "b", "hierarchical", nets, {"delegation_gate": gate.to_manifest()})
    policy = LearnedPolicy.load(tmp_path / "b")
    d = policy.decide(enc)
    assert d.specialist == ["infra"] and d.action[0] == ACTION_ID["restart_stage"]
    assert MASTER_ACTIONS[d.chosen[0]["master"][0]] == "delegate_infra"
    # delegate_infra's logit is logit(p_top), about 2.2, against observe's 1 (the others are
    # -10): the confidence is the gate's probability of it times infra's of restarting.
    p_top = d.chosen[0]["infra"][1]  # infra's probability of it, with its action mask
    assert p_top == pytest.approx(0.9, abs=0.01)
    z_infra = np.log(p_top / (1 - p_top))
    p_gate = np.exp(z_infra) / (np.exp(z_infra) + np.e + 3 * np.exp(-10.0))
    assert d.confidence[0] == pytest.approx(p_gate * p_top, rel=1e-4)
    # Greedy on the same networks the master waits.
    policy.set_rule()
    assert policy.decide(enc).specialist == [None]


def test_a_rule_has_the_gate_or_the_older_rules_not_both(tmp_path):
    nets = fresh_nets("hierarchical", hidden=(8,))
    gate = DelegationGate(np.zeros((len(FEATURES), len(MASTER_ACTIONS))), np.zeros(5))
    export_bundle(tmp_path / "b", "hierarchical", nets, {})
    policy = LearnedPolicy.load(tmp_path / "b")
    with pytest.raises(CheckpointError, match="the gate or those, not both"):
        policy.set_rule(hand_raise={"infra": 0.9}, delegation_gate=gate)
    export_bundle(tmp_path / "f", "flat", fresh_nets("flat", hidden=(8,)), {})
    with pytest.raises(CheckpointError, match="hierarchical policies only"):
        LearnedPolicy.load(tmp_path / "f", delegation_gate=gate)


def test_a_gate_config_that_would_collect_nothing_is_refused(tmp_path):
    from agents.delegation_gate import DelegationGateConfig

    with pytest.raises(ValueError, match="must cover at least one step"):
        DelegationGateConfig(pipeline_steps=100, rounds=2, episodes_per_scenario=64)


def test_master_labels_map_cures_to_their_domain():
    assert master_action_name(ACTION_ID["restart_stage"]) == "delegate_infra"
    assert master_action_name(ACTION_ID["deduplicate"]) == "delegate_quality"
    assert master_action_name(ACTION_ID["rollback_model"]) == "delegate_drift"
    assert master_action_name(ACTION_ID["observe"]) == "observe"


def test_fitting_on_the_training_mix_leaves_the_policys_rule_alone(tmp_path):
    cfg_file = tmp_path / "train.yaml"
    cfg_file.write_text(
        yaml.safe_dump(
            {
                "env": {
                    "scenarios": [str(ROOT / "configs/scenarios/memory-leak.yaml")],
                    "random": {"share": 0.0},
                    "max_episode_steps": 40,
                },
                "warm_start": {"teacher": "oracle_capacity", "teacher_waits": True},
                "delegation_gate": {
                    "enabled": True,
                    "pipeline_steps": 2 * 40 * 8,
                    "rounds": 2,
                    "episodes_per_scenario": 8,
                },
            }
        )
    )
    cfg = load_train_config(cfg_file)
    export_bundle(tmp_path / "b", "hierarchical", fresh_nets("hierarchical", hidden=(8,)), {})
    policy = LearnedPolicy.load(tmp_path / "b", hand_raise={"infra": 0.9})
    gate, facts = fit_delegation_gate(policy, cfg, seed=5)
    # Two rounds of one 40-step scenario with 8 episodes each: one sample per pipeline-step.
    assert facts["samples"] == 2 * 40 * 8
    # A leak shows within 40 steps at any severity the file sets, so the teacher acts somewhere.
    assert 0 < facts["teacher_acting_share"] < 1
    assert gate.weights.shape == (len(FEATURES), len(MASTER_ACTIONS))
    assert policy.hand_raise == {"infra": 0.9} and policy.delegation_gate is None
