"""The ``pipemedic`` command line.

    pipemedic train --config configs/train.yaml          (same as python -m cluster.train)
    pipemedic evaluate --policy hierarchical,flat,runbook,oncall,oracle --held-out --out reports/eval
    pipemedic scenarios check configs/scenarios
    pipemedic bench sim | train | store | imitation | leak | waits
    pipemedic checkpoints list | show | promote | rollback | promoted
    pipemedic experience record | stats | compact | vacuum
    pipemedic cluster render | apply | status | delete   (KubeRay)
    pipemedic serve [--host --port]                       (the decision endpoint on Ray Serve)
    pipemedic bench serve
    pipemedic demo

A user mistake (bad scenario, unknown policy, ...) prints one line naming the problem and exits
with status 2; no traceback.
"""

from __future__ import annotations

import logging
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cluster.cli_output import console, err_console, fail
from cluster.cluster_cli import cluster_app
from cluster.store_cli import checkpoints_app, experience_app, fmt_optional
from envs.errors import PipemedicError

if TYPE_CHECKING:
    from agents.inference import LearnedPolicy

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Pipeline Medic: self-healing for data and ML pipelines.",
)
scenarios_app = typer.Typer(no_args_is_help=True, help="Scenario files.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that print figures.")
app.add_typer(scenarios_app, name="scenarios")
app.add_typer(bench_app, name="bench")
app.add_typer(checkpoints_app, name="checkpoints")
app.add_typer(experience_app, name="experience")
app.add_typer(cluster_app, name="cluster")

DEFAULT_POLICIES = "runbook,oncall,oracle"
DEMO_POLICIES = "hierarchical,flat,runbook,oncall,oracle"


@app.command()
def evaluate(
    policy: Annotated[str, typer.Option(help="Comma-separated policy names.")] = DEFAULT_POLICIES,
    scenarios: Annotated[Path, typer.Option(help="A scenario file or a folder of them.")] = Path(
        "configs/scenarios"
    ),
    episodes: Annotated[int, typer.Option(min=1, help="Episodes per scenario and policy.")] = 10,
    seed: Annotated[int, typer.Option(help="Evaluation seed (same faults for every policy).")] = 0,
    out: Annotated[Path, typer.Option(help="Folder for report.json and report.png.")] = Path(
        "reports/eval"
    ),
    sim_config: Annotated[Path | None, typer.Option(help="Simulator parameters YAML.")] = Path(
        "configs/simulator.yaml"
    ),
    per_scenario: Annotated[bool, typer.Option(help="Print per-scenario rows too.")] = True,
    per_fault: Annotated[
        bool,
        typer.Option(help="Also print MTTR and TTFCA per fault type, every policy side by side."),
    ] = False,
    held_out: Annotated[
        bool, typer.Option(help="Use the held-out scenarios of --train-config instead.")
    ] = False,
    train_config: Annotated[
        Path, typer.Option(help="Training config naming the held-out set.")
    ] = Path("configs/train.yaml"),
    compare: Annotated[
        list[str] | None,
        typer.Option(
            help="A:B (repeatable): A minus B with a 95% interval over the paired episodes. "
            "Default: hierarchical against flat and runbook, where they are evaluated."
        ),
    ] = None,
) -> None:
    """Evaluate policies on scenarios (Ray tasks in parallel) and write a report.

    ``hierarchical`` and ``flat`` are the promoted versions in the checkpoints table (train
    first)."""
    try:
        run_evaluation(
            compare=None if compare is None else [_pair(c) for c in compare],
            policies=[p.strip() for p in policy.split(",") if p.strip()],
            scenarios_path=_held_out_files(train_config) if held_out else scenarios,
            episodes=episodes,
            seed=seed,
            out=out,
            sim_config=sim_config,
            per_scenario=per_scenario,
            per_fault=per_fault,
        )
    except PipemedicError as exc:
        fail(exc)


def _pair(text: str) -> tuple[str, str]:
    """``A:B`` of ``--compare``; either side may be a stored version, ``KIND:vN``."""
    match = re.fullmatch(r"\s*([\w-]+(?::v\d+)?)\s*:\s*([\w-]+(?::v\d+)?)\s*", text)
    if match is None:
        raise PipemedicError(
            f"--compare {text!r}: expected A:B, two policy names (each may be KIND:vN)"
        )
    return match.group(1), match.group(2)


def default_pairs(policies: list[str]) -> list[tuple[str, str]]:
    """``hierarchical`` against ``flat`` and ``runbook``, those of them that are evaluated."""
    if "hierarchical" not in policies:
        return []
    return [("hierarchical", b) for b in ("flat", "runbook") if b in policies]


def _held_out_files(train_config: Path) -> list[Path]:
    from agents.ppo_config import load_train_config

    return [Path(p) for p in load_train_config(train_config).held_out]


