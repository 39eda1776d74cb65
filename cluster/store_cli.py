"""``pipemedic checkpoints ...`` and ``pipemedic experience ...``: operating the Delta store.

    pipemedic checkpoints list [--kind hierarchical]
    pipemedic checkpoints import store/runs/hierarchical/policy --promote
    pipemedic checkpoints show hierarchical 3
    pipemedic checkpoints promote hierarchical 3 --reason "beat v2 on held-out"
    pipemedic checkpoints rollback hierarchical [--to 2]
    pipemedic checkpoints promoted hierarchical --at 2026-11-22T10:00:00
    pipemedic checkpoints retune hierarchical --config configs/train.yaml --promote

    pipemedic experience record --policy oracle --steps 300000
    pipemedic experience stats
    pipemedic experience compact
    pipemedic experience vacuum --retain-hours 168 [--keep-days 30] [--dry-run]

The store is ``PIPEMEDIC_STORE_URI`` (default ``./store``).
"""

from __future__ import annotations

import json
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cluster.cli_output import console, fail
from envs.errors import PipemedicError

checkpoints_app = typer.Typer(no_args_is_help=True, help="Policy versions in the Delta store.")
experience_app = typer.Typer(no_args_is_help=True, help="The experience table in the Delta store.")


def _store():
    from checkpoints.policies import CheckpointStore

    return CheckpointStore()


@checkpoints_app.command("list")
def checkpoints_list(
    kind: Annotated[str | None, typer.Option(help="Only this kind.")] = None,
) -> None:
    """Stored versions with their training facts and evaluation figures."""
    try:
        versions = _store().list_versions(kind)
    except PipemedicError as exc:
        fail(exc)
    table = Table(title=f"{len(versions)} policy versions", title_justify="left")
    for col in ("kind", "version", "promoted", "run", "iteration", "pipeline steps", "created"):
        table.add_column(col)
    table.add_column("validation", justify="right")
    table.add_column("held-out MTTR s / SLO", justify="right")
    for v in versions:
        held = v["eval_metrics"].get("held_out") or {}
        table.add_row(
            v["kind"],
            str(v["version"]),
            "yes" if v["promoted"] else "",
            v["run_id"],
            str(v["iteration"]),
            f"{v['pipeline_steps']:,}",
            f"{v['created_at']:%Y-%m-%d %H:%M:%S}",
            fmt_optional(v["eval_metrics"].get("validation_score"), "{:.1f}"),
            f"{fmt_optional(held.get('mttr_s'), '{:.0f}')} / {fmt_optional(held.get('slo_adherence'), '{:.1%}')}",
        )
    console.print(table)


def fmt_optional(value, pattern: str) -> str:
    """``pattern.format(value)``, or ``-`` for a missing value."""
    return "-" if value is None else pattern.format(value)


@checkpoints_app.command("show")
def checkpoints_show(
    kind: Annotated[str, typer.Argument(help="hierarchical or flat")],
    version: Annotated[int, typer.Argument(min=1)],
) -> None:
    """One version: metadata, per-agent hashes and sizes (verifies the hashes)."""
    try:
        policy = _store().load(kind, version)
    except PipemedicError as exc:
        fail(exc)
    from checkpoints.policies import sha256_hex

    console.print(
        json.dumps(
            {
                "name": policy.name,
                "run_id": policy.run_id,
                "iteration": policy.iteration,
                "pipeline_steps": policy.pipeline_steps,
                "created_at": policy.created_at.isoformat(),
                "eval_metrics": policy.eval_metrics,
                "agents": {
                    a: {"sha256": sha256_hex(w), "bytes": len(w)}
                    for a, w in sorted(policy.weights.items())
                },
                "hash_check": "ok",
            },
            indent=2,
        )
    )


