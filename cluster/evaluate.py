"""Evaluate policies on scenarios, in parallel as Ray tasks, and write a report.

Run it::

    python -m cluster.evaluate --policy runbook,oncall,oracle --scenarios configs/scenarios \\
        --episodes 10 --seed 0 --out reports/eval

(the same as ``pipemedic evaluate ...``). Each (policy, scenario) pair is one Ray task that
runs all its episodes in one vectorised simulator. The result is ``OUT/report.json`` (shape in
DESIGN.md), ``OUT/report.png`` and a table per policy on the terminal. Every policy meets the
same faults: episode seeds depend on the scenario and ``--seed`` only.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import ray

from agents.policy import make_policy
from agents.rollout import episode_seeds, rollout
from envs.errors import PipemedicError
from envs.metrics import EpisodeMetrics, paired_difference, summarise
from envs.params import SimParams
from envs.scenario import Scenario

log = logging.getLogger(__name__)


def check_pairs(compare: Sequence[tuple[str, str]], policies: Sequence[str]) -> None:
    """Each pair of ``compare`` names two different policies of ``policies``."""
    for a, b in compare:
        if a == b or a not in policies or b not in policies:
            raise PipemedicError(
                f"--compare {a}:{b} must name two different policies of --policy "
                f"({','.join(policies)})"
            )


@ray.remote(num_cpus=1)
def _evaluate_pair(
    policy_name: str, scenario: Scenario, seed: int, episodes: int, params: SimParams
) -> list[dict]:
    policy = make_policy(policy_name)
    seeds = episode_seeds(scenario, seed, episodes)
    return [m.to_dict() for m in rollout(policy, scenario, seeds, params=params)]


def evaluate(
    policies: Sequence[str],
    scenarios: Sequence[Scenario],
    *,
    episodes: int,
    seed: int,
    params: SimParams | None = None,
    compare: Sequence[tuple[str, str]] = (),
    on_progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Run every policy on every scenario; return the report as a dict (see DESIGN.md).

    Ray must be initialised (``cluster.ray_runtime.ensure_ray``). ``on_progress(done, total)``
    is called as tasks finish. For each pair ``(a, b)`` of ``compare`` the report's ``paired``
    holds ``a`` minus ``b`` with a 95% interval over the paired episodes
    (``envs.metrics.paired_difference``), under the key ``"a vs b"``.
    """
    if episodes < 1:
        raise ValueError(f"episodes must be at least 1, got {episodes}")
    for name in policies:
        make_policy(name)  # fail fast on an unknown name, before any task starts
    check_pairs(compare, policies)
    params = params or SimParams()
    params_ref = ray.put(params)
    pending = {
        _evaluate_pair.remote(p, s, seed, episodes, params_ref): (p, s.name)
        for p in policies
        for s in scenarios
    }
    results: dict[tuple[str, str], list[EpisodeMetrics]] = {}
    total = len(pending)
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            key = pending.pop(ref)
            results[key] = [EpisodeMetrics.from_dict(d) for d in ray.get(ref)]
        if on_progress:
            on_progress(total - len(pending), total)

    report: dict = {
        "policies": {},
        "episodes": episodes,
        "seed": seed,
        "scenarios": [s.name for s in scenarios],
    }
    for p in policies:
        report["policies"][p] = summarise({s.name: results[(p, s.name)] for s in scenarios})
    report["ranking_by_mttr"] = sorted(
        policies, key=lambda p: report["policies"][p]["overall"]["mttr_s"]
    )
    if compare:
        report["paired"] = {
            f"{a} vs {b}": paired_difference(
                {s.name: results[(a, s.name)] for s in scenarios},
                {s.name: results[(b, s.name)] for s in scenarios},
                seed=seed,
            )
            for a, b in compare
        }
    return report


def write_report(report: dict, out: Path) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.png`` into ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "report.json"
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(json_path)  # never leave a half-written report behind
    png_path = out / "report.png"
    plot_report(report, png_path)
    return json_path, png_path


def plot_report(report: dict, path: Path) -> None:
    """Grouped bars: MTTR per scenario and policy (log scale), and SLO adherence."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    policies = list(report["policies"])
    scenarios = report["scenarios"]
    x = np.arange(len(scenarios) + 1)
    width = 0.8 / max(len(policies), 1)
    fig, (ax_mttr, ax_slo) = plt.subplots(2, 1, figsize=(max(10, 0.7 * len(x)), 8), sharex=True)
    for i, p in enumerate(policies):
        rows = [report["policies"][p]["per_scenario"][s] for s in scenarios]
        rows.append(report["policies"][p]["overall"])
        ax_mttr.bar(x + i * width, [max(r["mttr_s"], 1.0) for r in rows], width, label=p)
        ax_slo.bar(x + i * width, [100 * r["slo_adherence"] for r in rows], width, label=p)
    ax_mttr.set_yscale("log")
    ax_mttr.set_ylabel("MTTR (s, log scale)")
    ax_mttr.legend()
    ax_slo.set_ylabel("SLO adherence (%)")
    ax_slo.set_ylim(0, 100)
    ax_slo.set_xticks(x + width * (len(policies) - 1) / 2)
    ax_slo.set_xticklabels([*scenarios, "OVERALL"], rotation=60, ha="right")
    fig.suptitle(
        f"Pipeline Medic evaluation: {report['episodes']} episodes per scenario, seed {report['seed']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    from cluster.cli import app

    sys.exit(app(["evaluate", *sys.argv[1:]]))
