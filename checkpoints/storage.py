"""Where the Delta tables live, and appends that survive contention, retries and crashes.

The store is a folder or an object-store prefix: ``PIPEMEDIC_STORE_URI`` (default ``./store``,
git-ignored). Tables sit under ``STORE/tables/NAME``. For ``s3://``, ``gs://``, ``az://`` and the
other schemes delta-rs supports, credentials and endpoints come from the environment only
(``AWS_*``, ``GOOGLE_*``, ``AZURE_*``, plus ``PIPEMEDIC_STORAGE_OPTIONS`` as a JSON object for
anything else), never from committed files.

Why ``append_batch`` and ``append_files`` exist: delta-rs retries a conflicting commit a fixed number of times with
no pause, so several writers appending at once can exhaust the retries and fail; and a writer
that retries after an error cannot tell whether its commit went in (an object-store timeout
after the log entry was written looks like a failure). Each batch therefore carries a Delta
*application transaction* ``(writer id, batch number)`` in the same commit as its rows: before
writing, and again before every retry, the writer asks the table for the last batch number it
committed and skips the batch if it is already there. Retries back off exponentially with
jitter. A writer killed mid-write leaves Parquet files no commit refers to: readers never see
them, and ``vacuum(full=True)`` deletes them (see ``checkpoints.experience``).

``append_batch`` writes through delta-rs's own writer (small tables: checkpoints, promotions);
``append_files`` encodes the Parquet files with pyarrow, several at once, and commits them in
one commit through delta-rs (the experience table, where encoding is the cost of an append).
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from deltalake import CommitProperties, DeltaTable, Transaction, WriterProperties, write_deltalake
from deltalake.exceptions import (
    CommitFailedError,
    DeltaError,
    SchemaMismatchError,
    TableNotFoundError,
)
from deltalake.fs import DeltaStorageHandler
from deltalake.transaction import AddAction

from envs.errors import StorageError

log = logging.getLogger(__name__)

STORE_ENV = "PIPEMEDIC_STORE_URI"
OPTIONS_ENV = "PIPEMEDIC_STORAGE_OPTIONS"
DEFAULT_STORE = "store"
_CREDENTIAL_PREFIXES = ("AWS_", "GOOGLE_", "AZURE_")


def store_uri() -> str:
    """The store's root: ``PIPEMEDIC_STORE_URI`` or ``./store`` (made absolute)."""
    uri = os.environ.get(STORE_ENV, DEFAULT_STORE)
    return uri if is_remote(uri) else str(Path(uri).resolve())


def local_store_dir() -> Path:
    """A local folder for run artefacts (RLlib checkpoints, metrics, plots): the store itself
    when it is a local path, ``./store`` when the tables live in an object store."""
    uri = os.environ.get(STORE_ENV, DEFAULT_STORE)
    return Path(DEFAULT_STORE if is_remote(uri) else uri)


def is_remote(uri: str) -> bool:
    """True for an object-store URI (``s3://...``); a local path otherwise."""
    return "://" in uri and not uri.startswith("file://")


def table_uri(name: str, root: str | None = None) -> str:
    """URI of the table ``name`` under the store root."""
    root = (root or store_uri()).rstrip("/")
    return f"{root}/tables/{name}"


def storage_options(uri: str) -> dict[str, str] | None:
    """Options delta-rs needs for an object store, from the environment; None for local paths."""
    if not is_remote(uri):
        return None
    options = {
        key.lower(): value
        for key, value in os.environ.items()
        if key.startswith(_CREDENTIAL_PREFIXES) and value
    }
    extra = os.environ.get(OPTIONS_ENV)
    if extra:
        try:
            parsed = json.loads(extra)
        except json.JSONDecodeError as exc:
            raise StorageError(f"{OPTIONS_ENV} is not a JSON object: {exc}") from None
        if not isinstance(parsed, dict):
            raise StorageError(f"{OPTIONS_ENV} must be a JSON object, got {type(parsed).__name__}")
        options.update({str(k): str(v) for k, v in parsed.items()})
    return options


