"""The simulator's contract: shapes, errors, determinism, truncation, a healthy baseline."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from envs.catalogue import ACTION_ID, SIM_ACTIONS
from envs.scenario import NEVER, Scenario, draw_bursts, draw_fault_schedule
from envs.simulator import PipelineSim
from envs.telemetry import PIPELINE_METRICS, STAGE_METRICS
from tests.conftest import single_fault_scenario

QUIET = Scenario.model_validate({"name": "quiet", "duration_steps": 60})


def observe_all(sim: PipelineSim) -> None:
    while not sim.done:
        sim.step(np.zeros(sim.n, dtype=int), np.zeros(sim.n, dtype=int))


def test_reset_returns_telemetry_of_the_documented_shape():
    sim = PipelineSim(QUIET, n=3)
    tel = sim.reset([1, 2, 3])
    assert tel.stage.shape == (3, 5, len(STAGE_METRICS))
    assert tel.pipeline.shape == (3, len(PIPELINE_METRICS))
    assert tel.step == 0 and tel.topology == QUIET.topology


def test_episode_is_truncated_after_duration_steps():
    sim = PipelineSim(QUIET, n=1)
    sim.reset([0])
    observe_all(sim)
    assert sim.t == QUIET.duration_steps and len(sim.history) == QUIET.duration_steps + 1
    with pytest.raises(RuntimeError, match="episode is over"):
        sim.step(np.zeros(1, dtype=int), np.zeros(1, dtype=int))


def test_bad_actions_are_rejected_with_the_rule():
    sim = PipelineSim(QUIET, n=2)
    sim.reset([0, 1])
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        sim.step(np.zeros(3, dtype=int), np.zeros(3, dtype=int))
    with pytest.raises(ValueError, match=f"action ids must be in \\[0, {len(SIM_ACTIONS)}\\)"):
        sim.step(np.array([0, 99]), np.zeros(2, dtype=int))
    with pytest.raises(ValueError, match=r"target stages must be in \[0, 5\)"):
        sim.step(np.zeros(2, dtype=int), np.array([0, 5]))
    with pytest.raises(ValueError, match="one per pipeline"):
        sim.reset([0])


def test_same_seeds_give_the_same_episode():
    scenario = single_fault_scenario("traffic_surge")
    runs = []
    for _ in range(2):
        sim = PipelineSim(scenario, n=2)
        sim.reset([5, 6])
        rng = np.random.default_rng(0)
        while not sim.done:
            sim.step(rng.integers(len(SIM_ACTIONS), size=2), rng.integers(5, size=2))
        runs.append(np.stack([h.records_lost for h in sim.history]))
    np.testing.assert_array_equal(runs[0], runs[1])


def test_a_one_step_counterfactual_foretells_the_step_and_changes_nothing():
    # Random actions on a faulty scenario, so cures, restarts and their random draws happen.
    scenario = single_fault_scenario("node_failure", at=3, steps=40)
    plain, probed = PipelineSim(scenario, n=4), PipelineSim(scenario, n=4)
    plain.reset([5, 6, 7, 8])
    probed.reset([5, 6, 7, 8])
    rng = np.random.default_rng(1)
    while not plain.done:
        actions, other = rng.integers(len(SIM_ACTIONS), size=(2, 4))
        targets = rng.integers(plain.n_stages, size=4)
        twin = copy.deepcopy(probed)  # its random generator too
        (foretold,) = probed.counterfactual_rollout(other, targets)
        twin.step(other, targets)
        for field in ("slo_ok", "records_lost", "cost"):
            np.testing.assert_array_equal(
                getattr(foretold, field), getattr(twin.history[-1], field)
            )
        a, b = plain.step(actions, targets), probed.step(actions, targets)
        np.testing.assert_array_equal(a.stage, b.stage)
        np.testing.assert_array_equal(a.pipeline, b.pipeline)
    assert len(probed.history) == len(plain.history)
    for field in ("slo_ok", "records_lost", "cost"):
        np.testing.assert_array_equal(
            np.stack([getattr(h, field) for h in plain.history]),
            np.stack([getattr(h, field) for h in probed.history]),
        )


def test_a_counterfactual_rollout_foretells_the_steps_and_stops_at_the_episode_end():
    scenario = single_fault_scenario("node_failure", at=3, steps=12)
    sim = PipelineSim(scenario, n=3)
    sim.reset([1, 2, 3])
    observe = np.full(3, ACTION_ID["observe"])
    scale_out = np.full(3, ACTION_ID["scale_out"])
    targets = np.array([0, 1, 2])
    for _ in range(4):
        sim.step(observe, targets)
    twin, seen = copy.deepcopy(sim), len(sim.history)
    rng_before, t_before = copy.deepcopy(sim.rng.bit_generator.state), sim.t
    foretold = sim.counterfactual_rollout(scale_out, targets, steps=5)
    twin.step(scale_out, targets)
    for _ in range(4):
        twin.step(observe, targets)
    assert len(foretold) == 5 and len(sim.history) == seen
    for field in ("slo_ok", "records_lost", "cost"):
        np.testing.assert_array_equal(
            np.stack([getattr(h, field) for h in foretold]),
            np.stack([getattr(h, field) for h in twin.history[seen:]]),
        )
    # The rollout's replicas were put back; the twin kept its one replica more per pipeline.
    np.testing.assert_array_equal(twin.replicas - sim.replicas, np.eye(3, sim.n_stages))
    # 8 steps are left in the episode: a longer rollout ends with it.
    assert len(sim.counterfactual_rollout(scale_out, targets, steps=20)) == 8
    assert sim.t == t_before and sim.rng.bit_generator.state == rng_before
    with pytest.raises(ValueError, match="steps"):
        sim.counterfactual_rollout(scale_out, targets, steps=0)


def test_fault_schedule_depends_only_on_the_episode_seed():
    scenario = Scenario.model_validate({"name": "r", "random_faults": {"rate_per_hour": 6}})
    pair, alone = PipelineSim(scenario, n=2), PipelineSim(scenario, n=1)
    pair.reset([11, 12])
    alone.reset([12])
    k = int(alone.f_valid[0].sum())
    np.testing.assert_array_equal(pair.f_onset[1, :k], alone.f_onset[0, :k])
    np.testing.assert_array_equal(pair.f_type[1, :k], alone.f_type[0, :k])


def test_random_bursts_raise_each_pipelines_own_traffic_at_their_own_times():
    scenario = Scenario.model_validate(
        {
            "name": "b",
            "duration_steps": 120,
            "load": {"pattern": "flat"},
            "random_faults": {"rate_per_hour": 6},
            "random_bursts": {
                "rate_per_hour": 30,
                "factor": [2.0, 2.0],
                "duration_steps": [10, 10],
            },
        }
    )
    seeds = [1, 2, 3]
    sim = PipelineSim(scenario, n=3)
    sim.reset(seeds)
    # Each pipeline's bursts come from its own seed's generator, after its faults.
    expected_factor = np.ones((3, 120))
    for i, seed in enumerate(seeds):
        rng = np.random.default_rng(seed)
        draw_fault_schedule(scenario, rng)
        bursts = draw_bursts(scenario, rng)
        assert len(bursts) >= 1
        for burst in bursts:
            expected_factor[i, burst.at : burst.at + burst.duration] *= 2.0
    assert len({tuple(row) for row in sim.burst_start}) > 1
    for t in range(120):
        np.testing.assert_allclose(sim._traffic_factor(t), expected_factor[:, t])
    # A pipeline's bursts depend on its seed only, not on its neighbours.
    alone = PipelineSim(scenario, n=1)
    alone.reset([2])
    k = int((alone.burst_start[0] != NEVER).sum())
    np.testing.assert_array_equal(sim.burst_start[1, :k], alone.burst_start[0, :k])
    np.testing.assert_array_equal(sim.burst_end[1, :k], alone.burst_end[0, :k])


def test_healthy_pipeline_holds_its_slos_and_loses_only_background_errors():
    sim = PipelineSim(QUIET, n=4)
    sim.reset([0, 1, 2, 3])
    observe_all(sim)
    slo = np.stack([h.slo_ok for h in sim.history])
    assert slo.mean() > 0.99
    lost_per_step = np.mean([h.records_lost for h in sim.history[1:]])
    # 5 stages x ~10,000 records/step x 0.0005 background error rate = ~25 records per step.
    assert 15 < lost_per_step < 35


def test_restart_with_a_full_queue_drops_the_in_flight_records():
    scenario = single_fault_scenario("cpu_contention", at=1)
    sim = PipelineSim(scenario, n=1)
    sim.reset([3])
    for _ in range(15):
        sim.step(np.zeros(1, dtype=int), np.zeros(1, dtype=int))
    stage = scenario.topology.index(scenario.faults[0].stage)
    queued = sim.queue[0, stage]
    assert queued > 10_000
    sim.step(np.array([SIM_ACTIONS.index("restart_stage")]), np.array([stage]))
    assert sim.history[-1].records_lost[0] >= queued
    # While the stage restarts, only this step's arrivals (about 10,000 records) wait in its queue.
    assert sim.queue[0, stage] < 1.3 * scenario.load.base_rps * 10


def test_shown_only_hides_a_leak_until_its_memory_rises_out_of_the_noise():
    scenario = single_fault_scenario("memory_leak", at=1, severity=0.8, steps=40)
    stage = scenario.topology.index(scenario.faults[0].stage)
    sim = PipelineSim(scenario, n=1)
    sim.reset([0])
    while not sim.ground_truth().active.any():
        sim.step(np.zeros(1, dtype=int), np.zeros(1, dtype=int))
    assert sim.params.telemetry_noise == 0.1
    shown_at = 0.6107  # 50% x e^(2 x 0.1): the documented threshold at the default noise
    hidden_steps = 0
    while sim.ground_truth().active.any() and sim.mem[0, stage] < 0.9:
        shown = sim.ground_truth(shown_only=True).active[0, 0]
        assert shown == (sim.mem[0, stage] >= shown_at), (sim.t, sim.mem[0, stage])
        hidden_steps += not shown
        sim.step(np.zeros(1, dtype=int), np.zeros(1, dtype=int))
    # Severity 0.8 adds 1.6 points of memory a step, from the step it starts: 51.6%, ... 59.6%
    # are hidden, 61.2% is shown.
    assert hidden_steps == 6
    assert sim.ground_truth(shown_only=True).active[0, 0]
    # A restart puts memory back to healthy: while its cure is pending the leak is hidden again.
    sim.step(np.array([SIM_ACTIONS.index("restart_stage")]), np.array([stage]))
    assert sim.ground_truth().active[0, 0] and not sim.ground_truth(shown_only=True).active[0, 0]


def test_shown_only_leaves_other_faults_alone():
    sim = PipelineSim(single_fault_scenario("duplicate_burst", at=1), n=2)
    sim.reset([0, 1])
    for _ in range(5):
        sim.step(np.zeros(2, dtype=int), np.zeros(2, dtype=int))
        truth, shown = sim.ground_truth(), sim.ground_truth(shown_only=True)
        assert truth.active.any()
        assert (truth.active == shown.active).all()
