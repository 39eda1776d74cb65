"""Building blocks of the serving tests: policies with known preferences, and snapshots."""

from __future__ import annotations

import torch

from agents.inference import LearnedPolicy, fresh_nets, manifest_for, publish_nets
from envs.catalogue import MASTER_ACTIONS
from envs.observation import LAYOUTS, STAGES


def biased_nets(
    *, delegate: str = "infra", action: str = "scale_out", stage: str = "transform", logit: float
):
    """Hierarchical networks whose master delegates to ``delegate`` and whose specialist picks
    ``action`` on ``stage``, each with a last-layer bias of ``logit`` on that choice (the
    larger, the more confident; other weights are the near-uniform fresh ones)."""
    nets = fresh_nets("hierarchical", hidden=(16, 16))
    with torch.no_grad():
        for net in nets.values():
            net.pi[-1].weight.zero_()
        nets["master"].pi[-1].bias[MASTER_ACTIONS.index(f"delegate_{delegate}")] = logit
        index = LAYOUTS[delegate].encode(action, STAGES.index(stage))
        nets[delegate].pi[-1].bias[index] = logit
    return nets


def policy_of(nets, version: str = "hierarchical:test") -> LearnedPolicy:
    manifest = {**manifest_for("hierarchical", nets, {}), "policy_version": version}
    return LearnedPolicy(manifest, nets)


def publish_and_promote(root: str, nets, *, iteration: int, run_id: str = "serve-test") -> int:
    return publish_nets(
        "hierarchical",
        nets,
        root=root,
        run_id=run_id,
        iteration=iteration,
        promote_reason="serving test",
    )


def snapshot(pipeline_id: str = "orders-etl", **overrides) -> dict:
    """A busy but healthy-looking pipeline snapshot (a request body)."""
    body = {
        "pipeline_id": pipeline_id,
        "stages": {
            "ingest": {"throughput_in_rps": 100.0, "throughput_out_rps": 100.0, "cpu": 0.4},
            "transform": {"queue": 50.0, "cpu": 0.5, "latency_p99_s": 1.0, "replicas": 4},
            "load": {"error_rate": 0.0005},
        },
        "pipeline": {"e2e_latency_p99_s": 5.0, "e2e_error_rate": 0.001, "freshness_s": 30.0},
    }
    body.update(overrides)
    return body