def run_evaluation(
    *,
    policies: list[str],
    scenarios_path: Path | list[Path],
    episodes: int,
    seed: int,
    out: Path,
    sim_config: Path | None,
    per_scenario: bool,
    per_fault: bool = False,
    compare: list[tuple[str, str]] | None = None,
) -> dict:
    from agents.policy import make_policy
    from cluster.evaluate import check_pairs, write_report
    from cluster.evaluate import evaluate as run
    from cluster.ray_runtime import ensure_ray
    from envs.params import load_sim_params
    from envs.scenario import load_scenario, load_scenarios

    if not policies:
        raise PipemedicError("--policy names no policy")
    for name in policies:
        make_policy(name)
    compare = default_pairs(policies) if compare is None else compare
    check_pairs(compare, policies)  # before Ray starts
    if isinstance(scenarios_path, list):
        scenario_list = [load_scenario(p) for p in scenarios_path]
    else:
        scenario_list = load_scenarios(scenarios_path)
    params = load_sim_params(sim_config if sim_config and sim_config.exists() else None)
    started = time.perf_counter()
    console.print(
        f"Evaluating {', '.join(policies)} on {len(scenario_list)} scenarios x {episodes} episodes (seed {seed})"
    )
    ensure_ray()
    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task(
            "policy x scenario tasks", total=len(policies) * len(scenario_list)
        )
        report = run(
            policies,
            scenario_list,
            episodes=episodes,
            seed=seed,
            params=params,
            compare=compare,
            on_progress=lambda done, total: progress.update(task, completed=done),
        )
    report["wall_time_s"] = round(time.perf_counter() - started, 1)
    json_path, png_path = write_report(report, out)
    print_report(report, per_scenario=per_scenario)
    if per_fault:
        print_per_fault(report)
    if report.get("paired"):
        print_paired(report)
    console.print(f"Ranking by MTTR (best first): {' < '.join(report['ranking_by_mttr'])}")
    console.print(f"Wrote {json_path} and {png_path} in {report['wall_time_s']} s")
    return report


def print_paired(report: dict) -> None:
    """One row per compared pair: A minus B with its 95% interval, per metric."""
    table = Table(
        title="Paired differences (A minus B, same episodes; 95% bootstrap interval)",
        title_justify="left",
    )
    table.add_column("A vs B")
    formats = {
        "mttr_s": ("MTTR s", "{:+.1f}", 1.0),
        "slo_adherence": ("SLO adherence, points", "{:+.2f}", 100.0),
        "records_lost": ("records lost / episode", "{:+,.0f}", 1.0),
        "cost": ("cost / episode", "{:+.1f}", 1.0),
    }
    for title, _, _ in formats.values():
        table.add_column(title, justify="right")
    for pair, figures in report["paired"].items():
        cells = []
        for metric, (_, fmt, scale) in formats.items():
            f = figures[metric]
            low, high = (fmt.format(scale * f[k]) for k in ("ci95_low", "ci95_high"))
            cells.append(f"{fmt.format(scale * f['difference'])} [{low}, {high}]")
        table.add_row(pair, *cells)
    console.print(table)


def print_per_fault(report: dict) -> None:
    """One row per fault type, one column per policy: "MTTR s (TTFCA s)", and the share of
    those incidents left unresolved where there are any."""
    policies = report["policies"]
    # Every policy meets the same faults, so the first policy's fault types and counts hold
    # for all.
    first = next(iter(policies.values()))["per_fault"]
    table = Table(
        title="Per fault type, all scenarios: MTTR s (TTFCA s), unresolved share if any",
        title_justify="left",
    )
    table.add_column("fault")
    table.add_column("incidents", justify="right")
    for policy in policies:
        table.add_column(policy, justify="right")
    for fault, figures in first.items():
        cells = []
        for result in policies.values():
            m = result["per_fault"][fault]
            cell = f"{m['mttr_s']:.0f} ({m['ttfca_s']:.0f})"
            if m["unresolved_pct"] > 0:
                cell += f" {m['unresolved_pct']:.0f}% open"
            cells.append(cell)
        table.add_row(fault, f"{figures['incidents']:,}", *cells)
    console.print(table)


def print_report(report: dict, *, per_scenario: bool) -> None:
    columns = [
        ("MTTR s", "mttr_s", "{:.0f}"),
        ("unresolved %", "unresolved_pct", "{:.1f}"),
        ("SLO adherence", "slo_adherence", "{:.1%}"),
        ("records lost", "records_lost", "{:,.0f}"),
        ("cost", "cost", "{:.1f}"),
        ("escalations", "escalations", "{:.2f}"),
        ("TTFCA s", "ttfca_s", "{:.0f}"),
    ]
    if not per_scenario:
        table = Table(title="All scenarios, per policy", title_justify="left")
        table.add_column("policy")
        for title, _, _ in columns:
            table.add_column(title, justify="right")
        for policy, result in report["policies"].items():
            table.add_row(policy, *(fmt.format(result["overall"][key]) for _, key, fmt in columns))
        console.print(table)
        return
    for policy, result in report["policies"].items():
        table = Table(title=f"{policy}", title_justify="left")
        table.add_column("scenario")
        for title, _, _ in columns:
            table.add_column(title, justify="right")
        for name, metrics in [*result["per_scenario"].items(), ("OVERALL", result["overall"])]:
            table.add_row(
                name,
                *(fmt.format(metrics[key]) for _, key, fmt in columns),
                style="bold" if name == "OVERALL" else None,
            )
        console.print(table)


@scenarios_app.command("check")
def scenarios_check(
    path: Annotated[Path, typer.Argument(help="A scenario file or folder.")] = Path(
        "configs/scenarios"
    ),
) -> None:
    """Validate scenario files and list what they inject."""
    from envs.scenario import load_scenarios

    try:
        scenarios = load_scenarios(path)
    except PipemedicError as exc:
        fail(exc)
    table = Table(title=f"{len(scenarios)} valid scenarios in {path}", title_justify="left")
    for col in ("name", "steps", "faults", "random faults/h", "bursts", "random bursts/h"):
        table.add_column(col)
    for s in scenarios:
        faults = ", ".join(f"{f.type}@{f.stage}:{f.at}" for f in s.faults) or "-"
        rate = s.random_faults.rate_per_hour if s.random_faults else 0
        bursts = ", ".join(f"{b.factor:g}x@{b.at}+{b.duration}" for b in s.load.bursts) or "-"
        burst_rate = s.random_bursts.rate_per_hour if s.random_bursts else 0
        table.add_row(s.name, str(s.duration_steps), faults, f"{rate:g}", bursts, f"{burst_rate:g}")
    console.print(table)


