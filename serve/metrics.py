"""Prometheus metrics of the decision service (names under ``pipemedic_serve_``).

Each service instance has its own registry, so two apps in one process (the benchmark runs the
plain-uvicorn app next to the in-process policy) never collide. ``GET /metrics`` renders it.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from serve import schemas

# Decision latency is sub-millisecond in process and a few ms through a proxy: fine buckets low.
_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip


class ServiceMetrics:
    """The counters, histogram and gauges DESIGN.md's dashboards read."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.decisions = Counter(
            "pipemedic_serve_decisions",
            "Decisions answered, by action, specialist and mode.",
            ["action", "specialist", "mode"],
            registry=r,
        )
        self.latency = Histogram(
            "pipemedic_serve_decision_latency_seconds",
            "Time to decide inside the service (per request; a batch counts once).",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.escalations = Counter(
            "pipemedic_serve_escalations",
            "Decisions handed to a human (mode escalate).",
            ["action"],
            registry=r,
        )
        self.held_back = Counter(
            "pipemedic_serve_held_back",
            "Actions held back by a guardrail, by reason.",
            ["reason"],
            registry=r,
        )
        self.feedback = Counter(
            "pipemedic_serve_feedback", "Feedback received, by outcome.", ["outcome"], registry=r
        )
        self.policy = Gauge(
            "pipemedic_serve_policy_info",
            "1 for the policy version being served.",
            ["version"],
            registry=r,
        )
        self._version: str | None = None

    def observe_decision(self, d: schemas.Decision) -> None:
        self.decisions.labels(d.action, d.specialist or "none", d.mode).inc()
        if d.mode == "escalate":
            self.escalations.labels(d.action).inc()
        if d.held_back is not None:
            self.held_back.labels(d.held_back.reason).inc()

    def set_policy(self, version: str) -> None:
        if version == self._version:
            return
        if self._version is not None:
            self.policy.remove(self._version)
        self.policy.labels(version).set(1)
        self._version = version

    def render(self) -> bytes:
        return generate_latest(self.registry)
