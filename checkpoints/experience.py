"""The experience table: transitions from simulation, shadow mode and production, for replay.

One row per agent decision::

    run_id, source (sim|shadow|prod), date (partition: UTC day), episode, step, agent,
    observation, action_mask, action, action_prob, reward, next_observation,
    terminated, truncated, policy_version, scenario, timestamp

``episode`` identifies one pipeline's episode (the vectorised environment runs several pipelines
at once; each is its own episode). ``agent`` is the role (``master``, ``drift``, ``infra``,
``quality`` or ``flat``); ``action`` is the index in that role's action layout
(``envs.observation.LAYOUTS``) and ``action_mask`` the actions that were allowed, so imitation
can mask like the policy does. ``policy_version`` names what acted: ``hierarchical:v3`` for a
stored checkpoint, ``train:RUN:ITERATION`` while training, or a baseline's name (``oracle``).

The table is partitioned by ``source`` and ``date``, the two filters replay almost always uses
(only simulated data; the last week), so a filtered read opens only the files it needs.
``ExperienceWriter`` appends in batches through ``checkpoints.storage.append_files`` (each batch
exactly once, however often it is retried); ``ReplaySampler`` reads filtered slices.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
from deltalake import ColumnProperties, WriterProperties

from checkpoints.storage import append_files, ensure_table, is_remote, open_table, table_uri
from envs.errors import StorageError

log = logging.getLogger(__name__)

EXPERIENCE_TABLE = "experience"
Source = Literal["sim", "shadow", "prod"]
SOURCES: tuple[str, ...] = ("sim", "shadow", "prod")
PARTITION_BY = ["source", "date"]

SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("source", pa.string()),
        ("date", pa.string()),
        ("episode", pa.string()),
        ("step", pa.int32()),
        ("agent", pa.string()),
        ("observation", pa.list_(pa.float32())),
        ("action_mask", pa.list_(pa.bool_())),
        ("action", pa.int32()),
        ("action_prob", pa.float32()),
        ("reward", pa.float32()),
        ("next_observation", pa.list_(pa.float32())),
        ("terminated", pa.bool_()),
        ("truncated", pa.bool_()),
        ("policy_version", pa.string()),
        ("scenario", pa.string()),
        ("timestamp", pa.timestamp("us", tz="UTC")),
    ]
)
REQUIRED = ("episode", "step", "agent", "observation", "action", "reward", "policy_version")

# Write settings, measured with `pipemedic bench store` (50,000 real transitions per batch, see
# the README): list columns dominate (two observations of 110-230 floats per row), and for them
# dictionary encoding and page statistics only cost time; compression halves the files but
# costs about a third of the append rate, so it is left to compaction time (`compact`
# rewrites files with ZSTD). Scalar columns keep their statistics, which filters use to skip
# row groups; larger pages mean fewer page headers per list column. Appends encode
# ``FILES_PER_PARTITION`` files at once (``checkpoints.storage.append_files``).
_LIST_COLUMNS = ("observation", "next_observation", "action_mask")
_SCALAR_COLUMNS = [f.name for f in SCHEMA if f.name not in _LIST_COLUMNS + tuple(PARTITION_BY)]
PARQUET_OPTIONS = {
    "compression": "NONE",
    "use_dictionary": False,
    "write_statistics": _SCALAR_COLUMNS,
    "data_page_size": 8 << 20,
    "write_batch_size": 8192,
}
FILES_PER_PARTITION = max(2, min(4, os.cpu_count() or 1))
_PLAIN = ColumnProperties(dictionary_enabled=False, statistics_enabled="NONE")
COMPACT_PROPERTIES = WriterProperties(
    compression="ZSTD",
    compression_level=3,
    column_properties={f"{c}.list.element": _PLAIN for c in _LIST_COLUMNS},
)


def experience_uri(root: str | None = None) -> str:
    return table_uri(EXPERIENCE_TABLE, root)


# ---------------------------------------------------------------------- building batches
@dataclass
class Transitions:
    """A batch of transitions as columns (NumPy arrays or lists, one entry per row).

    ``observation`` / ``next_observation`` / ``action_mask`` are 2-D arrays when every row has
    the same size (the fast path) or sequences of 1-D arrays. ``next_observation`` may be None
    for rows that have none (a production decision whose outcome is not known yet).
    """

    episode: Sequence[str]
    step: np.ndarray
    agent: Sequence[str]
    observation: np.ndarray | Sequence[np.ndarray]
    action: np.ndarray
    reward: np.ndarray
    policy_version: Sequence[str] | str
    next_observation: np.ndarray | Sequence[np.ndarray | None] | None = None
    action_mask: np.ndarray | Sequence[np.ndarray] | None = None
    action_prob: np.ndarray | None = None
    terminated: np.ndarray | None = None
    truncated: np.ndarray | None = None
    scenario: Sequence[str] | str | None = None
    timestamp: Sequence[datetime] | datetime | None = None

    def __len__(self) -> int:
        return len(self.step)

    def to_arrow(self, *, run_id: str, source: str) -> pa.Table:
        """Validate and build the Arrow table (a clear ``StorageError`` names a bad field)."""
        if source not in SOURCES:
            raise StorageError(f"source must be one of {SOURCES}, got {source!r}")
        n = len(self)
        if n == 0:
            raise StorageError("an experience batch needs at least one transition")
        for name in REQUIRED:
            value = getattr(self, name)
            if not isinstance(value, str) and len(value) != n:
                raise StorageError(f"field {name!r} has {len(value)} rows, expected {n}")
        reward = np.asarray(self.reward, dtype=np.float32)
        if not np.isfinite(reward).all():
            bad = int(np.flatnonzero(~np.isfinite(reward))[0])
            raise StorageError(f"field 'reward' is not finite at row {bad}: {reward[bad]}")
        now = datetime.now(UTC)
        stamps = _column(self.timestamp if self.timestamp is not None else now, n)
        stamp_array = pa.array(stamps, pa.timestamp("us", tz="UTC"))
        dates = pc.strftime(stamp_array, format="%Y-%m-%d", locale="C")
        columns = {
            "run_id": pa.array([run_id] * n, pa.string()),
            "source": pa.array([source] * n, pa.string()),
            "date": dates,
            "episode": pa.array(list(self.episode), pa.string()),
            "step": pa.array(np.asarray(self.step, dtype=np.int32)),
            "agent": pa.array(list(self.agent), pa.string()),
            "observation": _list_array(self.observation, np.float32, "observation", n),
            "action_mask": _list_array(self.action_mask, np.bool_, "action_mask", n),
            "action": pa.array(np.asarray(self.action, dtype=np.int32)),
            "action_prob": _optional(self.action_prob, np.float32, n),
            "reward": pa.array(reward),
            "next_observation": _list_array(
                self.next_observation, np.float32, "next_observation", n
            ),
            "terminated": _optional(self.terminated, np.bool_, n, default=False),
            "truncated": _optional(self.truncated, np.bool_, n, default=False),
            "policy_version": pa.array(_column(self.policy_version, n), pa.string()),
            "scenario": pa.array(_column(self.scenario, n), pa.string()),
            "timestamp": stamp_array,
        }
        return pa.table(columns, schema=SCHEMA)


def _column(value, n: int) -> list:
    if value is None or isinstance(value, str | datetime):
        return [value] * n
    return list(value)


def _optional(values, dtype, n: int, default=None) -> pa.Array:
    if values is None:
        return pa.array([default] * n, pa.from_numpy_dtype(np.dtype(dtype)))
    return pa.array(np.asarray(values, dtype=dtype))


def _list_array(rows, dtype, name: str, n: int) -> pa.Array:
    """A list<dtype> column from a 2-D array (fast) or a sequence of 1-D arrays / None."""
    value_type = pa.from_numpy_dtype(np.dtype(dtype))
    if rows is None:
        return pa.nulls(n, pa.list_(value_type))
    if isinstance(rows, np.ndarray) and rows.ndim == 2:
        if len(rows) != n:
            raise StorageError(f"field {name!r} has {len(rows)} rows, expected {n}")
        flat = np.ascontiguousarray(rows, dtype=dtype).ravel()
        offsets = np.arange(n + 1, dtype=np.int32) * rows.shape[1]
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))
    if len(rows) != n:
        raise StorageError(f"field {name!r} has {len(rows)} rows, expected {n}")
    return pa.array(
        [None if r is None else np.asarray(r, dtype=dtype) for r in rows], pa.list_(value_type)
    )


# ---------------------------------------------------------------------- writing
class ExperienceWriter:
    """Appends transitions in batches; each batch lands exactly once (see ``append_files``).

    ``add`` buffers; a batch is written when ``flush_rows`` rows are buffered, on ``flush()``
    and on leaving a ``with`` block. Each writer has its own id (host, process, random suffix),
    so writers never mistake each other's batches for their own.
    """

    def __init__(
        self,
        *,
        run_id: str,
        source: Source,
        uri: str | None = None,
        writer_id: str | None = None,
        flush_rows: int = 100_000,
        files_per_partition: int = FILES_PER_PARTITION,
    ):
        if source not in SOURCES:
            raise StorageError(f"source must be one of {SOURCES}, got {source!r}")
        self.uri = uri or experience_uri()
        self.run_id = run_id
        self.source = source
        self.writer_id = writer_id or (
            f"experience/{run_id}/{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        )
        self.flush_rows = flush_rows
        self.files_per_partition = files_per_partition
        self.batches_written = 0
        self.rows_written = 0
        self._buffer: list[pa.Table] = []
        self._buffered = 0
        ensure_table(self.uri, SCHEMA, partition_by=PARTITION_BY)

    def add(self, transitions: Transitions) -> None:
        table = transitions.to_arrow(run_id=self.run_id, source=self.source)
        self._buffer.append(table)
        self._buffered += table.num_rows
        if self._buffered >= self.flush_rows:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        data = pa.concat_tables(self._buffer)
        self.write_batch(data, batch=self.batches_written)
        self._buffer, self._buffered = [], 0

    def write_batch(self, data: pa.Table, *, batch: int) -> bool:
        """Append one prepared batch under this writer's id (idempotent on ``batch``)."""
        written = append_files(
            self.uri,
            data,
            writer_id=self.writer_id,
            batch=batch,
            schema=SCHEMA,
            partition_by=PARTITION_BY,
            parquet_options=PARQUET_OPTIONS,
            files_per_partition=self.files_per_partition,
        )
        self.batches_written = max(self.batches_written, batch + 1)
        if written:
            self.rows_written += data.num_rows
        return written

    def __enter__(self) -> ExperienceWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.flush()


