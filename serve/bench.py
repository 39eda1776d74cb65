"""``pipemedic bench serve``: decision latency and throughput, side by side in one run.

Four ways to reach the same policy and service code, measured one after the other:

1. in process: ``DecisionService.decide`` on a parsed request (and the same with JSON parsing
   and serialisation, what the HTTP layer adds in Python);
2. plain uvicorn: ``serve.app.create_plain_app`` in its own process (one worker);
3. Ray Serve through its front door on ``http_options.port``: the Python proxy, or in the
   HAProxy variants Ray Serve's HAProxy ingress;
4. Ray Serve direct ingress (``RAY_SERVE_ENABLE_DIRECT_INGRESS=1``): the replica answers HTTP
   itself on a port the controller hands out (30000 up).

3 and 4 run once per chosen entry of ``SERVE_VARIANTS`` (the config file as it is, with the
access log back on, without Ray's "throughput optimized" preset in the replicas, with the preset
in every Ray process, and the HAProxy ingress with its levers), each on a fresh Ray, and
``rounds`` times over.

HTTP load comes from ``wrk`` (C, keep-alive connections; Debian package ``wrk``) with a Lua
script that posts the snapshot and prints the latency percentiles as JSON. Every HTTP target
gets the same runs: one connection (latency) and 16 connections (throughput), then the batch
endpoint with 256 pipelines per request. The client shares this machine's two cores with the
server, so absolute figures are pessimistic; the ratios are what to read.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

from envs.errors import PipemedicError
from serve.settings import INGRESS_ENV, PIPELINE_HEADER

BATCH = 256
_LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["{header}"] = "{pipeline}"
wrk.body = io.open("{body}"):read("*a")
done = function(summary, latency, requests)
  io.write(string.format(
    '{{"requests": %d, "duration_us": %d, "errors": %d, "non_2xx": %d, ' ..
    '"p50_us": %d, "p99_us": %d}}\\n',
    summary.requests, summary.duration,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.errors.status, latency:percentile(50), latency:percentile(99)))
end
"""


BENCH_PIPELINE = "bench-pipeline"