@checkpoints_app.command("import")
def checkpoints_import(
    bundle: Annotated[Path, typer.Argument(help="A bundle folder, e.g. STORE/runs/KIND/policy")],
    promote: Annotated[bool, typer.Option(help="Also promote the new version.")] = False,
) -> None:
    """Publish a policy bundle folder as a new version (e.g. a run's policy/ or an older
    bundle from before the checkpoints table)."""
    from agents.inference import load_bundle, weights_of

    try:
        manifest, nets = load_bundle(bundle)
        kind = manifest["kind"]
        store = _store()
        version = store.publish(
            kind,
            weights_of(nets),
            run_id=str(manifest.get("run_id", f"import:{bundle.resolve()}")),
            iteration=int(manifest.get("selected_iteration", manifest.get("iteration", 0))),
            pipeline_steps=int(manifest.get("pipeline_steps", 0)),
            manifest={k: v for k, v in manifest.items() if k != "config"},
            eval_metrics={"validation_score": manifest.get("best_score")},
            config=manifest.get("config") or {},
        )
        if promote:
            store.promote(kind, version, reason=f"imported from {bundle}")
    except PipemedicError as exc:
        fail(exc)
    console.print(
        f"published {bundle} as {kind}:v{version}" + (" and promoted it" if promote else "")
    )


@checkpoints_app.command("promote")
def checkpoints_promote(
    kind: Annotated[str, typer.Argument(help="hierarchical or flat")],
    version: Annotated[int, typer.Argument(min=1)],
    reason: Annotated[str, typer.Option(help="Why (kept in the promotions log).")] = "",
) -> None:
    """Make a version the one `--policy KIND` and serving use."""
    try:
        _store().promote(kind, version, reason=reason)
    except PipemedicError as exc:
        fail(exc)
    console.print(f"promoted {kind}:v{version}")


@checkpoints_app.command("rollback")
def checkpoints_rollback(
    kind: Annotated[str, typer.Argument(help="hierarchical or flat")],
    to: Annotated[
        int | None, typer.Option(help="Version to go back to (default: previous).")
    ] = None,
    reason: Annotated[str, typer.Option()] = "",
) -> None:
    """Promote the previously promoted version again (or --to a given one)."""
    try:
        version = _store().rollback(kind, to=to, reason=reason)
    except PipemedicError as exc:
        fail(exc)
    console.print(f"rolled back {kind} to v{version}")


@checkpoints_app.command("promoted")
def checkpoints_promoted(
    kind: Annotated[str, typer.Argument(help="hierarchical or flat")],
    at: Annotated[
        datetime | None, typer.Option(help="A past time (ISO 8601, UTC if no zone); default now.")
    ] = None,
) -> None:
    """Which version was promoted at a time (Delta time travel on the promotions log)."""
    try:
        version = _store().promoted_version(kind, at=at)
    except PipemedicError as exc:
        fail(exc)
    when = at.isoformat() if at else "now"
    console.print(f"{kind} at {when}: " + (f"v{version}" if version else "nothing promoted"))


@checkpoints_app.command("retune")
def checkpoints_retune(
    kind: Annotated[str, typer.Argument(help="hierarchical or flat")],
    config: Annotated[
        Path, typer.Option(help="The training config: validation set and rules to try.")
    ] = Path("configs/train.yaml"),
    promote: Annotated[bool, typer.Option(help="Also promote the new version.")] = False,
    version: Annotated[
        int | None, typer.Option(min=1, help="Retune this stored version, not the promoted one.")
    ] = None,
) -> None:
    """Choose the promoted version's (or ``--version``'s) decision rule anew by validation
    score (greedy, or an alternative the config lists: act_thresholds, hand_raise_thresholds,
    delegation_gate), as training's reviews do, and publish the same weights with the winning
    rule as a new version. For a policy trained before a rule existed, or to see what a
    version would decide by without one of the rules; no retraining. A delegation gate is
    fitted anew with ``--config``'s teacher and seed, not those of the version's training."""
    from agents.inference import RULE_KEYS, export_bundle, nets_from_weights
    from agents.ppo_config import load_train_config
    from cluster.train import choose_decision_rule

    try:
        cfg = load_train_config(config, kind=kind)
        store = _store()
        stored = store.load_promoted(kind) if version is None else store.load(kind, version)
        manifest = {k: v for k, v in stored.manifest.items() if k not in RULE_KEYS}
        nets = nets_from_weights(stored.manifest, stored.weights, where=stored.name)
        console.print(f"{stored.name}: validation score of each decision rule (lower is better)")
        with tempfile.TemporaryDirectory() as tmp:
            bundle = export_bundle(Path(tmp) / "policy", kind, nets, manifest)
            best = choose_decision_rule(
                bundle, cfg, on_score=lambda r: console.print(f"  {r.score:8.3f}  {r.label}")
            )
        console.print(f"best: {best.label} ({best.score:.3f})")
        if all(stored.manifest.get(k) == v for k, v in best.manifest_entries().items()):
            console.print(f"{stored.name} already decides that way; nothing published")
            return
        new_version = store.publish(
            kind,
            stored.weights,
            run_id=f"{stored.run_id} {stored.name} retuned: {best.label}",
            iteration=stored.iteration,
            pipeline_steps=stored.pipeline_steps,
            manifest={
                **manifest,
                **best.manifest_entries(),
                "retuned_from": stored.name,
            },
            eval_metrics={"validation_score": best.score},
            config=stored.config,
        )
        if promote:
            store.promote(kind, new_version, reason=f"{stored.name} retuned: {best.label}")
    except PipemedicError as exc:
        fail(exc)
    console.print(
        f"published {kind}:v{new_version} ({stored.name}'s weights, {best.label})"
        + (" and promoted it" if promote else "")
    )


