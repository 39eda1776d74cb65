"""Every fault type: its cure set clears it, an unrelated action does not, each documented harm
shows up in the metric the catalogue names."""

from __future__ import annotations

import numpy as np
import pytest

from envs.catalogue import ACTION_ID, CURES, FAULT_DOMAIN, FAULT_TYPES, HARMS, MODEL_STAGE
from envs.scenario import NEVER
from envs.simulator import PipelineSim
from tests.conftest import single_fault_scenario

ONSET = 5
OBSERVE = ACTION_ID["observe"]
# An action from another domain, which has nothing to do with the fault.
UNRELATED = {"drift": "deduplicate", "infra": "schema_remap", "quality": "rollback_model"}


def stage_of(scenario, *, model: bool = False) -> int:
    """Topology index of the scenario's fault stage, or of the model stage."""
    return scenario.topology.index(MODEL_STAGE if model else scenario.faults[0].stage)


def run(sim: PipelineSim, plan: dict[int, tuple[str, int]], seeds: list[int]) -> None:
    """Observe every step except those in ``plan`` (step -> (action, stage))."""
    sim.reset(seeds)
    while not sim.done:
        action, stage = plan.get(sim.t + 1, ("observe", 0))
        sim.step(np.full(sim.n, ACTION_ID[action]), np.full(sim.n, stage))


@pytest.mark.parametrize(
    ("fault", "cure"),
    [(f, c) for f in FAULT_TYPES for c in CURES[f]],
    ids=lambda x: getattr(x, "action", x),
)
def test_cure_clears_fault_after_its_delay_with_its_probability(fault, cure):
    n = 60
    scenario = single_fault_scenario(fault, at=ONSET)
    sim = PipelineSim(scenario, n=n)
    applied = ONSET + 3
    run(
        sim,
        {applied: (cure.action, stage_of(scenario, model=cure.target == "model"))},
        list(range(n)),
    )
    cleared = sim.f_cleared_at[:, 0]
    worked = cleared != NEVER
    assert np.all(cleared[worked] == applied + cure.delay_steps)
    assert np.all(sim.f_first_cure_at[:, 0] == applied)
    # Binomial(60, p): 4 standard deviations is a loose but failing-when-wrong band.
    tolerance = 4 * np.sqrt(cure.probability * (1 - cure.probability) / n) + 1 / n
    assert abs(worked.mean() - cure.probability) <= tolerance


@pytest.mark.parametrize("fault", FAULT_TYPES)
def test_unrelated_action_and_observing_leave_the_fault_active(fault):
    scenario = single_fault_scenario(fault, at=ONSET)
    sim = PipelineSim(scenario, n=8)
    plan = {
        t: (UNRELATED[FAULT_DOMAIN[fault]], stage_of(scenario)) for t in range(ONSET, ONSET + 40)
    }
    run(sim, plan, list(range(8)))
    assert np.all(sim.f_cleared_at[:, 0] == NEVER)
    assert np.all(sim.f_first_cure_at[:, 0] == NEVER)


@pytest.mark.parametrize(
    ("fault", "harm"),
    [(f, h) for f in FAULT_TYPES for h in HARMS[f]],
    ids=lambda x: getattr(x, "action", x),
)
def test_harmful_action_does_the_documented_harm(fault, harm):
    seeds = list(range(6))
    scenario = single_fault_scenario(fault, at=ONSET, steps=60)
    stage = stage_of(scenario, model=harm.action == "rollback_model")

    def outcome(plan):
        sim = PipelineSim(scenario, n=len(seeds))
        run(sim, plan, seeds)
        assert np.all(sim.f_cleared_at[:, 0] == NEVER), "a harmful action must not cure"
        lost = sum(h.records_lost for h in sim.history)
        cost = sum(h.cost for h in sim.history)
        slo_ok = sum(h.slo_ok.astype(int) for h in sim.history)
        return {"records_lost": lost, "cost": cost, "slo": -slo_ok}

    # Act once the fault has had ten steps to build up (queues, drift), as a responder would.
    baseline = outcome({})
    harmed = outcome({ONSET + 10: (harm.action, stage)})
    assert np.all(harmed[harm.metric] > baseline[harm.metric]), harm.why