def snapshot(pipeline_id: str = BENCH_PIPELINE) -> dict[str, Any]:
    """A realistic snapshot: five stages, a dozen metrics each, pipeline metrics and SLOs."""
    stage = {
        "throughput_in_rps": 120.0,
        "throughput_out_rps": 118.0,
        "queue": 400.0,
        "latency_p99_s": 2.5,
        "error_rate": 0.002,
        "timeout_rate": 0.001,
        "cpu": 0.82,
        "mem": 0.6,
        "replicas": 4,
        "replicas_ready": 4,
        "null_rate": 0.01,
        "dup_rate": 0.0,
    }
    return {
        "pipeline_id": pipeline_id,
        "stages": {s: dict(stage) for s in ("ingest", "validate", "transform", "load", "model")},
        "pipeline": {"e2e_latency_p99_s": 12.0, "e2e_error_rate": 0.003, "freshness_s": 60.0},
        "slo": {"p99_latency_s": 30.0, "error_rate": 0.01, "freshness_s": 120.0},
    }


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 120.0) -> None:
    """Wait until ``url/healthz`` answers 200 (a PipemedicError after ``timeout``)."""
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(url + "/healthz", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise PipemedicError(f"{url} did not answer /healthz within {timeout:.0f} s")


def wrk(url: str, body: bytes, *, connections: int, seconds: int, folder: Path) -> dict:
    """One wrk run; requests/s, p50/p99 latency (ms), and failed requests."""
    body_file = folder / f"body-{len(body)}.json"
    body_file.write_bytes(body)
    script = folder / f"post-{len(body)}.lua"
    script.write_text(_LUA.format(body=body_file, header=PIPELINE_HEADER, pipeline=BENCH_PIPELINE))
    threads = min(connections, 2)
    out = subprocess.run(
        [
            "wrk",
            f"-t{threads}",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            "-s",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    stats = json.loads(out.strip().splitlines()[-1])
    return {
        "rps": stats["requests"] / (stats["duration_us"] / 1e6),
        "p50_ms": stats["p50_us"] / 1000,
        "p99_ms": stats["p99_us"] / 1000,
        "failed": stats["errors"] + stats["non_2xx"],
    }


def _in_process(store: str, repeats: int) -> dict[str, Any]:
    from serve import schemas
    from serve.decider import DecisionService
    from serve.settings import ServiceSettings

    service = DecisionService(ServiceSettings(store_uri=store))
    body = json.dumps(snapshot()).encode()
    request = schemas.DecideRequest.model_validate_json(body)
    batch = schemas.DecideBatchRequest.model_validate(
        {"requests": [snapshot(f"p{i}") for i in range(BATCH)]}
    )

    def timed(fn, n):
        for _ in range(min(50, n)):
            fn()
        samples = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t)
        samples.sort()
        return samples[len(samples) // 2] * 1000, samples[int(len(samples) * 0.99)] * 1000

    out: dict[str, Any] = {"policy": service.policy.version}
    out["decide"] = timed(lambda: service.decide(request), repeats)
    out["decide_json"] = timed(
        lambda: service.decide(schemas.DecideRequest.model_validate_json(body)).model_dump_json(),
        repeats,
    )
    p50_batch, _ = timed(lambda: service.decide_many(batch.requests), max(10, repeats // 100))
    out["batch_decisions_per_s"] = BATCH / (p50_batch / 1000)
    return out


def bench_serve(
    *,
    seconds: int = 5,
    repeats: int = 2000,
    variants: Sequence[str] | None = None,
    rounds: int = 1,
) -> dict[str, Any]:
    """Run every measurement; returns the figures (``cluster.cli`` prints the table).

    ``variants`` picks Serve settings from ``SERVE_VARIANTS`` (default: all of them);
    ``rounds`` runs those variants that many times, one after the other in turn, each on a fresh
    Ray, so ``results["serve:LABEL"]`` is a list with one entry per round: on this 2-core
    machine the c=1 p99 of one setting has ranged over more than 2x from run to run."""
    variants = list(dict.fromkeys(variants or SERVE_VARIANTS))  # each once, in the order given
    unknown = [v for v in variants if v not in SERVE_VARIANTS]
    if unknown:
        raise PipemedicError(
            f"unknown serve variant(s) {unknown}; choose from {list(SERVE_VARIANTS)}"
        )
    if rounds < 1:
        raise PipemedicError(f"rounds must be at least 1, got {rounds}")
    if shutil.which("wrk") is None:
        raise PipemedicError(
            "the serving benchmark drives HTTP load with wrk: apt-get install -y wrk "
            "(or `make bench-serve`, which installs it)"
        )
    from checkpoints.policies import CheckpointStore

    folder = Path(tempfile.mkdtemp(prefix="pipemedic-bench-serve-"))
    store = os.environ.get("PIPEMEDIC_STORE_URI") or str(Path("store").resolve())
    if CheckpointStore(store).promoted_version("hierarchical") is None:
        store = _fresh_store(folder)
    results: dict[str, Any] = {"store": store, "in_process": _in_process(store, repeats)}
    single = json.dumps(snapshot()).encode()
    batch = json.dumps({"requests": [snapshot(f"p{i}") for i in range(BATCH)]}).encode()

    def measure(base: str) -> dict[str, Any]:
        row = {}
        wrk(base + "/v1/decide", single, connections=1, seconds=1, folder=folder)  # warm up
        row["c1"] = wrk(base + "/v1/decide", single, connections=1, seconds=seconds, folder=folder)
        row["c16"] = wrk(
            base + "/v1/decide", single, connections=16, seconds=seconds, folder=folder
        )
        b = wrk(base + "/v1/decide/batch", batch, connections=2, seconds=seconds, folder=folder)
        row["batch"] = {**b, "decisions_per_s": b["rps"] * BATCH}
        return row

    # Plain uvicorn in its own process, the same app code.
    port = free_port()
    env = {**os.environ, "PIPEMEDIC_STORE_URI": store}
    code = (
        "import uvicorn\n"
        "from serve.app import create_plain_app\n"
        "from serve.settings import ServiceSettings\n"
        f"uvicorn.run(create_plain_app(ServiceSettings(store_uri={store!r})), "
        f"host='127.0.0.1', port={port}, log_level='warning', access_log=False)\n"
    )
    server = subprocess.Popen([sys.executable, "-c", code], env=env)
    try:
        wait_http(f"http://127.0.0.1:{port}")
        results["uvicorn"] = measure(f"http://127.0.0.1:{port}")
    finally:
        server.terminate()
        server.wait(10)

    # Ray Serve, proxy and direct ingress in one deployment (the flag keeps the proxy running),
    # once per variant of Serve's own settings; each variant gets a fresh Ray, because Serve
    # reads these variables when its processes start.
    os.environ.update(INGRESS_ENV["direct"])
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")
    os.environ["PIPEMEDIC_STORE_URI"] = store
    for _ in range(rounds):
        for label in variants:
            env, change = SERVE_VARIANTS[label]
            with mock.patch.dict(os.environ, env):  # set for this variant, restored after
                rows = _serve_rows(store, measure, change)
            results.setdefault(f"serve:{label}", []).append(rows)
    return results


def _access_log_on(deployment: dict[str, Any]) -> None:
    deployment["logging_config"] = {"enable_access_log": True}


def _replicas_without_preset(deployment: dict[str, Any]) -> None:
    deployment["ray_actor_options"].pop("runtime_env", None)


# Serve settings the benchmark compares: (environment of every Ray process, a change to the
# config file's deployment options). The config file turns the per-request access log off and
# gives the replicas Ray's "throughput optimized" preset (user code on the replica's own event
# loop instead of a separate thread, buffered request logs). "Every process" also sets the
# preset for the proxy, which then talks gRPC to the replica.
SERVE_VARIANTS: dict[str, tuple[dict[str, str], Callable[[dict[str, Any]], None] | None]] = {
    "config file": ({}, None),
    "access log on": ({}, _access_log_on),
    "replicas without the preset": ({}, _replicas_without_preset),
    "preset in every process": ({"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}, None),
    # Ray Serve's HAProxy ingress in place of its Python proxy, balancing on the pipeline id
    # header, with HAProxy's request metrics off (the replica records them instead; what
    # `pipemedic serve --ingress haproxy` sets; serve.settings.INGRESS_ENV).
    "HAProxy ingress": (INGRESS_ENV["haproxy"], None),
    # Levers of the HAProxy ingress: Ray's default for request metrics (HAProxy logs every
    # request to a socket that a separate Python process parses), and HAProxy's thread count
    # (4 by default, on a 2-core machine here).
    "HAProxy, request metrics on": (
        {**INGRESS_ENV["haproxy"], "RAY_SERVE_HAPROXY_METRICS_ENABLED": "1"},
        None,
    ),
    "HAProxy, 2 threads": (
        {**INGRESS_ENV["haproxy"], "RAY_SERVE_HAPROXY_NBTHREAD": "2"},
        None,
    ),
}


def _serve_rows(
    store: str, measure, change: Callable[[dict[str, Any]], None] | None
) -> dict[str, Any]:
    """Start Ray and the decision endpoint from ``configs/serve.yaml``, measure the proxy and
    the first replica's direct-ingress port, shut everything down."""
    import ray
    from ray import serve

    from serve.launch import direct_ingress_urls, start
    from serve.settings import load_serve_config, with_host_port

    cfg = with_host_port(load_serve_config(), host="127.0.0.1", port=free_port())
    cfg["applications"][0]["args"]["store_uri"] = store
    if change is not None:
        change(cfg["applications"][0]["deployments"][0])
    rows: dict[str, Any] = {}
    try:
        url = start(cfg)
        wait_http(url)
        rows["proxy"] = measure(url)
        direct = direct_ingress_urls(cfg["applications"][0]["name"], host="127.0.0.1")
        if direct:
            wait_http(direct[0])
            rows["direct"] = measure(direct[0])
            rows["direct_url"] = direct[0]
    finally:
        serve.shutdown()
        ray.shutdown()
    return rows


def _fresh_store(folder: Path) -> str:
    """No promoted policy here: publish a freshly initialised one of the default size."""
    from agents.inference import fresh_nets, publish_nets

    root = str(folder / "store")
    nets = fresh_nets("hierarchical", hidden=(256, 256))
    publish_nets(
        "hierarchical",
        nets,
        root=root,
        run_id="bench-serve",
        iteration=0,
        promote_reason="bench serve: untrained policy",
    )
    return root