@experience_app.command("record")
def experience_record(
    policy: Annotated[str, typer.Option(help="The baseline that acts: oracle, runbook, ...")] = (
        "oracle"
    ),
    steps: Annotated[int, typer.Option(min=1, help="Simulated pipeline steps.")] = 300_000,
    config: Annotated[str, typer.Option(help="Training config (its environment).")] = (
        "configs/train.yaml"
    ),
    kind: Annotated[str | None, typer.Option(help="hierarchical or flat")] = None,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Let a baseline drive the training environment and append its transitions (source sim)."""
    import time

    from agents.ppo_config import load_train_config
    from agents.warm_start import record_episodes
    from checkpoints.experience import ExperienceWriter

    try:
        cfg = load_train_config(config, kind=kind)
        started = time.perf_counter()
        with ExperienceWriter(run_id=f"record-{policy}-{seed}", source="sim") as writer:
            used = record_episodes(cfg.env_config(), policy, writer, steps=steps, seed=seed)
    except PipemedicError as exc:
        fail(exc)
    console.print(
        f"recorded {writer.rows_written:,} transitions of {policy} ({used:,} pipeline steps) in "
        f"{time.perf_counter() - started:.1f} s to {writer.uri}"
    )


@experience_app.command("stats")
def experience_stats() -> None:
    """Rows by source and policy version, files, size, table version."""
    from checkpoints.experience import stats

    try:
        s = stats()
    except PipemedicError as exc:
        fail(exc)
    console.print(
        f"{s['uri']}: version {s['version']}, {s['rows']:,} transitions in {s['files']} files "
        f"({s['bytes'] / 1e6:,.1f} MB), days {s['first_date']} .. {s['last_date']}"
    )
    table = Table(title_justify="left")
    for col in ("source", "policy version", "transitions"):
        table.add_column(col)
    for row in s["by_source_and_version"]:
        table.add_row(row["source"], str(row["policy_version"]), f"{row['rows']:,}")
    console.print(table)


@experience_app.command("compact")
def experience_compact(
    target_file_mb: Annotated[int, typer.Option(min=1)] = 128,
) -> None:
    """Merge small files (many small batches) into larger ones; vacuum removes the old ones."""
    from checkpoints.experience import compact

    try:
        result = compact(target_file_mb=target_file_mb)
    except PipemedicError as exc:
        fail(exc)
    console.print(
        f"compacted: {result['numFilesRemoved']} files rewritten as {result['numFilesAdded']}"
    )


@experience_app.command("vacuum")
def experience_vacuum(
    retain_hours: Annotated[
        int, typer.Option(min=0, help="Keep unreferenced files younger than this.")
    ] = 168,
    keep_days: Annotated[
        int | None, typer.Option(min=1, help="First delete transitions older than this.")
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="List what would be deleted.")] = False,
) -> None:
    """Delete files no table version needs: replaced by compaction or deletes, and orphans of
    writers killed mid-write. With --keep-days, expire old transitions first."""
    from checkpoints.experience import expire, vacuum

    try:
        if keep_days is not None and not dry_run:
            console.print(f"expired {expire(keep_days=keep_days):,} transitions")
        files = vacuum(retain_hours=retain_hours, dry_run=dry_run)
    except PipemedicError as exc:
        fail(exc)
    verb = "would delete" if dry_run else "deleted"
    console.print(f"{verb} {len(files)} files")
