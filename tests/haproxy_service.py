"""The decision endpoint behind Ray Serve's HAProxy ingress, two replicas, in a Ray of its own.

    python -m tests.haproxy_service STORE PORT

Used by ``tests/test_serve_haproxy.py``: Serve reads the ingress settings from the environment
when its processes start, so this runs in its own process with its own Ray, apart from the test
session's. Prints ``READY URL`` once the endpoint answers, serves until stdin closes.
"""

from __future__ import annotations

import os
import sys


def main(store: str, port: int) -> None:
    from serve.settings import INGRESS_ENV

    os.environ.update(INGRESS_ENV["haproxy"])  # before Ray starts: Serve's processes read it
    os.environ.pop("RAY_ADDRESS", None)
    os.environ["PIPEMEDIC_STORE_URI"] = store

    import ray
    from ray import serve

    from cluster.ray_runtime import ensure_ray
    from serve.bench import wait_http
    from serve.launch import start
    from serve.settings import load_serve_config, with_host_port

    cfg = with_host_port(load_serve_config(), host="127.0.0.1", port=port)
    app = cfg["applications"][0]
    app["args"].update(store_uri=store, feedback_flush_s=0.5)
    app["deployments"][0].update(num_replicas=2, ray_actor_options={"num_cpus": 0})
    ensure_ray(num_cpus=2)
    try:
        url = start(cfg)
        wait_http(url, timeout=180)
        _wait_for_replicas(url, 2)
        print("READY", url, flush=True)
        sys.stdin.read()
    finally:
        serve.shutdown()
        ray.shutdown()


def _wait_for_replicas(url: str, n: int, timeout: float = 180.0) -> None:
    """Until HAProxy has ``n`` replicas to choose from: the hash of the routing header maps onto
    the servers HAProxy knows, so a replica joining later would move pipelines. Without the
    header HAProxy goes round robin, so ``n`` distinct answering replicas show they are all in."""
    import time

    import requests

    from serve.app import REPLICA_HEADER
    from tests.serve_helpers import snapshot

    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    while len(seen) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only replicas {sorted(seen)} answered within {timeout:.0f} s")
        r = requests.post(f"{url}/v1/decide", json=snapshot("warm-up"), timeout=30)
        if r.status_code == 200:
            seen.add(r.headers[REPLICA_HEADER])
        else:
            time.sleep(0.5)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
