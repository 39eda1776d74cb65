"""The store on S3: both tables through ``s3://`` against moto's standalone S3 server on
loopback, with credentials and endpoint taken from the environment only."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from checkpoints.experience import ExperienceWriter, ReplaySampler
from checkpoints.policies import CheckpointStore
from checkpoints.storage import storage_options
from envs.errors import StorageError
from tests.test_checkpoints import make_nets, publish
from tests.test_experience import transitions

pytest.importorskip("moto")
boto3 = pytest.importorskip("boto3")


@pytest.fixture(scope="module")
def s3_endpoint():
    """``python -m moto.server`` on a free loopback port; yields its URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                pytest.fail("moto's S3 server did not start")
            time.sleep(0.2)
    yield url
    server.terminate()
    server.wait(timeout=10)


@pytest.fixture
def s3_store(s3_endpoint, monkeypatch):
    """A fresh bucket; the store URI and credentials set only in the environment."""
    bucket = f"medic-{time.monotonic_ns()}"
    env = {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_ALLOW_HTTP": "true",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(
        Bucket=bucket
    )
    uri = f"s3://{bucket}/pipemedic"
    monkeypatch.setenv("PIPEMEDIC_STORE_URI", uri)
    return uri


def test_storage_options_come_from_the_environment(s3_store, monkeypatch):
    options = storage_options(s3_store)
    assert options["aws_endpoint_url"].startswith("http://127.0.0.1:")
    assert options["aws_access_key_id"] == "test"
    assert storage_options("/a/local/path") is None
    monkeypatch.setenv("PIPEMEDIC_STORAGE_OPTIONS", "[1, 2]")
    with pytest.raises(StorageError, match="must be a JSON object"):
        storage_options(s3_store)


def test_experience_round_trips_through_s3_and_retries_are_written_once(s3_store):
    batch = transitions(60)
    writer = ExperienceWriter(run_id="s3", source="shadow", writer_id="s3-writer")
    data = batch.to_arrow(run_id="s3", source="shadow")
    assert writer.write_batch(data, batch=0) is True
    assert writer.write_batch(data, batch=0) is False
    sampler = ReplaySampler()
    assert sampler.uri.startswith("s3://")
    back = sampler.read(sources=["shadow"]).sort_by(
        [("episode", "ascending"), ("step", "ascending")]
    )
    assert back.num_rows == 60
    obs = np.stack(back.column("observation").to_numpy(zero_copy_only=False))
    assert np.array_equal(obs, batch.observation)


def test_checkpoints_publish_promote_and_load_through_s3(s3_store):
    store = CheckpointStore()
    assert store.checkpoints_uri.startswith("s3://")
    nets = make_nets(3)
    version = publish(store, nets, iteration=1)
    store.promote("hierarchical", version)
    loaded = store.load_promoted("hierarchical")
    from agents.inference import weights_of

    assert loaded.version == version and loaded.weights == weights_of(nets)


def test_four_processes_appending_to_s3_at_once_lose_and_duplicate_nothing(s3_store, tmp_path):
    # The README says concurrent commits on S3 need no lock or unsafe-rename setting: checked
    # here, the same way as on a local folder (tests/test_experience.py).
    import subprocess as sp

    from deltalake import DeltaTable

    from checkpoints.experience import experience_uri
    from tests.test_experience import ROOT, WRITER_SCRIPT

    uri = experience_uri()
    ExperienceWriter(run_id="setup", source="sim", uri=uri)
    script = tmp_path / "writer.py"
    script.write_text(WRITER_SCRIPT.format(root=str(ROOT)))
    writers, batches, rows = 4, 4, 100
    procs = [
        sp.Popen(
            [sys.executable, str(script), uri, f"s3w{i}", str(batches), str(rows)],
            stdout=sp.PIPE,
            stderr=sp.STDOUT,
            text=True,
        )
        for i in range(writers)
    ]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out
    table = DeltaTable(uri, storage_options=storage_options(uri))
    data = table.to_pyarrow_table(columns=["episode", "step"])
    assert data.num_rows == writers * batches * rows
    keys = set(zip(data["episode"].to_pylist(), data["step"].to_pylist(), strict=True))
    assert len(keys) == writers * batches * rows
    assert sorted(h["version"] for h in table.history()) == list(range(writers * batches + 1))
