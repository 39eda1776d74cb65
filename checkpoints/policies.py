"""The checkpoints table: versioned policy weights, promotion and rollback.

``checkpoints`` (partitioned by ``kind``) holds one row per agent module per policy version::

    kind, version, agent, run_id, created_at, iteration, pipeline_steps,
    eval_metrics (JSON), config (JSON), manifest (JSON), format, sha256, weights

``weights`` are safetensors bytes (``format = "safetensors"``): loading them runs no code, unlike
a pickle. ``sha256`` is the hex SHA-256 of ``weights``; a row whose bytes do not match is refused.
Versions count up from 1 per kind.

``promotions`` is a small append-only log: one row each time a version of a kind is promoted or
rolled back to. The promoted version is the newest row of a kind, so "what was promoted at time
T" is a Delta time-travel read of this table as of T. Serving loads the promoted version; if its
rows fail the hash check it falls back to the version promoted before it, and says so.

This module stores bytes and metadata only; turning weights into networks is
``agents.inference``'s job.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds

from checkpoints.storage import append_batch, ensure_table, open_table, table_uri
from envs.errors import CheckpointError, StorageError

log = logging.getLogger(__name__)

CHECKPOINT_TABLE = "checkpoints"
PROMOTION_TABLE = "promotions"
WEIGHTS_FORMAT = "safetensors"

CHECKPOINT_SCHEMA = pa.schema(
    [
        ("kind", pa.string()),
        ("version", pa.int64()),
        ("agent", pa.string()),
        ("run_id", pa.string()),
        ("created_at", pa.timestamp("us", tz="UTC")),
        ("iteration", pa.int64()),
        ("pipeline_steps", pa.int64()),
        ("eval_metrics", pa.string()),
        ("config", pa.string()),
        ("manifest", pa.string()),
        ("format", pa.string()),
        ("sha256", pa.string()),
        ("weights", pa.binary()),
    ]
)
PROMOTION_SCHEMA = pa.schema(
    [
        ("kind", pa.string()),
        ("version", pa.int64()),
        ("action", pa.string()),
        ("reason", pa.string()),
        ("promoted_at", pa.timestamp("us", tz="UTC")),
    ]
)
_METADATA = [c for c in CHECKPOINT_SCHEMA.names if c != "weights"]


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class StoredPolicy:
    """One policy version as loaded: metadata and the verified weights of each agent."""

    kind: str
    version: int
    run_id: str
    iteration: int
    pipeline_steps: int
    created_at: datetime
    eval_metrics: dict[str, Any]
    config: dict[str, Any]
    manifest: dict[str, Any]
    weights: dict[str, bytes]
    # Versions refused on the way here (tampered or unreadable), with the reason.
    refused: list[tuple[int, str]] = field(default_factory=list)

    @property
    def name(self) -> str:
        """``KIND:vN``, the ``policy_version`` experience rows and serving answers carry."""
        return f"{self.kind}:v{self.version}"


class CheckpointStore:
    """The checkpoints and promotions tables under one store root."""

    def __init__(self, root: str | None = None):
        self.checkpoints_uri = table_uri(CHECKPOINT_TABLE, root)
        self.promotions_uri = table_uri(PROMOTION_TABLE, root)

    # ------------------------------------------------------------------ writing
    def publish(
        self,
        kind: str,
        weights: dict[str, bytes],
        *,
        run_id: str,
        iteration: int,
        pipeline_steps: int,
        manifest: dict[str, Any],
        eval_metrics: dict[str, Any] | None = None,
        config: dict[str, Any] | None = None,
    ) -> int:
        """Store a new version of ``kind`` (one row per agent) and return its number.

        Publishing the same (run, iteration) again returns the version already stored: a
        training job resumed after a crash does not publish its iteration twice.
        """
        if not weights:
            raise CheckpointError("a checkpoint needs the weights of at least one agent")
        ensure_table(self.checkpoints_uri, CHECKPOINT_SCHEMA, partition_by=["kind"])
        existing = self._rows(kind, columns=["version", "run_id", "iteration"])
        for v, r, it in zip(
            existing["version"].to_pylist(),
            existing["run_id"].to_pylist(),
            existing["iteration"].to_pylist(),
            strict=True,
        ):
            if r == run_id and it == iteration:
                return int(v)
        version = max(existing["version"].to_pylist(), default=0) + 1
        now = datetime.now(UTC)
        agents = sorted(weights)
        n = len(agents)
        rows = {
            "kind": [kind] * n,
            "version": [version] * n,
            "agent": agents,
            "run_id": [run_id] * n,
            "created_at": [now] * n,
            "iteration": [iteration] * n,
            "pipeline_steps": [pipeline_steps] * n,
            "eval_metrics": [json.dumps(eval_metrics or {}, default=float)] * n,
            "config": [json.dumps(config or {})] * n,
            "manifest": [json.dumps(manifest)] * n,
            "format": [WEIGHTS_FORMAT] * n,
            "sha256": [sha256_hex(weights[a]) for a in agents],
            "weights": [weights[a] for a in agents],
        }
        append_batch(
            self.checkpoints_uri,
            pa.table(rows, schema=CHECKPOINT_SCHEMA),
            writer_id=f"checkpoints/{kind}/{run_id}",
            batch=iteration,
            partition_by=["kind"],
        )
        log.info("published %s:v%d (run %s, iteration %d)", kind, version, run_id, iteration)
        return version

    def promote(
        self, kind: str, version: int, *, reason: str = "", action: str = "promote"
    ) -> None:
        """Make ``version`` the one serving uses. The version must exist and pass its hash
        check: promoting weights that would be refused on load helps nobody."""
        self.load(kind, version)  # raises CheckpointError when missing or tampered
        ensure_table(self.promotions_uri, PROMOTION_SCHEMA)
        row = pa.table(
            {
                "kind": [kind],
                "version": [version],
                "action": [action],
                "reason": [reason],
                "promoted_at": [datetime.now(UTC)],
            },
            schema=PROMOTION_SCHEMA,
        )
        append_batch(self.promotions_uri, row, writer_id=f"promotions/{uuid.uuid4().hex}", batch=0)
        log.info("%s %s:v%d", action, kind, version)

    def rollback(self, kind: str, *, to: int | None = None, reason: str = "") -> int:
        """Promote ``to``, or by default the version promoted before the current one."""
        history = self.promotion_history(kind)
        if not history:
            raise CheckpointError(
                f"nothing of kind {kind!r} was ever promoted; nothing to roll back"
            )
        current = history[0]["version"]
        if to is None:
            earlier = [h["version"] for h in history if h["version"] != current]
            if not earlier:
                raise CheckpointError(
                    f"{kind}:v{current} is the only version ever promoted; name one with --to"
                )
            to = earlier[0]
        self.promote(kind, to, reason=reason or f"rollback from v{current}", action="rollback")
        return to

    # ------------------------------------------------------------------ reading
    def promotion_history(self, kind: str, *, at: datetime | None = None) -> list[dict[str, Any]]:
        """Promotions of ``kind``, newest first; as the table stood at time ``at`` if given
        (Delta time travel)."""
        table = open_table(self.promotions_uri)
        if table is None:
            return []
        if at is not None:
            at = at.replace(tzinfo=UTC) if at.tzinfo is None else at
            first = table.history(limit=None)[-1]["timestamp"] / 1000  # ms → s, version 0
            if at.timestamp() < first:
                return []
            try:
                table.load_as_version(at)
            except Exception as exc:  # delta-rs raises a plain error for an out-of-range time
                raise StorageError(f"cannot read {self.promotions_uri} as of {at}: {exc}") from exc
        rows = table.to_pyarrow_dataset().to_table(filter=ds.field("kind") == kind).to_pylist()
        return sorted(rows, key=lambda r: r["promoted_at"], reverse=True)

    def promoted_version(self, kind: str, *, at: datetime | None = None) -> int | None:
        """The version of ``kind`` serving used (at time ``at``; now by default)."""
        history = self.promotion_history(kind, at=at)
        return int(history[0]["version"]) if history else None

    def list_versions(self, kind: str | None = None) -> list[dict[str, Any]]:
        """Every stored version (metadata only, no weights), oldest first."""
        table = open_table(self.checkpoints_uri)
        if table is None:
            return []
        filt = None if kind is None else ds.field("kind") == kind
        rows = table.to_pyarrow_dataset().to_table(columns=_METADATA, filter=filt).to_pylist()
        promoted = {k: self.promoted_version(k) for k in {r["kind"] for r in rows}}
        versions: dict[tuple[str, int], dict[str, Any]] = {}
        for r in rows:
            key = (r["kind"], r["version"])
            v = versions.setdefault(
                key,
                {
                    "kind": r["kind"],
                    "version": r["version"],
                    "run_id": r["run_id"],
                    "created_at": r["created_at"],
                    "iteration": r["iteration"],
                    "pipeline_steps": r["pipeline_steps"],
                    "eval_metrics": json.loads(r["eval_metrics"] or "{}"),
                    "agents": [],
                    "promoted": promoted.get(r["kind"]) == r["version"],
                },
            )
            v["agents"].append(r["agent"])
        return sorted(versions.values(), key=lambda v: (v["kind"], v["version"]))

    def load(self, kind: str, version: int) -> StoredPolicy:
        """One version with its weights; ``CheckpointError`` if it is missing or any row's
        weights do not match their SHA-256."""
        table = open_table(self.checkpoints_uri)
        if table is None:
            raise CheckpointError(f"no checkpoints table at {self.checkpoints_uri}")
        rows = (
            table.to_pyarrow_dataset()
            .to_table(filter=(ds.field("kind") == kind) & (ds.field("version") == version))
            .to_pylist()
        )
        if not rows:
            raise CheckpointError(
                f"no version {version} of kind {kind!r} in {self.checkpoints_uri}"
            )
        agents = [r["agent"] for r in rows]
        if len(set(agents)) != len(agents):
            raise CheckpointError(f"{kind}:v{version} has more than one row for an agent: {agents}")
        for r in rows:
            if r["format"] != WEIGHTS_FORMAT:
                raise CheckpointError(
                    f"{kind}:v{version} agent {r['agent']}: weights format {r['format']!r} is not "
                    f"{WEIGHTS_FORMAT!r}; refusing to load it"
                )
            actual = sha256_hex(r["weights"])
            if actual != r["sha256"]:
                raise CheckpointError(
                    f"{kind}:v{version} agent {r['agent']}: weights SHA-256 {actual[:12]}... does "
                    f"not match the recorded {r['sha256'][:12]}...; the row was altered or damaged"
                )
        first = rows[0]
        return StoredPolicy(
            kind=kind,
            version=version,
            run_id=first["run_id"],
            iteration=first["iteration"],
            pipeline_steps=first["pipeline_steps"],
            created_at=first["created_at"],
            eval_metrics=json.loads(first["eval_metrics"] or "{}"),
            config=json.loads(first["config"] or "{}"),
            manifest=json.loads(first["manifest"]),
            weights={r["agent"]: r["weights"] for r in rows},
        )

    def load_promoted(self, kind: str) -> StoredPolicy:
        """The promoted version of ``kind``. If it fails its checks, the version promoted
        before it is used instead (and so on back), with an error logged for each refusal;
        ``StoredPolicy.refused`` lists them. ``CheckpointError`` when none is usable."""
        history = self.promotion_history(kind)
        if not history:
            raise CheckpointError(
                f"no {kind} policy has been promoted in {self.promotions_uri}; train one "
                f"(`python -m cluster.train --kind {kind}`) or promote a version with "
                f"`pipemedic checkpoints promote {kind} VERSION`"
            )
        refused: list[tuple[int, str]] = []
        seen: set[int] = set()
        for h in history:
            version = int(h["version"])
            if version in seen:
                continue
            seen.add(version)
            try:
                policy = self.load(kind, version)
            except CheckpointError as exc:
                log.error("refusing %s:v%d: %s", kind, version, exc)
                refused.append((version, str(exc)))
                continue
            if refused:
                log.error(
                    "serving %s:v%d instead of the promoted v%d", kind, version, refused[0][0]
                )
            return StoredPolicy(**{**policy.__dict__, "refused": refused})
        raise CheckpointError(
            f"every promoted version of {kind} was refused: "
            + "; ".join(f"v{v}: {why}" for v, why in refused)
        )

    def _rows(self, kind: str, *, columns: list[str]) -> pa.Table:
        table = open_table(self.checkpoints_uri)
        if table is None:
            return pa.table({c: pa.array([], CHECKPOINT_SCHEMA.field(c).type) for c in columns})
        return table.to_pyarrow_dataset().to_table(columns=columns, filter=ds.field("kind") == kind)
