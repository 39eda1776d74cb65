"""Two replicas behind Ray Serve's HAProxy ingress: each pipeline is served by one replica.

The decision service keeps per-pipeline state in the replica (history, cooldowns, the decisions
feedback refers to). With ``pipemedic serve --ingress haproxy`` HAProxy picks the replica from
the ``X-Pipeline-Id`` header, so that state stays consistent with more than one replica. The
service runs in its own process and Ray (``tests.haproxy_service``), because Serve reads the
ingress settings when its processes start.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import requests

from serve.app import REPLICA_HEADER
from serve.bench import free_port
from serve.client import DecisionClient
from serve.settings import PIPELINE_HEADER
from tests.serve_helpers import biased_nets, publish_and_promote, snapshot

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = [f"etl-{i}" for i in range(12)]


@pytest.fixture(scope="module")
def haproxy_url(tmp_path_factory):
    store = str(tmp_path_factory.mktemp("haproxy-store"))
    publish_and_promote(store, biased_nets(logit=3.0), iteration=1)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.haproxy_service", store, str(free_port())],
        cwd=ROOT,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    # Lines are read in a thread, so a child that hangs without printing cannot hang the suite.
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    try:
        url = None
        while url is None:
            try:
                line = lines.get(timeout=240)
            except queue.Empty:
                pytest.fail("the HAProxy service printed nothing for 240 s and is not ready")
            if line.startswith("READY "):
                url = line.split()[1]
            elif proc.poll() is not None and lines.empty():
                pytest.fail(
                    f"the HAProxy service exited with {proc.returncode} before it was ready"
                )
        yield url
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _replica_of(url: str, pipeline: str) -> str:
    headers = {PIPELINE_HEADER: pipeline}
    r = requests.post(f"{url}/v1/decide", json=snapshot(pipeline), headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    return r.headers[REPLICA_HEADER]


def test_each_pipeline_is_answered_by_one_replica_and_pipelines_spread_over_both(haproxy_url):
    replicas = {p: {_replica_of(haproxy_url, p) for _ in range(3)} for p in PIPELINES}
    assert all(len(seen) == 1 for seen in replicas.values()), replicas
    assert len(set.union(*replicas.values())) == 2, replicas


def test_feedback_finds_its_decision_with_the_header_and_misses_it_without(haproxy_url):
    client = DecisionClient(haproxy_url, retries=0)
    decisions = [client.decide(snapshot(p)) for p in PIPELINES]
    answers = [client.feedback(d["decision_id"], "improved") for d in decisions]
    assert [a["recorded_rows"] for a in answers] == [2] * len(PIPELINES)

    # The same without the header: HAProxy spreads the requests, so feedback often reaches a
    # replica that never saw the decision (this is what the header is for).
    statuses = []
    for p in PIPELINES:
        d = requests.post(f"{haproxy_url}/v1/decide", json=snapshot(p), timeout=30).json()
        r = requests.post(
            f"{haproxy_url}/v1/feedback",
            json={"decision_id": d["decision_id"], "outcome": "improved"},
            timeout=30,
        )
        statuses.append(r.status_code)
    assert set(statuses) <= {200, 404} and 404 in statuses, statuses