@bench_app.command("sim")
def bench_sim(
    pipelines: Annotated[
        list[int] | None, typer.Option(help="Batch sizes to measure (repeatable).")
    ] = None,
    steps: Annotated[int, typer.Option(min=1)] = 300,
    repeats: Annotated[int, typer.Option(min=1)] = 5,
) -> None:
    """Simulator speed in pipeline-steps/s, on one core (this process)."""
    from cluster.bench import bench_simulator

    table = Table(title="Simulator speed (one process, random actions)", title_justify="left")
    for col in ("pipelines batched", "steps", "median steps/s", "min", "max"):
        table.add_column(col, justify="right")
    for n in pipelines or [1, 16, 256]:
        r = bench_simulator(pipelines=n, steps=steps, repeats=repeats)
        table.add_row(
            str(n),
            str(steps),
            f"{r['median_steps_per_s']:,.0f}",
            f"{r['min_steps_per_s']:,.0f}",
            f"{r['max_steps_per_s']:,.0f}",
        )
    console.print(table)


@bench_app.command("store")
def bench_store(
    batch_rows: Annotated[int, typer.Option(min=100, help="Transitions per append.")] = 50_000,
    repeats: Annotated[int, typer.Option(min=1)] = 5,
    processes: Annotated[int, typer.Option(min=1, help="Writers appending at once.")] = 2,
) -> None:
    """Experience append rate (one writer; several at once) and promoted-checkpoint load time."""
    from cluster.bench_store import bench_append, bench_checkpoint_load

    a = bench_append(batch_rows=batch_rows, repeats=repeats, processes=processes)
    table = Table(title="Experience appends (real oracle transitions)", title_justify="left")
    for col in ("writers", "batch", "transitions/s (median)", "min – max"):
        table.add_column(col, justify="right")
    table.add_row(
        f"1 ({a['files_per_partition']} files encoded at once)",
        f"{a['batch_rows']:,}",
        f"{a['one_writer_median_rows_per_s']:,.0f}",
        f"{a['one_writer_min_rows_per_s']:,.0f} – {a['one_writer_max_rows_per_s']:,.0f}",
    )
    table.add_row(
        "1 (one file: pyarrow on one core)",
        f"{a['batch_rows']:,}",
        f"{a['one_file_median_rows_per_s']:,.0f}",
        "-",
    )
    for label in ("tuned", "defaults"):
        table.add_row(
            f"1, delta-rs writer, {label} settings",
            f"{a['batch_rows']:,}",
            f"{a[f'delta_rs_{label}_median_rows_per_s']:,.0f}",
            "-",
        )
    table.add_row(
        f"{a['processes']} processes",
        f"{a['batch_rows']:,}",
        f"{a['parallel_rows_per_s']:,.0f}",
        "-",
    )
    console.print(table)
    console.print(f"({a['bytes_per_row_in_memory']:,} bytes per transition in Arrow)")
    c = bench_checkpoint_load()
    console.print(
        f"Promoted checkpoint load ({c['versions']} versions stored, "
        f"{c['weights_bytes'] / 1e6:.2f} MB of weights): median {c['median_s'] * 1000:.0f} ms, "
        f"max {c['max_s'] * 1000:.0f} ms; first load in a fresh process "
        f"{c['fresh_process_s'] * 1000:.0f} ms"
    )


@bench_app.command("serve")
def bench_serve_cmd(
    seconds: Annotated[int, typer.Option(min=1, help="Length of each wrk run (s).")] = 5,
    variant: Annotated[
        list[str] | None,
        typer.Option(
            help="Ray Serve settings to measure, by name (repeatable; default all; a wrong "
            "name lists them; they are SERVE_VARIANTS in serve/bench.py)."
        ),
    ] = None,
    rounds: Annotated[
        int,
        typer.Option(
            min=1, help="Measure the Serve variants this many times in turn; shows medians."
        ),
    ] = 1,
) -> None:
    """Decision latency and throughput: in process, plain uvicorn, Ray Serve (proxy, direct
    ingress, HAProxy ingress) under each Serve setting compared, side by side in one run
    (needs wrk: `make bench-serve` installs it)."""
    from serve.bench import BATCH, SERVE_VARIANTS, bench_serve

    try:
        r = bench_serve(seconds=seconds, variants=variant, rounds=rounds)
    except PipemedicError as exc:
        fail(exc)
    ip = r["in_process"]
    console.print(f"Policy {ip['policy']} from {r['store']}")
    console.print(
        f"In process: decide p50 {ip['decide'][0]:.3f} ms, p99 {ip['decide'][1]:.3f} ms; "
        f"with JSON parse + serialise p50 {ip['decide_json'][0]:.3f} ms, p99 "
        f"{ip['decide_json'][1]:.3f} ms; batch of {BATCH}: "
        f"{ip['batch_decisions_per_s']:,.0f} decisions/s"
    )
    title = "HTTP (wrk, keep-alive)"
    if rounds > 1:
        title += f": Ray Serve rows are medians of {rounds} rounds (lowest-highest)"
    table = Table(title=title, title_justify="left")
    for col in (
        "target",
        "c=1 p50 ms",
        "c=1 p99 ms",
        "c=1 req/s",
        "c=16 p50 ms",
        "c=16 p99 ms",
        "c=16 req/s",
        f"batch ({BATCH}) decisions/s",
        "failed (all rounds)",
    ):
        table.add_column(col, justify="right")
    rows = {"plain uvicorn": [r["uvicorn"]] if r.get("uvicorn") else []}
    for name, (env, _) in SERVE_VARIANTS.items():
        runs = r.get(f"serve:{name}", [])
        front = "HAProxy" if "RAY_SERVE_ENABLE_HA_PROXY" in env else "proxy"
        rows[f"Ray Serve ({name}), {front}"] = [x["proxy"] for x in runs if x.get("proxy")]
        rows[f"Ray Serve ({name}), direct ingress"] = [x["direct"] for x in runs if x.get("direct")]
    for name, runs in rows.items():
        if not runs:
            continue

        def cell(load: str, key: str, fmt: str = ".2f", runs=runs) -> str:
            values = sorted(x[load][key] for x in runs)
            text = format(statistics.median(values), fmt)
            return text if len(values) == 1 else f"{text} ({values[0]:{fmt}}-{values[-1]:{fmt}})"

        table.add_row(
            name,
            cell("c1", "p50_ms"),
            cell("c1", "p99_ms"),
            cell("c1", "rps", ",.0f"),
            cell("c16", "p50_ms"),
            cell("c16", "p99_ms"),
            cell("c16", "rps", ",.0f"),
            cell("batch", "decisions_per_s", ",.0f"),
            str(sum(x[load]["failed"] for x in runs for load in ("c1", "c16", "batch"))),
        )
    console.print(table)


