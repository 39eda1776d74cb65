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
from typing import Any

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


def bench_training(
    config: str, *, runners: int, iterations: int = 6, kind: str = "hierarchical"
) -> dict[str, float]:
    """PPO training throughput with ``runners`` env runners: pipeline-steps per second of whole
    iterations (sampling + learning), the median over ``iterations`` after one warm-up
    iteration. No warm start, no evaluation: just RLlib's loop. (RLlib's own timers are moving
    averages that remember start-up, so only wall-clock iterations are reported.)"""
    from agents.inference import AGENTS_OF_KIND
    from agents.ppo_config import build_ppo_config, load_train_config
    from cluster.ray_runtime import ensure_ray

    cfg = load_train_config(config, kind=kind)
    cfg = cfg.model_copy(update={"ppo": cfg.ppo.model_copy(update={"env_runners": runners})})
    ensure_ray()
    algo = build_ppo_config(cfg).build_algo()
    top = AGENTS_OF_KIND[kind][0]
    whole = []
    try:
        before = 0
        for i in range(iterations + 1):
            t0 = time.perf_counter()
            result = algo.train()
            dt = time.perf_counter() - t0
            steps = int(result["env_runners"]["num_module_steps_sampled_lifetime"][top])
            if i > 0:  # the first iteration pays for start-up
                whole.append((steps - before) / dt)
            before = steps
    finally:
        algo.stop()
    return {
        "runners": runners,
        "pipelines_per_env": cfg.env.pipelines,
        "envs_per_runner": cfg.ppo.envs_per_runner,
        "median_iteration_steps_per_s": statistics.median(whole),
        "min_iteration_steps_per_s": min(whole),
        "max_iteration_steps_per_s": max(whole),
    }


def bench_labels(
    config: str,
    *,
    kind: str = "hierarchical",
    overrides: dict[str, Any] | None = None,
    steps: int = 40_000,
    seed: int = 1,
) -> list[Any]:
    """The label balance of a warm start's first round (the teacher acting, ``steps`` pipeline
    steps of ``config``'s training mix) per role: how many labels, the share that say
    ``observe``, and the weight the loss gives acting labels against observe ones
    (``agents.warm_start.LabelBalance``)."""
    from agents.ppo_config import load_train_config
    from agents.warm_start import LabelBalance, collect

    cfg = load_train_config(config, kind=kind)
    ws = _warm_start_settings(cfg, config, overrides)
    samples, _ = collect(
        cfg.env_config(),
        None,
        steps=steps,
        teacher_share=1.0,
        pipelines=ws.pipelines,
        seed=seed,
        observe_keep=ws.specialist_observe_keep,
        teacher=ws.teacher,
        teacher_waits=ws.teacher_waits,
        specialists_wait=ws.specialists_wait,
    )
    return [LabelBalance.of(role, s.label, ws) for role, s in sorted(samples.items()) if s.label]


def _warm_start_settings(cfg, config: str, overrides: dict[str, Any] | None):
    """``cfg``'s warm-start settings with ``overrides`` (``--set``), validated."""
    from agents.warm_start import WarmStartConfig
    from envs.config_files import validated

    return validated(
        WarmStartConfig,
        {**cfg.warm_start.model_dump(), **(overrides or {})},
        where=f"{config}: warm_start (with --set)",
    )


def bench_imitation(
    config: str,
    *,
    kind: str = "hierarchical",
    overrides: dict[str, Any] | None = None,
    save: str | None = None,
    episodes: int | None = None,
) -> dict[str, Any]:
    """The warm start alone (no Ray, no PPO): imitate the teacher with ``warm_start`` settings
    from ``config`` (with ``overrides``), then score the student like a training review does:
    validation score and held-out metrics, overall, per scenario and per fault type
    (``episodes`` per held-out scenario; default the config's ``eval_episodes``, which also
    sets the validation set's size either way). With ``save`` the student
    is also written to ``save/policy`` as a policy bundle (``LearnedPolicy.load`` reads it;
    ``pipemedic checkpoints import`` publishes it)."""
    import tempfile
    import time
    from pathlib import Path

    from agents.inference import export_bundle
    from agents.ppo_config import load_train_config
    from cluster.cli_output import console
    from cluster.train import evaluate_bundle, imitate, initial_nets, review_seed, validation_score

    cfg = load_train_config(config, kind=kind)
    episodes = episodes or cfg.eval_episodes
    ws = _warm_start_settings(cfg, config, overrides)
    nets = initial_nets(cfg)  # what training's warm start begins from, too
    t0 = time.perf_counter()
    steps = imitate(nets, cfg, ws, console)
    seconds = time.perf_counter() - t0
    console.print(f"scoring the student: validation set, then {episodes} held-out episodes each")
    with tempfile.TemporaryDirectory(prefix="pipemedic-imitation-") as tmp:
        info = {"pipeline_steps": steps, "warm_start": ws.model_dump()}
        bundle = export_bundle(Path(save or tmp) / "policy", cfg.kind, nets, info)
        score = validation_score(bundle, cfg)
        held_out = evaluate_bundle(bundle, cfg, episodes)
    return {
        "warm_start": ws.model_dump(),
        "seconds": seconds,
        "pipeline_steps": steps,
        "validation_score": score,
        "eval_episodes": episodes,
        "eval_seed": review_seed(cfg),
        **held_out,
    }