def open_table(uri: str, *, version: int | None = None) -> DeltaTable | None:
    """The table at ``uri``, or None when no table exists there yet."""
    try:
        return DeltaTable(uri, version=version, storage_options=storage_options(uri))
    except TableNotFoundError:
        return None
    except (DeltaError, OSError) as exc:
        raise StorageError(f"cannot open the Delta table at {uri}: {exc}") from exc


def ensure_table(uri: str, schema: pa.Schema, *, partition_by: list[str] | None = None) -> None:
    """Create an empty table with ``schema`` unless one exists (safe if several try at once)."""
    for attempt in range(8):
        if open_table(uri) is not None:
            return
        try:
            DeltaTable.create(
                uri,
                schema,
                partition_by=partition_by,
                mode="ignore",
                storage_options=storage_options(uri),
            )
            return
        except (CommitFailedError, DeltaError, OSError) as exc:
            if attempt == 7:
                raise StorageError(f"cannot create the Delta table at {uri}: {exc}") from exc
            _pause(attempt)  # another process created it at the same moment


def append_batch(
    uri: str,
    data: pa.Table,
    *,
    writer_id: str,
    batch: int,
    partition_by: list[str] | None = None,
    writer_properties: WriterProperties | None = None,
    attempts: int = 10,
    base_delay_s: float = 0.05,
) -> bool:
    """Append ``data`` as batch number ``batch`` of ``writer_id``, at most once, through
    delta-rs's writer.

    Batch numbers of one writer must increase. Returns True if this call committed the rows,
    False if the table already held that batch (an earlier attempt went in). Raises
    ``StorageError`` after ``attempts`` failed tries, with the last error.
    """
    options = storage_options(uri)

    def commit(table: DeltaTable | None) -> None:
        write_deltalake(
            table if table is not None else uri,
            data,
            mode="append",
            partition_by=partition_by,
            storage_options=options,
            writer_properties=writer_properties,
            commit_properties=CommitProperties(app_transactions=[Transaction(writer_id, batch)]),
        )

    return _exactly_once(uri, writer_id, batch, commit, attempts, base_delay_s)


def append_files(
    uri: str,
    data: pa.Table,
    *,
    writer_id: str,
    batch: int,
    schema: pa.Schema,
    partition_by: list[str],
    parquet_options: dict[str, Any],
    files_per_partition: int = 2,
    min_rows_per_file: int = 10_000,
    attempts: int = 10,
    base_delay_s: float = 0.05,
) -> bool:
    """``append_batch`` for large batches: the Parquet files are encoded by pyarrow, several at
    once in threads (the encoder releases the GIL), then committed in one Delta commit with the
    same application transaction, so the batch is still all-or-nothing and exactly once.

    delta-rs's writer encodes one partition's rows on one core; list columns of floats make
    that the whole cost of an append (see ``pipemedic bench store``). A partition's rows are
    split into up to ``files_per_partition`` files of at least ``min_rows_per_file`` rows (small
    batches stay one file). The table must exist (``ensure_table``). Files a failed commit
    leaves behind are orphans that readers never see and ``vacuum`` deletes; a retry commits
    the files already written.
    """
    for name in partition_by:
        if data.column(name).null_count:
            raise StorageError(f"batch {batch} of {writer_id}: partition column {name!r} has nulls")
    actions: list[AddAction] = []

    def commit(table: DeltaTable | None) -> None:
        if table is None:
            raise StorageError(f"no Delta table at {uri}: create it before appending files")
        if not actions:
            actions.extend(
                _write_parquet_files(
                    uri,
                    data,
                    partition_by,
                    parquet_options,
                    batch,
                    files_per_partition=files_per_partition,
                    min_rows_per_file=min_rows_per_file,
                )
            )
        table.create_write_transaction(
            actions,
            mode="append",
            schema=schema,
            partition_by=partition_by,
            commit_properties=CommitProperties(app_transactions=[Transaction(writer_id, batch)]),
        )

    return _exactly_once(uri, writer_id, batch, commit, attempts, base_delay_s)