# ---------------------------------------------------------------------- reading
def filter_expression(
    *,
    sources: Sequence[str] | None = None,
    policy_versions: Sequence[str] | None = None,
    agents: Sequence[str] | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    run_ids: Sequence[str] | None = None,
    episodes: Sequence[str] | None = None,
) -> ds.Expression | None:
    """A dataset filter; ``source`` and ``date`` are partition columns, so those terms prune
    whole folders before any file is opened."""
    terms = []
    if sources:
        unknown = set(sources) - set(SOURCES)
        if unknown:
            raise StorageError(f"unknown source {sorted(unknown)}; sources are {SOURCES}")
        terms.append(ds.field("source").isin(list(sources)))
    if policy_versions:
        terms.append(ds.field("policy_version").isin(list(policy_versions)))
    if agents:
        terms.append(ds.field("agent").isin(list(agents)))
    if run_ids:
        terms.append(ds.field("run_id").isin(list(run_ids)))
    if episodes:
        terms.append(ds.field("episode").isin(list(episodes)))
    if since is not None:
        since = _utc(since)
        terms.append(ds.field("date") >= since.strftime("%Y-%m-%d"))
        terms.append(ds.field("timestamp") >= pa.scalar(since, pa.timestamp("us", tz="UTC")))
    if until is not None:
        until = _utc(until)
        terms.append(ds.field("date") <= until.strftime("%Y-%m-%d"))
        terms.append(ds.field("timestamp") < pa.scalar(until, pa.timestamp("us", tz="UTC")))
    if not terms:
        return None
    expr = terms[0]
    for t in terms[1:]:
        expr = expr & t
    return expr


