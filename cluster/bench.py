"""Benchmarks that print figures: ``pipemedic bench sim``.

The simulator benchmark steps ``pipelines`` pipelines of a one-hour episode shaped like
``schema-drift-under-surge`` (two scheduled faults, a traffic burst, random faults on top) with
uniformly random actions (the load training puts on it), in this one process, and reports
pipeline-steps per second: the median over ``repeats`` runs (a reset between runs, not timed),
and the spread.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from envs.catalogue import SIM_ACTIONS
from envs.scenario import Scenario
from envs.simulator import PipelineSim

BENCH_SCENARIO = Scenario.model_validate(
    {
        "name": "bench",
        "duration_steps": 360,
        "load": {"bursts": [{"at": 60, "factor": 2.0, "duration": 30}]},
        "faults": [
            {"type": "schema_drift", "stage": "transform", "at": 30, "severity": 0.8},
            {"type": "cpu_contention", "stage": "ingest", "at": 45, "severity": 0.6},
        ],
        "random_faults": {"rate_per_hour": 2.0},
    }
)


def bench_simulator(*, pipelines: int, steps: int, repeats: int, seed: int = 0) -> dict:
    """Pipeline-steps per second of ``PipelineSim`` with ``pipelines`` pipelines batched."""
    if steps > BENCH_SCENARIO.duration_steps:
        raise ValueError(f"steps must be at most {BENCH_SCENARIO.duration_steps} (one episode)")
    rates = []
    rng = np.random.default_rng(seed)
    sim = PipelineSim(BENCH_SCENARIO, n=pipelines)
    for r in range(repeats):
        sim.reset([seed * 1000 + r * pipelines + i for i in range(pipelines)])
        actions = rng.integers(len(SIM_ACTIONS), size=(steps, pipelines))
        targets = rng.integers(sim.n_stages, size=(steps, pipelines))
        start = time.perf_counter()
        for k in range(steps):
            sim.step(actions[k], targets[k])
        rates.append(pipelines * steps / (time.perf_counter() - start))
    return {
        "pipelines": pipelines,
        "steps": steps,
        "repeats": repeats,
        "median_steps_per_s": statistics.median(rates),
        "min_steps_per_s": min(rates),
        "max_steps_per_s": max(rates),
    }
