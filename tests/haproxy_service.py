"""The decision endpoint behind Ray Serve's HAProxy ingress, two replicas, in a Ray of its own.

    python -m tests.haproxy_service STORE PORT

Used by ``tests/test_serve_haproxy.py``: Serve reads the ingress settings from the environment
when its processes start, so this runs in its own process with its own Ray, apart from the test
session's. Prints ``READY URL`` once HAProxy routes on the header over both replicas,
serves until stdin closes.
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
    """Until HAProxy itself routes on the header over all ``n`` replicas.

    While replicas start, HAProxy's backend may not list them all yet, and with none listed it
    forwards to its fallback, Serve's own proxy, which reaches every replica but ignores the
    header. Distinct replicas answering therefore prove nothing (a CI run failed that way: the
    first pipeline moved when HAProxy reloaded with the second replica). What does prove it:
    a set of probe pipelines, each asked three times per round, routed identically in two
    rounds in a row, with all ``n`` replicas among the answers. The fallback would scatter
    them; a backend short of replicas would not cover ``n``.
    """
    import time

    import requests

    from serve.app import REPLICA_HEADER
    from serve.settings import PIPELINE_HEADER
    from tests.serve_helpers import snapshot

    probes = [f"warm-up-{i}" for i in range(8)]

    def one_round() -> dict[str, str] | None:
        """Each probe's replica, or None if a probe met two replicas or a request failed."""
        routed: dict[str, str] = {}
        for p in probes:
            for _ in range(3):
                r = requests.post(
                    f"{url}/v1/decide", json=snapshot(p), headers={PIPELINE_HEADER: p}, timeout=30
                )
                if r.status_code != 200:
                    return None
                replica = r.headers[REPLICA_HEADER]
                if routed.setdefault(p, replica) != replica:
                    return None
        return routed

    previous = None
    deadline = time.monotonic() + timeout
    while True:
        current = one_round()
        if current is not None and current == previous and len(set(current.values())) == n:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"HAProxy's routing was not stable over {n} replicas: {current}")
        previous = current
        time.sleep(1.0)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