def _exactly_once(
    uri: str,
    writer_id: str,
    batch: int,
    commit: Callable[[DeltaTable | None], None],
    attempts: int,
    base_delay_s: float,
) -> bool:
    """Run ``commit`` until it goes in, unless the table already records ``batch`` of
    ``writer_id`` (checked before the first try and before every retry)."""
    if batch < 0:
        raise ValueError(f"batch numbers start at 0, got {batch}")
    last_error: Exception | None = None
    for attempt in range(attempts):
        try:
            table = open_table(uri)
            if table is not None:
                done = table.transaction_version(writer_id)
                if done is not None and done >= batch:
                    return False
            commit(table)
            return True
        except SchemaMismatchError as exc:  # bad input: retrying cannot help
            raise StorageError(f"batch {batch} of {writer_id} does not fit {uri}: {exc}") from exc
        except (CommitFailedError, DeltaError, OSError, StorageError) as exc:
            last_error = exc
            log.info(
                "append of %s batch %d failed (try %d): %s", writer_id, batch, attempt + 1, exc
            )
            _pause(attempt, base_delay_s)
    raise StorageError(
        f"could not append batch {batch} of {writer_id} to {uri} after {attempts} tries: "
        f"{last_error}"
    )


def _write_parquet_files(
    uri: str,
    data: pa.Table,
    partition_by: list[str],
    parquet_options: dict[str, Any],
    batch: int,
    *,
    files_per_partition: int,
    min_rows_per_file: int,
) -> list[AddAction]:
    """Write ``data`` as Parquet files under the table's hive-style partition folders, several
    files at once; return the Delta add actions describing them."""
    if is_remote(uri):
        filesystem = pafs.PyFileSystem(DeltaStorageHandler(uri, storage_options(uri)))
        root = ""
    else:
        filesystem = pafs.LocalFileSystem()
        root = str(Path(uri).resolve()) + "/"
    keys = data.select(partition_by).group_by(partition_by).aggregate([]).to_pylist()
    jobs = []
    for key in keys:
        part = data
        if len(keys) > 1:
            mask = None
            for name, value in key.items():
                term = pc.equal(data.column(name), value)
                mask = term if mask is None else pc.and_(mask, term)
            part = data.filter(mask)
        part = part.drop_columns(partition_by)
        folder = "/".join(f"{k}={quote(str(v), safe='')}" for k, v in key.items())
        files = max(1, min(files_per_partition, part.num_rows // min_rows_per_file))
        step = -(-part.num_rows // files)
        for j, start in enumerate(range(0, part.num_rows, step)):
            name = f"{folder}/part-{batch:06d}-{uuid.uuid4().hex}-{j}.parquet"
            jobs.append((name, {k: str(v) for k, v in key.items()}, part.slice(start, step)))

    def write(job) -> AddAction:
        name, values, rows = job
        filesystem.create_dir(root + name.rsplit("/", 1)[0], recursive=True)
        with filesystem.open_output_stream(root + name) as sink:
            pq.write_table(rows, sink, **parquet_options)
            size = sink.tell()
        return AddAction(
            path=name,
            size=size,
            partition_values=values,
            modification_time=int(time.time() * 1000),
            data_change=True,
            stats=json.dumps({"numRecords": rows.num_rows}),
        )

    with ThreadPoolExecutor(max_workers=min(len(jobs), files_per_partition)) as pool:
        return list(pool.map(write, jobs))


def _pause(attempt: int, base_delay_s: float = 0.05) -> None:
    """Exponential backoff with full jitter, capped at 2 s."""
    time.sleep(random.uniform(0, min(2.0, base_delay_s * 2**attempt)))
