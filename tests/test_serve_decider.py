"""The decision service without HTTP: answers, guardrails, explanations, feedback, reloads."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from checkpoints.experience import ReplaySampler, experience_uri
from envs.observation import observation_size
from serve import schemas
from serve.decider import DecisionError, DecisionService
from serve.settings import Guardrails, ServiceSettings
from tests.serve_helpers import biased_nets, policy_of, publish_and_promote, snapshot


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def service(tmp_path, nets=None, clock=None, **guardrails) -> DecisionService:
    settings = ServiceSettings(store_uri=str(tmp_path), guardrails=Guardrails(**guardrails))
    return DecisionService(
        settings,
        policy=policy_of(nets or biased_nets(logit=8.0)),
        clock=clock or Clock(),
    )


def req(**overrides) -> schemas.DecideRequest:
    return schemas.DecideRequest.model_validate(snapshot(**overrides))


def test_a_confident_decision_names_action_stage_specialist_and_its_joint_probability(tmp_path):
    svc = service(tmp_path, default_mode="autonomous")
    d = svc.decide(req())
    assert (d.action, d.target_stage, d.specialist, d.mode) == (
        "scale_out",
        "transform",
        "infra",
        "autonomous",
    )
    # Joint probability: master's delegate_infra (all 5 master actions allowed, one with logit
    # 8, the rest 0) × the specialist's scale_out@transform (logit 8 against ~15 allowed zeros).
    p_master = math.exp(8) / (math.exp(8) + 4)
    assert p_master * 0.99 < d.confidence < p_master
    assert d.alternatives[0].action == "scale_out" and d.alternatives[0].target_stage == "transform"
    assert d.alternatives[0].probability == pytest.approx(d.confidence, rel=1e-5)
    probs = [a.probability for a in d.alternatives]
    assert probs == sorted(probs, reverse=True)
    assert d.parameters == {"replicas_from": 4, "replicas_to": 5}
    assert "infra specialist" in d.explanation and "scale_out on transform" in d.explanation
    assert d.policy_version == "hierarchical:test"


def test_a_raised_hand_is_as_confident_as_its_specialist_and_says_so(tmp_path):
    from envs.catalogue import MASTER_ACTIONS

    nets = biased_nets(logit=8.0)  # infra sure of scale_out@transform
    with torch.no_grad():  # but the master would wait
        nets["master"].pi[-1].bias.zero_()
        nets["master"].pi[-1].bias[MASTER_ACTIONS.index("observe")] = 8.0
    settings = ServiceSettings(
        store_uri=str(tmp_path), guardrails=Guardrails(default_mode="autonomous")
    )
    policy = policy_of(nets)
    policy.hand_raise = {"infra": 0.9}
    d = DecisionService(settings, policy=policy, clock=Clock()).decide(req())
    assert (d.action, d.target_stage, d.specialist, d.mode) == (
        "scale_out",
        "transform",
        "infra",
        "autonomous",
    )
    # The specialist's probability alone (logit 8 against ~15 allowed zeros), not times the
    # master's small P(delegate_infra), which would have escalated it.
    assert 0.99 < d.confidence < 1.0
    assert "master chose to observe" in d.explanation and "asked anyway" in d.explanation


def test_a_gated_delegation_says_so_and_carries_the_gates_probability(tmp_path):
    from agents.delegation_gate import FEATURES, DelegationGate
    from envs.catalogue import MASTER_ACTIONS

    nets = biased_nets(logit=8.0)  # infra sure of scale_out@transform
    with torch.no_grad():  # but the master would wait
        nets["master"].pi[-1].bias.zero_()
        nets["master"].pi[-1].bias[MASTER_ACTIONS.index("observe")] = 8.0
    # A gate that delegates to infra whatever it is shown: probability 0.8 against 0.05 each.
    bias = np.log(np.array([0.05, 0.8, 0.05, 0.05, 0.05]))
    gate = DelegationGate(np.zeros((len(FEATURES), len(MASTER_ACTIONS))), bias)
    settings = ServiceSettings(
        store_uri=str(tmp_path), guardrails=Guardrails(default_mode="autonomous")
    )
    policy = policy_of(nets)
    policy.set_rule(delegation_gate=gate)
    d = DecisionService(settings, policy=policy, clock=Clock()).decide(req())
    assert (d.action, d.target_stage, d.specialist) == ("scale_out", "transform", "infra")
    # The gate's 0.8 times the specialist's near-certain choice.
    assert d.confidence == pytest.approx(0.8, abs=0.01)
    assert "weighing its specialists' reports, delegated to the infra specialist" in d.explanation


def test_low_confidence_escalates_and_says_why(tmp_path):
    svc = service(tmp_path, nets=biased_nets(logit=1.0), default_mode="autonomous")
    d = svc.decide(req())
    assert d.confidence < 0.4
    assert d.mode == "escalate"
    assert f"confidence {d.confidence:.2f} is under the threshold 0.40" in d.explanation


def test_a_destructive_action_below_its_own_threshold_escalates(tmp_path):
    nets = biased_nets(action="restart_stage", logit=4.0)
    svc = service(tmp_path, nets=nets, default_mode="autonomous")
    d = svc.decide(req())
    assert d.action == "restart_stage" and 0.4 < d.confidence < 0.8
    assert d.mode == "escalate"
    assert "restart_stage is destructive" in d.explanation
    # With its threshold lowered under the confidence, the same decision runs alone.
    svc.set_guardrails(
        Guardrails(default_mode="autonomous", destructive_min_confidence={"restart_stage": 0.3})
    )
    assert svc.decide(req(pipeline_id="other")).mode == "autonomous"


def test_cooldown_then_hourly_cap_hold_actions_back_and_say_so(tmp_path):
    clock = Clock()
    svc = service(
        tmp_path, clock=clock, default_mode="autonomous", cooldown_s=60, max_actions_per_hour=3
    )
    first = svc.decide(req())
    assert first.action == "scale_out" and first.held_back is None

    clock.now += 10
    held = svc.decide(req())
    assert held.action == "observe" and held.target_stage is None
    assert held.held_back.action == "scale_out" and held.held_back.reason == "cooldown"
    assert held.held_back.retry_after_s == pytest.approx(50)
    assert "Held back by the per-pipeline cooldown" in held.explanation
    # Another pipeline is not held back by this one's cooldown.
    assert svc.decide(req(pipeline_id="billing")).held_back is None

    for _ in range(2):  # two more actions, each after the cooldown: 3 in the hour
        clock.now += 61
        assert svc.decide(req()).held_back is None
    clock.now += 61
    capped = svc.decide(req())
    assert capped.held_back.reason == "hourly_cap"
    # The first action (at t=1000) leaves the hour at t=4600.
    assert capped.held_back.retry_after_s == pytest.approx(4600 - clock.now)
    clock.now = 4600.0
    assert svc.decide(req()).held_back is None


def test_shadow_mode_recommends_without_acting_or_spending_the_cap(tmp_path):
    svc = service(tmp_path, max_actions_per_hour=1)
    for _ in range(3):
        d = svc.decide(req())
        assert d.mode == "shadow" and d.action == "scale_out" and d.held_back is None
        assert "Shadow mode" in d.explanation
    # Nothing was done, so an autonomous request may still act.
    assert svc.decide(req(mode="autonomous")).held_back is None


def test_drift_distributions_become_scores_and_feature_psi(tmp_path):
    svc = service(tmp_path)
    body = snapshot(
        drift=[
            {
                "feature": "amount",
                "stage": "transform",
                "reference_counts": [50, 50],
                "current_counts": [80, 20],
            }
        ]
    )
    d = svc.decide(schemas.DecideRequest.model_validate(body))
    assert d.drift_scores[0].psi == pytest.approx(0.3 * math.log(4))
    assert d.drift_scores[0].ks == pytest.approx(0.3)
    state = svc._pipelines["orders-etl"]
    raw, _ = state.encoder.last_values()
    transform = state.topology.index("transform")
    assert raw[0, transform, 15] == pytest.approx(0.3 * math.log(4))  # feature_psi column


def test_signals_name_what_moved_from_usual(tmp_path):
    svc = service(tmp_path)
    for _ in range(5):
        svc.decide(req())
    body = snapshot()
    body["stages"]["transform"]["queue"] = 50_000.0
    d = svc.decide(schemas.DecideRequest.model_validate(body))
    top = d.signals[0]
    assert (top.stage, top.metric, top.value) == ("transform", "queue", 50_000.0)
    assert top.departure > 0
    assert "transform queue 5e+04 (above usual)" in d.explanation


def test_feedback_becomes_experience_rows_with_the_observations_the_agents_saw(tmp_path):
    svc = service(tmp_path)
    d = svc.decide(req())
    answer = svc.feedback(
        schemas.FeedbackRequest(
            decision_id=d.decision_id, outcome="resolved", telemetry_after=req()
        )
    )
    assert (answer.recorded_rows, answer.source, answer.reward) == (2, "shadow", 1.0)
    assert svc.flush_feedback() == 2
    rows = ReplaySampler(experience_uri(str(tmp_path))).read(sources=["shadow"]).to_pylist()
    by_agent = {r["agent"]: r for r in rows}
    assert set(by_agent) == {"master", "infra"}
    assert len(by_agent["infra"]["observation"]) == observation_size("infra")
    assert len(by_agent["infra"]["next_observation"]) == observation_size("infra")
    assert by_agent["infra"]["action_prob"] == pytest.approx(
        d.confidence / by_agent["master"]["action_prob"], rel=1e-5
    )
    assert all(r["reward"] == 1.0 and r["terminated"] for r in rows)
    assert {r["policy_version"] for r in rows} == {"hierarchical:test"}
    assert {r["episode"] for r in rows} == {"orders-etl"}


def test_feedback_for_an_unknown_or_mismatched_decision_is_refused(tmp_path):
    svc = service(tmp_path)
    with pytest.raises(DecisionError, match="unknown to this replica") as exc:
        svc.feedback(schemas.FeedbackRequest(decision_id="nope", outcome="worse"))
    assert exc.value.status == 404
    d = svc.decide(req())
    with pytest.raises(DecisionError, match="was for 'orders-etl'"):
        svc.feedback(
            schemas.FeedbackRequest(
                decision_id=d.decision_id,
                outcome="worse",
                telemetry_after=req(pipeline_id="billing"),
            )
        )
    # A refused feedback does not consume the decision: a correct one still lands.
    ok = svc.feedback(schemas.FeedbackRequest(decision_id=d.decision_id, outcome="worse"))
    assert ok.reward == -1.0


def test_a_batch_decides_like_single_requests(tmp_path):
    a, b = service(tmp_path), service(tmp_path)
    bodies = [req(pipeline_id=f"p{i}") for i in range(5)]
    batch = a.decide_many(bodies)
    singles = [b.decide(r) for r in bodies]
    for x, y in zip(batch, singles, strict=True):
        assert (x.action, x.target_stage, x.specialist) == (y.action, y.target_stage, y.specialist)
        assert x.confidence == pytest.approx(y.confidence, rel=1e-5)
    with pytest.raises(DecisionError, match="once per batch"):
        a.decide_many([bodies[0], bodies[0]])


def test_a_newly_promoted_version_is_picked_up(tmp_path):
    root = str(tmp_path)
    publish_and_promote(root, biased_nets(logit=8.0), iteration=1)
    svc = DecisionService(ServiceSettings(store_uri=root))
    assert svc.policy.version == "hierarchical:v1"
    assert svc.reload_if_promoted() is False
    publish_and_promote(root, biased_nets(action="throttle", logit=8.0), iteration=2)
    assert svc.reload_if_promoted() is True
    assert svc.policy.version == "hierarchical:v2"
    assert svc.decide(req()).action == "throttle"
    assert svc.policy_info().trained["iteration"] == 2


def test_self_test_passes_for_a_working_policy_and_fails_for_a_broken_one(tmp_path):
    svc = service(tmp_path)
    svc.self_test()
    svc.policy.nets["master"].pi[0].weight.data[:] = np.nan
    with pytest.raises(RuntimeError, match="cannot decide"):
        svc.self_test()


def test_the_ingress_in_use_is_named_by_its_switch_variable(monkeypatch):
    from serve.launch import ingress_in_use
    from serve.settings import INGRESS_ENV, INGRESS_SWITCH

    for var in INGRESS_SWITCH.values():
        monkeypatch.delenv(var, raising=False)
    assert ingress_in_use() == "proxy"
    for name in ("direct", "haproxy"):
        for var, value in INGRESS_ENV[name].items():
            monkeypatch.setenv(var, value)
        assert ingress_in_use() == name
    # HAProxy switched on by hand, without the other variables pipemedic sets, is still HAProxy.
    monkeypatch.delenv(INGRESS_SWITCH["direct"])
    monkeypatch.delenv("RAY_SERVE_HAPROXY_METRICS_ENABLED")
    assert ingress_in_use() == "haproxy"