def _utc(t: datetime) -> datetime:
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


class ReplaySampler:
    """Reads filtered slices of the experience table (as Arrow) and samples from them."""

    def __init__(self, uri: str | None = None, *, version: int | None = None):
        self.uri = uri or experience_uri()
        table = open_table(self.uri, version=version)
        if table is None:
            raise StorageError(
                f"no experience table at {self.uri}; record some with "
                "`pipemedic experience record` or train with experience logging on"
            )
        self.table = table
        self.dataset = table.to_pyarrow_dataset()

    def read(self, *, columns: Sequence[str] | None = None, **filters) -> pa.Table:
        """Every transition matching the filters (see ``filter_expression``)."""
        return self.dataset.to_table(
            columns=list(columns) if columns else None, filter=filter_expression(**filters)
        )

    def count(self, **filters) -> int:
        return self.dataset.count_rows(filter=filter_expression(**filters))

    def sample(
        self, n: int, *, seed: int = 0, columns: Sequence[str] | None = None, **filters
    ) -> pa.Table:
        """``n`` transitions drawn uniformly without replacement from the filtered slice (all of
        them when the slice is smaller). Only the filter columns are read to find the slice."""
        key = self.read(columns=["episode", "step", "agent"], **filters)
        if key.num_rows <= n:
            return self.read(columns=columns, **filters)
        rng = np.random.default_rng(seed)
        picked = np.sort(rng.choice(key.num_rows, size=n, replace=False))
        full = self.read(columns=columns, **filters)  # same filter, same order
        return full.take(pa.array(picked))


