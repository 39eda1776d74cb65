"""The experience table: exact round trips, bad input, concurrent and killed writers,
compaction and vacuum, replay filters, and a third-party engine reading it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from deltalake import DeltaTable

from checkpoints.experience import (
    SCHEMA,
    ExperienceWriter,
    ReplaySampler,
    Transitions,
    compact,
    stats,
    vacuum,
)
from checkpoints.storage import append_batch
from envs.errors import StorageError

ROOT = Path(__file__).resolve().parents[1]


def transitions(n: int, *, seed: int = 0, obs_size: int = 7, prefix: str = "ep") -> Transitions:
    rng = np.random.default_rng(seed)
    return Transitions(
        episode=[f"{prefix}-{i // 10}" for i in range(n)],
        step=np.arange(n) % 10,
        agent=["master" if i % 3 else "infra" for i in range(n)],
        observation=rng.standard_normal((n, obs_size)).astype(np.float32),
        next_observation=rng.standard_normal((n, obs_size)).astype(np.float32),
        action_mask=rng.random((n, 5)) > 0.3,
        action=rng.integers(0, 5, n),
        action_prob=rng.random(n).astype(np.float32),
        reward=rng.standard_normal(n).astype(np.float32),
        terminated=np.zeros(n, dtype=bool),
        truncated=(np.arange(n) % 10) == 9,
        policy_version="hierarchical:v1",
        scenario="memory-leak",
    )


def test_transitions_round_trip_value_for_value(tmp_path):
    uri = str(tmp_path / "experience")
    batch = transitions(50)
    # Rows of different observation sizes and one without a next observation (a production
    # decision whose outcome is not known yet) in the same batch.
    batch.observation = [*batch.observation[:49], np.arange(3, dtype=np.float32)]
    batch.next_observation = [*batch.next_observation[:49], None]
    stamp = datetime(2026, 11, 20, 12, 30, 15, 123456, tzinfo=UTC)
    batch.timestamp = stamp
    with ExperienceWriter(run_id="r1", source="prod", uri=uri) as w:
        w.add(batch)
    back = ReplaySampler(uri).read().sort_by([("episode", "ascending"), ("step", "ascending")])
    assert back.num_rows == 50
    for i in range(50):
        row = {k: back.column(k)[i].as_py() for k in SCHEMA.names}
        assert row["observation"] == batch.observation[i].tolist()  # float32 values, exactly
        nxt = batch.next_observation[i]
        assert row["next_observation"] == (None if nxt is None else nxt.tolist())
        assert row["action_mask"] == batch.action_mask[i].tolist()
        assert row["action"] == int(batch.action[i]) and row["step"] == int(batch.step[i])
        assert np.float32(row["reward"]) == batch.reward[i]
        assert np.float32(row["action_prob"]) == batch.action_prob[i]
        assert row["truncated"] == bool(batch.truncated[i]) and row["terminated"] is False
        assert row["episode"] == batch.episode[i] and row["agent"] == batch.agent[i]
        assert (row["source"], row["run_id"], row["date"]) == ("prod", "r1", "2026-11-20")
        assert row["timestamp"] == stamp
        assert row["policy_version"] == "hierarchical:v1" and row["scenario"] == "memory-leak"


def test_a_large_batch_is_encoded_as_several_files_in_one_commit_per_partition(tmp_path):
    """``append_files`` splits each partition's rows over several files written at once, and
    commits them together: one table version per batch, every row once, rows of two days in
    their own partitions."""
    from checkpoints.experience import PARQUET_OPTIONS, PARTITION_BY
    from checkpoints.storage import append_files, ensure_table

    uri = str(tmp_path / "experience")
    ensure_table(uri, SCHEMA, partition_by=PARTITION_BY)
    batch = transitions(3000, seed=4)
    batch.timestamp = [datetime(2026, 11, 20 + (i % 2), tzinfo=UTC) for i in range(3000)]
    data = batch.to_arrow(run_id="r", source="sim")
    kwargs = dict(
        schema=SCHEMA,
        partition_by=PARTITION_BY,
        parquet_options=PARQUET_OPTIONS,
        files_per_partition=3,
        min_rows_per_file=400,
    )
    assert append_files(uri, data, writer_id="w", batch=0, **kwargs)
    assert not append_files(uri, data, writer_id="w", batch=0, **kwargs)  # a retry: skipped
    table = DeltaTable(uri)
    assert table.version() == 1  # created, then one commit
    files = table.file_uris()
    assert len(files) == 6 and sum("date=2026-11-20" in f for f in files) == 3
    back = ReplaySampler(uri).read()
    assert back.num_rows == 3000
    key = [("episode", "ascending"), ("step", "ascending"), ("date", "ascending")]
    assert back.select(SCHEMA.names).sort_by(key).equals(data.sort_by(key))


def test_bad_transitions_are_refused_with_the_field_named_and_nothing_written(tmp_path):
    uri = str(tmp_path / "experience")
    writer = ExperienceWriter(run_id="r", source="sim", uri=uri)
    bad = transitions(10)
    bad.reward = np.array([0.0] * 9 + [np.nan])
    with pytest.raises(StorageError, match=r"field 'reward' is not finite at row 9"):
        writer.add(bad)
    short = transitions(10)
    short.action = short.action[:8]
    with pytest.raises(StorageError, match=r"field 'action' has 8 rows, expected 10"):
        writer.add(short)
    with pytest.raises(StorageError, match=r"source must be one of"):
        ExperienceWriter(run_id="r", source="production", uri=uri)  # type: ignore[arg-type]
    writer.flush()
    assert ReplaySampler(uri).count() == 0
    # A table of another shape cannot take the batch: a clear error, not a retry loop.
    wrong = pa.table({"x": [1, 2]})
    with pytest.raises(StorageError, match="does not fit"):
        append_batch(uri, wrong, writer_id="w", batch=0)


def test_a_retried_batch_is_written_once(tmp_path):
    uri = str(tmp_path / "experience")
    writer = ExperienceWriter(run_id="r", source="sim", uri=uri, writer_id="writer-1")
    data = transitions(20).to_arrow(run_id="r", source="sim")
    assert writer.write_batch(data, batch=0) is True
    # The caller saw an error after the commit went in (a timeout), and tries again.
    assert writer.write_batch(data, batch=0) is False
    assert writer.write_batch(data, batch=1) is True
    assert ReplaySampler(uri).count() == 40
    assert DeltaTable(uri).transaction_version("writer-1") == 1


WRITER_SCRIPT = textwrap.dedent(
    """
    import sys, numpy as np
    sys.path.insert(0, {root!r})
    from tests.test_experience import transitions
    from checkpoints.experience import ExperienceWriter
    uri, wid, batches, rows = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    w = ExperienceWriter(run_id="concurrent", source="sim", uri=uri, writer_id=wid)
    for b in range(batches):
        data = transitions(rows, seed=b, prefix=wid + "-" + str(b)).to_arrow(
            run_id="concurrent", source="sim")
        w.write_batch(data, batch=b)
        if b == 1:
            w.write_batch(data, batch=b)  # a retry of a batch already in: must be a no-op
    print("done", wid)
    """
)


def test_eight_processes_appending_at_once_lose_and_duplicate_nothing(tmp_path):
    uri = str(tmp_path / "experience")
    ExperienceWriter(run_id="setup", source="sim", uri=uri)  # creates the empty table
    script = tmp_path / "writer.py"
    script.write_text(WRITER_SCRIPT.format(root=str(ROOT)))
    writers, batches, rows = 8, 6, 300
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), uri, f"w{i}", str(batches), str(rows)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(writers)
    ]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out
    table = DeltaTable(uri)
    data = table.to_pyarrow_table(columns=["episode", "step"])
    assert data.num_rows == writers * batches * rows
    keys = {
        (e, s) for e, s in zip(data["episode"].to_pylist(), data["step"].to_pylist(), strict=True)
    }
    # transitions() makes episode names unique per (writer, batch); each holds 10 steps.
    assert len(keys) == writers * batches * rows
    versions = sorted(h["version"] for h in table.history())
    assert versions == list(range(writers * batches + 1))  # contiguous: create + one per batch
    for i in range(writers):
        assert table.transaction_version(f"w{i}") == batches - 1


KILLED_WRITER = textwrap.dedent(
    """
    import sys
    from datetime import UTC, datetime, timedelta
    sys.path.insert(0, {root!r})
    from tests.test_experience import transitions
    from checkpoints.experience import ExperienceWriter
    uri = sys.argv[1]
    w = ExperienceWriter(run_id="killed", source="sim", uri=uri, writer_id="victim")
    batch = transitions(40_000, obs_size=230, prefix="big")
    # Spread over 40 days: one Parquet file per day partition, uploaded one after another
    # before the commit, so most of a write's time is spent where a kill leaves orphans.
    start = datetime(2026, 1, 1, tzinfo=UTC)
    batch.timestamp = [start + timedelta(days=i % 40) for i in range(40_000)]
    data = batch.to_arrow(run_id="killed", source="sim")
    b = 0
    while True:
        w.write_batch(data, batch=b)
        print("committed", b, flush=True)
        b += 1
    """
)


def _data_files(root: Path) -> set[str]:
    """Every file of the table folder except the Delta log (Parquet files and any half-written
    upload a kill leaves behind)."""
    return {
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and "_delta_log" not in p.parts
    }


def test_a_writer_killed_mid_append_leaves_a_clean_table_and_vacuum_removes_its_orphans(
    tmp_path,
):
    root = tmp_path / "experience"
    uri = str(root)
    script = tmp_path / "killed.py"
    script.write_text(KILLED_WRITER.format(root=str(ROOT)))
    proc = subprocess.Popen([sys.executable, str(script), uri], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("committed"), "the writer never committed"
    committed = _data_files(root)
    # The next batch uploads its 40 day-partition files one after another, then commits: kill
    # the writer as soon as the first of them appears, so the kill lands inside the write.
    deadline = time.monotonic() + 120
    while _data_files(root) == committed:
        assert time.monotonic() < deadline and proc.poll() is None, "the writer stopped writing"
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    table = DeltaTable(uri)
    referenced = {str(Path(f).relative_to(root)) for f in table.file_uris()}
    orphans = _data_files(root) - referenced
    assert orphans, "the kill left no files behind"
    # Readers see only whole batches: one committed batch of 40,000 rows, none of the orphans.
    assert table.version() == 1
    assert table.to_pyarrow_table(columns=["episode"]).num_rows == 40_000
    deleted = vacuum(uri, retain_hours=0)
    assert set(deleted) >= orphans  # Parquet files and any half-done upload (NAME.parquet#1)
    table = DeltaTable(uri)
    assert _data_files(root) == {str(Path(f).relative_to(root)) for f in table.file_uris()}
    assert table.to_pyarrow_table(columns=["episode"]).num_rows == 40_000


def test_compaction_merges_small_batches_without_changing_the_rows(tmp_path):
    uri = str(tmp_path / "experience")
    writer = ExperienceWriter(run_id="r", source="sim", uri=uri, flush_rows=10)
    for b in range(12):
        writer.add(transitions(10, seed=b, prefix=f"b{b}"))
    before = stats(uri)
    assert before["files"] == 12 and before["rows"] == 120
    result = compact(uri)
    assert result["numFilesRemoved"] == 12 and result["numFilesAdded"] == 1
    after = stats(uri)
    assert after["files"] == 1 and after["rows"] == 120
    assert len(vacuum(uri, retain_hours=0)) == 12  # the replaced small files


def test_replay_filters_by_source_version_and_time_window(tmp_path):
    uri = str(tmp_path / "experience")
    now = datetime.now(UTC)
    for source, version, when, n in [
        ("sim", "oracle", now - timedelta(days=3), 30),
        ("sim", "hierarchical:v1", now - timedelta(hours=1), 20),
        ("shadow", "hierarchical:v1", now - timedelta(hours=2), 10),
        ("prod", "hierarchical:v2", now, 5),
    ]:
        batch = transitions(n, prefix=f"{source}-{version}")
        batch.policy_version = version
        batch.timestamp = when
        with ExperienceWriter(run_id="r", source=source, uri=uri) as w:
            w.add(batch)
    sampler = ReplaySampler(uri)
    assert sampler.count() == 65
    assert sampler.count(sources=["sim"]) == 50
    assert sampler.count(policy_versions=["hierarchical:v1"]) == 30
    assert sampler.count(since=now - timedelta(days=1)) == 35
    assert sampler.count(since=now - timedelta(days=1), sources=["sim", "shadow"]) == 30
    assert sampler.count(until=now - timedelta(days=1)) == 30
    sample = sampler.sample(7, seed=1, sources=["sim"], policy_versions=["oracle"])
    assert sample.num_rows == 7 and set(sample["policy_version"].to_pylist()) == {"oracle"}
    assert sampler.sample(100, sources=["prod"]).num_rows == 5
    with pytest.raises(StorageError, match="unknown source"):
        sampler.count(sources=["production"])
    by = {
        (r["source"], r["policy_version"]): r["rows"] for r in stats(uri)["by_source_and_version"]
    }
    assert by == {
        ("prod", "hierarchical:v2"): 5,
        ("shadow", "hierarchical:v1"): 10,
        ("sim", "hierarchical:v1"): 20,
        ("sim", "oracle"): 30,
    }


def test_duckdb_reads_the_table_from_the_files_the_delta_log_names(tmp_path):
    duckdb = pytest.importorskip("duckdb")
    uri = str(tmp_path / "experience")
    batch = transitions(40)
    with ExperienceWriter(run_id="r", source="sim", uri=uri) as w:
        w.add(batch)
    files = DeltaTable(uri).file_uris()
    con = duckdb.connect()
    rel = con.read_parquet(files, hive_partitioning=True)
    con.register("experience", rel)
    rows = con.execute(
        "SELECT episode, step, agent, action, reward, observation, source, date "
        "FROM experience ORDER BY episode, step"
    ).fetchall()
    assert len(rows) == 40
    for episode, step, agent, action, reward, observation, source, date in rows:
        i = int(episode.split("-")[1]) * 10 + step
        assert agent == batch.agent[i] and action == batch.action[i]
        assert np.float32(reward) == batch.reward[i]
        assert np.array_equal(np.array(observation, dtype=np.float32), batch.observation[i])
        assert source == "sim" and str(date) == datetime.now(UTC).strftime("%Y-%m-%d")
    mean = con.execute("SELECT avg(reward) FROM experience WHERE agent = 'infra'").fetchone()[0]
    infra = np.array([a == "infra" for a in batch.agent])
    assert mean == pytest.approx(float(batch.reward[infra].astype(np.float64).mean()), rel=1e-6)


def test_vacuum_removes_stale_upload_staging_files_and_keeps_fresh_ones(tmp_path):
    # What a writer killed during an upload leaves on a local store: NAME.parquet#1, never
    # renamed to NAME.parquet. delta-rs's vacuum does not see it as table data.
    uri = str(tmp_path / "experience")
    with ExperienceWriter(run_id="r", source="sim", uri=uri) as w:
        w.add(transitions(10))
    folder = next((tmp_path / "experience").rglob("date=*"))
    stale = folder / "part-00000-dead-c000.parquet#1"
    fresh = folder / "part-00000-live-c000.parquet#1"
    stale.write_bytes(b"PAR1 half an upload")
    fresh.write_bytes(b"PAR1 still uploading")
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))
    assert str(stale.relative_to(tmp_path / "experience")) in vacuum(
        uri, retain_hours=1, dry_run=True
    )
    assert stale.exists()
    deleted = vacuum(uri, retain_hours=1)
    assert str(stale.relative_to(tmp_path / "experience")) in deleted
    assert not stale.exists() and fresh.exists()  # an upload in progress is left alone
    assert ReplaySampler(uri).count() == 10