@bench_app.command("warm-start")
def bench_warm_start_cmd(
    config: Annotated[Path, typer.Option(help="Training config.")] = Path("configs/train.yaml"),
    kind: Annotated[str, typer.Option(help="hierarchical or flat")] = "hierarchical",
    reference: Annotated[
        str, typer.Option(help="cold (PPO from scratch) or dagger (live warm start).")
    ] = "cold",
    cold_lr: Annotated[float, typer.Option(help="PPO learning rate of the cold run.")] = 3e-4,
    record_steps: Annotated[
        int | None, typer.Option(min=1000, help="Default: the warm start's simulated steps.")
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Override the config's seed (both runs).")
    ] = None,
) -> None:
    """Training time saved by pre-training from stored experience, to the reference run's best
    validation score (two full trainings, one after the other)."""
    import json

    from cluster.bench_store import bench_warm_start

    if reference not in ("cold", "dagger"):
        fail(PipemedicError(f"--reference must be cold or dagger, got {reference!r}"))
    try:
        r = bench_warm_start(
            str(config),
            kind=kind,
            reference=reference,
            cold_lr=cold_lr,
            record_steps=record_steps,
            seed=seed,
        )
    except PipemedicError as exc:
        fail(exc)
    table = Table(
        title=f"Time to validation score {r['target_validation_score']:.2f} ({config}, {kind})",
        title_justify="left",
    )
    for col in (
        "warm start",
        "warm-start phase s",
        "reached target s",
        "at pipeline steps",
        "run total s",
        "best validation",
        "held-out MTTR s / SLO at best",
    ):
        table.add_column(col, justify="right")
    for name in (reference, "experience"):
        f = r[name]
        held = f["best_held_out"]
        table.add_row(
            name,
            fmt_optional(f["warm_start_s"], "{:.0f}"),
            fmt_optional(f["reached_target_s"], "{:.0f}"),
            fmt_optional(f["reached_at_pipeline_steps"], "{:,}"),
            f"{f['total_s']:.0f}",
            f"{f['best_validation']:.2f}",
            f"{fmt_optional(held.get('mttr_s'), '{:.0f}')} / {fmt_optional(held.get('slo_adherence'), '{:.1%}')}",
        )
    console.print(table)
    for name in (reference, "experience"):
        within = "  ".join(
            f"<= {k} best: {fmt_optional(v, '{:.0f}')} s"
            for k, v in r[name]["reached_within_s"].items()
        )
        console.print(f"{name}: first review {within}")
    console.print(
        f"Recording {r['record_steps']:,} pipeline steps of {r['teacher']} experience took "
        f"{r['record_s']:.0f} s (paid once; any later run reuses it)."
    )
    console.print(json.dumps(r, default=str))


@app.command()
def train(
    config: Annotated[Path, typer.Option(help="Training config (YAML).")] = Path(
        "configs/train.yaml"
    ),
    kind: Annotated[str | None, typer.Option(help="Override: hierarchical or flat.")] = None,
    out: Annotated[Path | None, typer.Option(help="Run folder (default STORE/runs/KIND).")] = None,
    fresh: Annotated[bool, typer.Option(help="Ignore checkpoints in --out, start over.")] = False,
    iterations: Annotated[int | None, typer.Option(min=1, help="Stop after this many.")] = None,
    env_runners: Annotated[
        int | None,
        typer.Option(min=0, help="Override ppo.env_runners (a cluster sizes this to its CPUs)."),
    ] = None,
    promote: Annotated[
        bool, typer.Option(help="Promote the selected version in the checkpoints table.")
    ] = True,
) -> None:
    """Train with RLlib PPO (resumes from the latest checkpoint); same as python -m cluster.train."""
    from cluster.train import train_from_options

    try:
        cfg, summary = train_from_options(
            config,
            kind=kind,
            out=out,
            fresh=fresh,
            iterations=iterations,
            env_runners=env_runners,
            promote=promote,
            console=err_console,
        )
    except PipemedicError as exc:
        fail(exc)
    console.print(
        f"Trained {cfg.kind}: {summary['pipeline_steps']:,} pipeline steps in "
        f"{summary['train_seconds']:.0f} s; policy at {summary.get('promoted', summary['bundle'])}"
    )