# ---------------------------------------------------------------------- operations
def stats(uri: str | None = None) -> dict:
    """Rows by source and policy version, files, bytes and the table version."""
    uri = uri or experience_uri()
    table = open_table(uri)
    if table is None:
        raise StorageError(f"no experience table at {uri}")
    data = table.to_pyarrow_dataset().to_table(columns=["source", "policy_version", "date"])
    groups = data.group_by(["source", "policy_version"]).aggregate([("date", "count")])
    files = pa.table(table.get_add_actions(flatten=True)).to_pydict()
    dates = sorted(set(data.column("date").to_pylist())) if data.num_rows else []
    return {
        "uri": uri,
        "version": table.version(),
        "rows": data.num_rows,
        "files": len(files.get("path", [])),
        "bytes": int(sum(files.get("size_bytes", []))),
        "first_date": dates[0] if dates else None,
        "last_date": dates[-1] if dates else None,
        "by_source_and_version": sorted(
            (
                {"source": s, "policy_version": v, "rows": c}
                for s, v, c in zip(
                    groups.column("source").to_pylist(),
                    groups.column("policy_version").to_pylist(),
                    groups.column("date_count").to_pylist(),
                    strict=True,
                )
            ),
            key=lambda r: (r["source"], str(r["policy_version"])),
        ),
    }


def compact(uri: str | None = None, *, target_file_mb: int = 128) -> dict:
    """Rewrite small files into larger ones (many small batches make many small files)."""
    uri = uri or experience_uri()
    table = _require(uri)
    result = table.optimize.compact(
        target_size=target_file_mb * 1024 * 1024, writer_properties=COMPACT_PROPERTIES
    )
    return {k: result.get(k) for k in ("numFilesAdded", "numFilesRemoved")}


def expire(uri: str | None = None, *, keep_days: int) -> int:
    """Delete transitions from days older than ``keep_days`` (a retention setting)."""
    uri = uri or experience_uri()
    table = _require(uri)
    cutoff = (datetime.now(UTC) - timedelta(days=keep_days)).strftime("%Y-%m-%d")
    result = table.delete(predicate=f"date < '{cutoff}'")
    return int(result.get("num_deleted_rows", 0) or 0)


def vacuum(uri: str | None = None, *, retain_hours: int = 168, dry_run: bool = False) -> list[str]:
    """Delete files no current table version needs and that are older than ``retain_hours``:
    files replaced by compaction or deletes, and orphans from writers killed mid-write (a
    *full* vacuum, since no log entry names them). Keep ``retain_hours`` above the longest
    write and the oldest time-travel read you need. Returns the paths (relative to the table).

    On a local store a writer killed *during* an upload also leaves the upload's staging file
    (``part-....parquet#1``), which delta-rs's vacuum does not recognise as table data; those
    are removed here too, under the same age rule. (On S3 an interrupted multipart upload
    leaves no object, only parts that a bucket lifecycle rule should abort.)"""
    uri = uri or experience_uri()
    table = _require(uri)
    deleted = table.vacuum(
        retention_hours=retain_hours,
        dry_run=dry_run,
        enforce_retention_duration=False,
        full=True,
    )
    if not is_remote(uri):
        root = Path(uri)
        cutoff = time.time() - retain_hours * 3600
        for staged in root.rglob("*#*"):
            relative = staged.relative_to(root)
            if "_delta_log" in relative.parts or not _STAGING.fullmatch(staged.name):
                continue
            if staged.is_file() and staged.stat().st_mtime <= cutoff:
                if not dry_run:
                    staged.unlink()
                deleted.append(str(relative))
    return deleted


# object_store's local uploads write NAME#N, then rename it to NAME when complete.
_STAGING = re.compile(r".+\.parquet#\d+")


def _require(uri: str):
    table = open_table(uri)
    if table is None:
        raise StorageError(f"no table at {uri}")
    return table
