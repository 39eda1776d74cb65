"""Shared fixtures: one Ray instance per test session, small scenarios built inline."""

from __future__ import annotations

import os
import tempfile

import pytest

from envs.catalogue import FAULT_STAGES
from envs.scenario import Scenario


def pytest_configure(config):
    """Every test writes its Delta tables to a throwaway store, never to ./store. Set before
    any Ray worker starts, so workers inherit it (cluster.ray_runtime passes PIPEMEDIC_*)."""
    os.environ["PIPEMEDIC_STORE_URI"] = tempfile.mkdtemp(prefix="pipemedic-test-store-")


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