def warm_start_overrides(items: list[str] | None) -> dict[str, object]:
    """``--set KEY=VALUE`` options (YAML values) as a dict; a malformed one fails the command."""
    import yaml

    overrides = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            fail(PipemedicError(f"--set takes KEY=VALUE, got {item!r}"))
        try:
            overrides[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            fail(PipemedicError(f"--set {key.strip()}: the value is not YAML ({exc})"))
    return overrides


SET_OPTION = typer.Option(
    "--set", help="Override a warm_start setting, KEY=VALUE (YAML value; repeatable)."
)


@bench_app.command("imitation")
def bench_imitation_cmd(
    config: Annotated[Path, typer.Option(help="Training config.")] = Path("configs/train.yaml"),
    kind: Annotated[str, typer.Option(help="hierarchical or flat")] = "hierarchical",
    set_: Annotated[list[str] | None, SET_OPTION] = None,
    save: Annotated[
        Path | None, typer.Option(help="Also write the student as a policy bundle: SAVE/policy.")
    ] = None,
    episodes: Annotated[
        int | None,
        typer.Option(min=1, help="Held-out episodes per scenario (default: eval_episodes)."),
    ] = None,
) -> None:
    """The warm start alone, no PPO: imitate the teacher, then the validation score and the
    held-out metrics a training review would log, overall, per scenario and per fault type."""
    from cluster.bench import bench_imitation

    try:
        r = bench_imitation(
            str(config),
            kind=kind,
            overrides=warm_start_overrides(set_),
            save=str(save) if save else None,
            episodes=episodes,
        )
    except PipemedicError as exc:
        fail(exc)
    console.print(
        f"warm start {r['seconds']:.0f} s, {r['pipeline_steps']:,} pipeline steps; "
        f"validation score {r['validation_score']:.2f} (lower is better)"
    )
    if save:
        console.print(f"student written to {save / 'policy'}")
    if not r["per_scenario"]:
        console.print(f"{config} lists no held_out scenarios: no held-out figures")
        return
    console.print(
        f"Held-out, {r['eval_episodes']} episodes per scenario, episode seed {r['eval_seed']} "
        f"(training's reviews; `pipemedic evaluate --seed {r['eval_seed']}` meets the same)"
    )
    report = {"policies": {"student": r}}
    print_report(report, per_scenario=True)
    print_per_fault(report)


@bench_app.command("labels")
def bench_labels_cmd(
    config: Annotated[Path, typer.Option(help="Training config.")] = Path("configs/train.yaml"),
    kind: Annotated[str, typer.Option(help="hierarchical or flat")] = "hierarchical",
    set_: Annotated[list[str] | None, SET_OPTION] = None,
    steps: Annotated[int, typer.Option(min=1, help="Simulated pipeline steps.")] = 40_000,
    seed: Annotated[int, typer.Option()] = 1,
) -> None:
    """The warm start's label balance per role, on its first round's data (the teacher
    acting): labels, the share that say observe, and the weight the imitation loss gives the
    acting labels against the observe ones."""
    from cluster.bench import bench_labels

    try:
        rows = bench_labels(
            str(config), kind=kind, overrides=warm_start_overrides(set_), steps=steps, seed=seed
        )
    except PipemedicError as exc:
        fail(exc)
    table = Table(
        title=f"Warm-start labels, {kind}, first round ({config}, {steps:,} pipeline steps)",
        title_justify="left",
    )
    for column in ("role", "samples", "labels", "observe share", "weight / observe label"):
        table.add_column(column, justify="left" if column == "role" else "right")
    table.add_column("acting : observe weight", justify="right")
    for r in rows:
        table.add_row(
            r.role,
            f"{r.samples:,}",
            str(r.labels),
            f"{r.observe_share:.1%}",
            f"{r.observe_weight:.3f}",
            f"{r.acting_to_observe:.2f}",
        )
    console.print(table)
    console.print(
        "A label weighs (samples / labels) / its own count, capped at max_class_weight; "
        "observe labels weigh observe_weight instead where it names the role."
    )


def stored_policies(spec: str) -> list[LearnedPolicy]:
    """``--policy`` of the bench commands: comma-separated ``KIND`` (the promoted version) or
    ``KIND:vN`` (a stored one), learned kinds only."""
    from agents.inference import AGENTS_OF_KIND, LearnedPolicy

    names = [p.strip() for p in spec.split(",") if p.strip()]
    if not names:
        raise PipemedicError("--policy names no policy")
    wanted = []
    for name in names:  # every name checked before anything is loaded
        kind, colon, version = name.partition(":")
        if kind not in AGENTS_OF_KIND or (colon and not version.removeprefix("v").isdigit()):
            raise PipemedicError(
                f"--policy takes learned kinds, KIND or KIND:vN with KIND in "
                f"{sorted(AGENTS_OF_KIND)}, got {name!r}"
            )
        wanted.append((kind, int(version.removeprefix("v")) if colon else None))
    return [LearnedPolicy.from_store(kind, version=number) for kind, number in wanted]


STORED_POLICY_OPTION = typer.Option(
    "--policy", help="Comma-separated learned kinds, each KIND (its promoted version) or KIND:vN."
)


@bench_app.command("leak")
def bench_leak_cmd(
    policy: Annotated[str, STORED_POLICY_OPTION] = "hierarchical,flat",
    scenario: Annotated[
        Path, typer.Option(help="A scenario with one memory leak and nothing else.")
    ] = Path("configs/scenarios/memory-leak.yaml"),
    episodes: Annotated[int, typer.Option(min=1)] = 64,
    seed: Annotated[int, typer.Option()] = 0,
    sim_config: Annotated[Path, typer.Option(help="Simulator parameters YAML.")] = Path(
        "configs/simulator.yaml"
    ),
) -> None:
    """How ready each learned policy is to restart a leaking stage, by its true memory, on
    the same observe-only episodes (cluster/leak_probe.py)."""
    from cluster.leak_probe import leak_readiness
    from envs.params import load_sim_params
    from envs.scenario import load_scenario

    try:
        policies = stored_policies(policy)
        bins = leak_readiness(
            policies,
            load_scenario(scenario),
            episodes=episodes,
            seed=seed,
            params=load_sim_params(sim_config),
        )
    except PipemedicError as exc:
        fail(exc)
    table = Table(
        title=f"Readiness to cure a lone memory leak ({scenario}, {episodes} observe-only "
        "episodes): P(act) / P(cure) / greedy cures",
        title_justify="left",
    )
    table.add_column("true memory")
    table.add_column("steps", justify="right")
    for p in policies:
        table.add_column(p.version, justify="right")
    for b in bins:
        if not b.steps:
            continue
        cells = [" / ".join(f"{x:.2f}" for x in b.mean(p.name)) for p in policies]
        table.add_row(f"{b.low:.0%}-{min(b.high, 1.0):.0%}", f"{b.steps:,}", *cells)
    console.print(table)
    console.print(
        "Telemetry shows a leak from about 61% true memory. P(cure): the probability that the "
        "policy, sampled, restarts the leaking stage (hierarchical: master x infra specialist)."
    )


@bench_app.command("penalty")
def bench_penalty_cmd(
    policy: Annotated[
        str,
        typer.Option(
            "--policy",
            help="Comma-separated policies: learned kinds, each KIND (its promoted version) or "
            "KIND:vN, and baselines by name (runbook, oracle_capacity, ...).",
        ),
    ] = "hierarchical,flat",
    config: Annotated[
        Path, typer.Option(help="Training config: its scenario sets and reward weights.")
    ] = Path("configs/train.yaml"),
    on: Annotated[
        str, typer.Option(help="validation (what training chooses by) or held-out.")
    ] = "validation",
    episodes: Annotated[
        int, typer.Option(min=1, help="held-out: episodes per scenario (validation: the config's).")
    ] = 50,
    seed: Annotated[int, typer.Option(help="held-out: the episode seed, as in evaluate.")] = 0,
    greedy: Annotated[
        bool,
        typer.Option(
            "--greedy",
            help="Also score each version's weights greedy, without its raised hand, act "
            "threshold or delegation gate: what its decision rule adds or costs.",
        ),
    ] = False,
) -> None:
    """The training objective's penalty of each version (or baseline), with its own decision
    rule, split per scenario and per term, and its actions while no fault was open: on the
    validation set (the validation score) or on the held-out scenarios (for reporting only)."""
    from agents.inference import LearnedPolicy
    from agents.policy import make_policy
    from agents.ppo_config import load_train_config
    from cluster.train import (
        PENALTY_TERMS,
        held_out_penalties,
        validation_penalties,
        validation_weights,
    )

    if on not in ("validation", "held-out"):
        fail(PipemedicError(f"--on takes validation or held-out, got {on!r}"))
    try:
        names = [p.strip() for p in policy.split(",") if p.strip()]
        if not names:
            raise PipemedicError("--policy names no policy")
        variants = []  # (label, policy, learned kind or None for a baseline)
        for p in map(make_policy, names):  # a baseline, KIND or KIND:vN
            if not isinstance(p, LearnedPolicy):
                variants.append((p.name, p, None))
                continue
            variants.append((p.version, p, p.name))
            if greedy and any(p.rule().values()):
                plain = LearnedPolicy(p.manifest, p.nets)
                plain.set_rule()  # greedy, as validation_score does
                variants.append((f"{p.version}, greedy", plain, p.name))
        figures = []
        for label, p, kind in variants:
            # a baseline reads only the config's scenario sets and reward weights
            cfg = load_train_config(config, **({"kind": kind} if kind else {}))
            if on == "validation":
                rows = validation_penalties(p, cfg, count_idle_actions=True)
                weights = validation_weights(cfg)
            else:
                rows = held_out_penalties(
                    p, cfg, episodes=episodes, seed=seed, count_idle_actions=True
                )
                weights = [1 / len(rows)] * len(rows)  # every scenario the same episodes
            figures.append((label, rows, weights))
    except PipemedicError as exc:
        fail(exc)
    overall_label = "all (the validation score)" if on == "validation" else "all"
    for label, rows, weights in figures:
        table = Table(
            title=f"Penalty of {label} on the {on} scenarios ({config}; per episode, "
            "lower is better)",
            title_justify="left",
        )
        table.add_column("scenario")
        table.add_column("episodes", justify="right")
        table.add_column("weight", justify="right")
        for term in (*PENALTY_TERMS, "total", "acts, no fault open"):
            table.add_column(term, justify="right")
        for r, w in zip(rows, weights, strict=True):
            terms = [f"{r.mean(t):.2f}" for t in PENALTY_TERMS]
            table.add_row(
                r.scenario,
                str(r.episodes),
                f"{w:.3f}",
                *terms,
                f"{r.total:.2f}",
                f"{r.idle_actions:.1f}",
            )
        overall = [
            sum(w * r.mean(t) for r, w in zip(rows, weights, strict=True)) for t in PENALTY_TERMS
        ]
        idle = sum(w * r.idle_actions for r, w in zip(rows, weights, strict=True))
        table.add_row(
            overall_label,
            str(sum(r.episodes for r in rows)),
            "1",
            *[f"{x:.2f}" for x in overall],
            f"{sum(overall):.2f}",
            f"{idle:.1f}",
            style="bold",
        )
        console.print(table)
    console.print(
        "Terms weighted as in the reward (env.rewards): slo per breached step, open per step "
        "of each open incident, lost per step's worth of records, cost per unit. A scenario's "
        "weight in the score: validation mirrors the training mix (env.random.share for the "
        "random scenario); held-out weighs every scenario the same."
    )


@bench_app.command("quiet")
def bench_quiet_cmd(
    policy: Annotated[str, STORED_POLICY_OPTION] = "hierarchical,flat",
    config: Annotated[
        Path, typer.Option(help="Training config: its held-out scenarios and simulator.")
    ] = Path("configs/train.yaml"),
    episodes: Annotated[int, typer.Option(min=1, help="Episodes per held-out scenario.")] = 50,
    seed: Annotated[int, typer.Option(help="The episode seed, as in evaluate.")] = 0,
) -> None:
    """Each policy's actions on held-out steps with no fault open, per action, and the SLO
    breaches on those steps (cluster/quiet_probe.py)."""
    from agents.ppo_config import load_train_config
    from cluster.quiet_probe import quiet_steps
    from envs.catalogue import SIM_ACTIONS

    figures = []
    try:
        for learned in stored_policies(policy):
            cfg = load_train_config(config, kind=learned.name)
            figures.append(
                (learned.version, quiet_steps(learned, cfg, episodes=episodes, seed=seed))
            )
    except PipemedicError as exc:
        fail(exc)
    table = Table(
        title=f"Held-out steps with no fault open ({config}, {episodes} episodes per scenario, "
        f"seed {seed}; per episode): actions taken, and of those the ones whose step breached "
        "the SLO",
        title_justify="left",
    )
    table.add_column("")
    for name, _ in figures:
        table.add_column(name, justify="right")
    table.add_row("quiet steps", *[f"{f.per_episode(f.quiet_steps):.1f}" for _, f in figures])
    table.add_row(
        "SLO breaches on them", *[f"{f.per_episode(f.quiet_breaches):.2f}" for _, f in figures]
    )
    order = list(SIM_ACTIONS)
    actions = sorted({a for _, f in figures for a in f.acts}, key=order.index)
    for action in actions:
        table.add_row(
            action,
            *[
                f"{f.per_episode(f.acts[action]):.2f} ("
                f"{f.per_episode(f.breached_as_it_acted[action]):.2f})"
                for _, f in figures
            ],
        )
    console.print(table)
    console.print(
        "A breach on a quiet step is a burst the pipeline lacked capacity for, or an action's "
        "harm: a restart takes its stage down for the step, a failover halves its capacity."
    )


@bench_app.command("waits")
def bench_waits_cmd(
    policy: Annotated[str, STORED_POLICY_OPTION] = "hierarchical,flat",
    config: Annotated[
        Path, typer.Option(help="Training config: its environment and warm-start teacher.")
    ] = Path("configs/train.yaml"),
    steps: Annotated[int, typer.Option(min=1, help="Simulated pipeline steps per policy.")] = 80000,
    seed: Annotated[int, typer.Option()] = 99,
) -> None:
    """Per action the warm start's teacher would take, how often each policy's top agent
    (master or flat) observes instead, on the policy's own episodes (cluster/wait_probe.py)."""
    from agents.ppo_config import load_train_config
    from cluster.wait_probe import waiting_by_teacher_action

    figures: list[tuple[str, dict[str, object]]] = []
    try:
        for learned in stored_policies(policy):
            cfg = load_train_config(config, kind=learned.name)
            rows = waiting_by_teacher_action(learned, cfg, steps=steps, seed=seed)
            figures.append((learned.version, {r.action: r for r in rows}))
    except PipemedicError as exc:
        fail(exc)
    table = Table(
        title=f"Steps where the teacher acts and the top agent observes ({config}, {steps:,} "
        "pipeline steps per policy, the policy acting): share waited (steps)",
        title_justify="left",
    )
    table.add_column("teacher's action")
    for name, _ in figures:
        table.add_column(name, justify="right")
    actions = sorted({a for _, rows in figures for a in rows})
    for action in actions:
        cells = []
        for _, rows in figures:
            r = rows.get(action)
            cells.append(f"{r.share:.0%} ({r.steps:,})" if r else "-")
        table.add_row(action, *cells)
    console.print(table)
    console.print(
        "A master that observes there never asks a specialist. The steps are each policy's own "
        "(a policy that waits longer meets more of them): compare the shares."
    )


@bench_app.command("train")
def bench_train(
    runners: Annotated[
        list[int] | None, typer.Option(help="Env-runner counts to measure (repeatable).")
    ] = None,
    config: Annotated[Path, typer.Option(help="Training config.")] = Path("configs/train.yaml"),
    iterations: Annotated[int, typer.Option(min=1)] = 6,
    kind: Annotated[str, typer.Option(help="hierarchical or flat")] = "hierarchical",
) -> None:
    """PPO throughput (pipeline-steps/s of whole iterations) with 1 and 2 env runners."""
    from cluster.bench import bench_training

    table = Table(title=f"PPO training throughput, {kind} ({config})", title_justify="left")
    for col in ("env runners", "pipelines/env x envs/runner", "steps/s (median)", "min – max"):
        table.add_column(col, justify="right")
    try:
        for r in runners or [1, 2]:
            res = bench_training(str(config), runners=r, iterations=iterations, kind=kind)
            table.add_row(
                str(r),
                f"{res['pipelines_per_env']} x {res['envs_per_runner']}",
                f"{res['median_iteration_steps_per_s']:,.0f}",
                f"{res['min_iteration_steps_per_s']:,.0f} – {res['max_iteration_steps_per_s']:,.0f}",
            )
    except PipemedicError as exc:
        fail(exc)
    console.print(table)


@app.command("serve")
def serve_cmd(
    config: Annotated[Path, typer.Option(help="Serve config file.")] = Path("configs/serve.yaml"),
    host: Annotated[
        str | None, typer.Option(help="Listen address (default: the config's).")
    ] = None,
    port: Annotated[int | None, typer.Option(help="Port (default: the config's, 8000).")] = None,
    ingress: Annotated[
        str,
        typer.Option(
            help="How HTTP reaches the replicas: Serve's Python proxy, direct ingress on the "
            "replicas' own ports as well, or HAProxy routing by the X-Pipeline-Id header "
            "(proxy, direct or haproxy)."
        ),
    ] = "proxy",
) -> None:
    """Serve the decision endpoint on an embedded Ray (Ctrl-C stops it).

    Beyond loopback (--host 0.0.0.0) set PIPEMEDIC_API_TOKEN: decide and feedback then need
    `Authorization: Bearer <token>`. The promoted policy of the checkpoints table is served;
    a newly promoted version is picked up while serving."""
    from serve.launch import start
    from serve.settings import INGRESS_ENV, load_serve_config, service_settings, with_host_port

    try:
        cfg = load_serve_config(config)
        http = cfg.get("http_options") or {}
        cfg = with_host_port(
            cfg, host=host or http.get("host", "127.0.0.1"), port=port or http.get("port", 8000)
        )
        if ingress not in INGRESS_ENV:
            raise PipemedicError(
                f"--ingress {ingress!r} is not a known ingress; use one of {', '.join(INGRESS_ENV)}"
            )
        settings = service_settings(cfg["applications"][0].get("args"))
        settings.api_token()  # refuse an open service beyond loopback before starting Ray
        from checkpoints.policies import CheckpointStore

        if CheckpointStore(settings.store_uri).promoted_version(settings.policy) is None:
            raise PipemedicError(
                f"no promoted {settings.policy} policy in the store; train one "
                "(python -m cluster.train --config configs/train.yaml) or import one "
                "(pipemedic checkpoints import BUNDLE --promote)"
            )
        if os.environ.get("RAY_ADDRESS") and INGRESS_ENV[ingress]:
            raise PipemedicError(
                f"--ingress {ingress} cannot change a running Ray cluster (RAY_ADDRESS is set): "
                "start it with "
                + " ".join(f"{k}={v}" for k, v in INGRESS_ENV[ingress].items())
                + " in the environment of `ray start`"
            )
        # Read by Serve's processes when they start; the other ingresses' variables are cleared
        # so that the one asked for is the one that runs.
        for name in {k for env in INGRESS_ENV.values() for k in env}:
            os.environ.pop(name, None)
        os.environ.update(INGRESS_ENV[ingress])
        url = cfg["http_options"]["host"], cfg["http_options"]["port"]
        console.print(
            f"Serving {settings.policy} on http://{url[0]}:{url[1]} through {ingress} (Ctrl-C stops)"
        )
        console.print("  docs: /docs   OpenAPI: /openapi.json   metrics: /metrics")
        start(cfg, blocking=True)
    except PipemedicError as exc:
        fail(exc)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the report.")] = Path("reports/demo"),
    episodes: Annotated[int, typer.Option(min=1)] = 10,
    config: Annotated[Path, typer.Option(help="Training config of the demo.")] = Path(
        "configs/train-quick.yaml"
    ),
    store: Annotated[Path, typer.Option(help="The demo's own store.")] = Path("store/demo"),
) -> None:
    """The main job: train hierarchical and flat quickly, then evaluate them against the
    baselines on the held-out scenarios and print the table.

    The demo keeps its own store (--store, default store/demo) so it never replaces a policy
    trained with the default config."""
    import os

    from agents.ppo_config import load_train_config
    from cluster.train import train as run_training

    # Before Ray starts, absolute: workers read it too, from their own working folders.
    os.environ["PIPEMEDIC_STORE_URI"] = str(store.resolve())
    try:
        for kind in ("hierarchical", "flat"):
            cfg = load_train_config(config, kind=kind)
            console.print(
                f"Training {kind} with {config} (budget {cfg.stop.pipeline_steps:,} pipeline steps)"
            )
            summary = run_training(cfg, store / "runs" / kind, fresh=True, console=err_console)
            console.print(
                f"  {summary['pipeline_steps']:,} pipeline steps in {summary['train_seconds']:.0f} s"
            )
        run_evaluation(
            policies=DEMO_POLICIES.split(","),
            scenarios_path=_held_out_files(config),
            episodes=episodes,
            seed=0,
            out=out,
            sim_config=Path("configs/simulator.yaml"),
            per_scenario=False,
        )
    except PipemedicError as exc:
        fail(exc)


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    sys.exit(app())


if __name__ == "__main__":
    main()
