"""Shared fixtures: one Ray instance per test session, small scenarios built inline."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from envs.catalogue import FAULT_STAGES
from envs.scenario import Scenario

_THROWAWAY_STORE = pytest.StashKey[str]()


def pytest_configure(config):
    """Every test writes its Delta tables to a throwaway store, never to ./store. Set before
    any Ray worker starts, so workers inherit it (cluster.ray_runtime passes PIPEMEDIC_*)."""
    config.stash[_THROWAWAY_STORE] = tempfile.mkdtemp(prefix="pipemedic-test-store-")
    os.environ["PIPEMEDIC_STORE_URI"] = config.stash[_THROWAWAY_STORE]


def pytest_unconfigure(config):
    """The throwaway store goes when the session ends (each session used to leave one in /tmp)."""
    shutil.rmtree(config.stash[_THROWAWAY_STORE], ignore_errors=True)


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray shared by every test that needs one (starting Ray costs seconds)."""
    import ray

    from cluster.ray_runtime import ensure_ray

    ensure_ray(num_cpus=2)
    yield ray
    ray.shutdown()


def single_fault_scenario(
    fault: str, *, at: int = 5, severity: float = 0.8, steps: int = 80
) -> Scenario:
    """A quiet pipeline with one fault of type ``fault`` at its first allowed stage."""
    return Scenario.model_validate(
        {
            "name": f"only-{fault}",
            "duration_steps": steps,
            "load": {"pattern": "flat"},
            "faults": [
                {"type": fault, "stage": FAULT_STAGES[fault][0], "at": at, "severity": severity}
            ],
        }
    )


SERVE_TOKEN = "test-token-not-secret"


@pytest.fixture(scope="session")
def decision_service(ray_session, tmp_path_factory):
    """The decision endpoint on a real Ray Serve on localhost, from ``configs/serve.yaml`` with
    test-sized settings: a freshly initialised policy promoted in its own store, a bearer token,
    small queue bounds (so overload is reachable) and fast policy polling and feedback flushes.
    Yields an object with ``url``, ``store``, ``headers``."""
    from types import SimpleNamespace

    from ray import serve

    from serve.bench import free_port
    from serve.launch import start
    from serve.settings import load_serve_config, with_host_port
    from tests.serve_helpers import biased_nets, publish_and_promote

    store = str(tmp_path_factory.mktemp("serve-store"))
    publish_and_promote(store, biased_nets(logit=3.0), iteration=1)
    cfg = with_host_port(load_serve_config(), host="127.0.0.1", port=free_port())
    app = cfg["applications"][0]
    app["args"].update(store_uri=store, policy_poll_s=0.5, feedback_flush_s=0.5)
    app["deployments"][0].update(
        max_ongoing_requests=4,
        max_queued_requests=4,
        health_check_period_s=1,
        ray_actor_options={
            "num_cpus": 0,
            "runtime_env": {"env_vars": {"PIPEMEDIC_API_TOKEN": SERVE_TOKEN}},
        },
    )
    url = start(cfg)
    yield SimpleNamespace(
        url=url,
        store=store,
        headers={"Authorization": f"Bearer {SERVE_TOKEN}"},
        app_name=app["name"],
    )
    serve.shutdown()
