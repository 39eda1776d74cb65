"""Training progress as Prometheus gauges, through Ray's metrics (``ray.util.metrics``).

``cluster.train`` sets them from each line it writes to ``metrics.jsonl``; Ray's metrics agent
on the node exports them on the node's metrics port (8080 on KubeRay, where a PodMonitor scrapes
it; a random free port on an embedded local Ray: ``ray.nodes()[i]["MetricsExportPort"]``).

Ray prefixes every user metric with its namespace, so a Prometheus query must use these names
(checked against Ray 2.60's exporter, ``ray/_private/telemetry/open_telemetry_metric_recorder.py``
``NAMESPACE = "ray"``, and by scraping a live node)::

    ray_pipemedic_train_iteration                 PPO iterations done (0: after the warm start)
    ray_pipemedic_train_pipeline_steps_total      simulated pipeline steps, warm start included
    ray_pipemedic_train_steps_per_second          pipeline steps/s in the latest iteration
    ray_pipemedic_train_episode_return{agent=…}   episode return per pipeline, by agent
    ray_pipemedic_train_validation_score          at the latest review (lower is better)
    ray_pipemedic_train_eval_mttr_seconds         held-out MTTR at the latest review
    ray_pipemedic_train_eval_slo_adherence        held-out SLO adherence (0-1), latest review

All are gauges (``…_steps_total`` too: it holds the cumulative count, so no ``rate()`` resets)
with the tags ``kind`` (hierarchical|flat) and ``run_id``; Ray adds ``SessionName``,
``NodeAddress``, ``WorkerId``, ``Component`` and ``Version``, so aggregate them away
(``max by (kind, run_id) (…)``). The held-out pair is set only by runs with ``held_out``
scenarios. A series disappears shortly after the training process exits.

Recording never raises: a metrics problem is logged (once) and training goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)

# What Ray's exporter puts before every user metric name.
RAY_PREFIX = "ray_"

# Name given to Ray, description, tag keys beyond (kind, run_id).
_DEFINITIONS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("pipemedic_train_iteration", "PPO iterations done (0: after the warm start).", ()),
    (
        "pipemedic_train_pipeline_steps_total",
        "Simulated pipeline steps so far, warm start included (a gauge of the cumulative count).",
        (),
    ),
    (
        "pipemedic_train_steps_per_second",
        "Pipeline steps simulated per second in the latest iteration.",
        (),
    ),
    (
        "pipemedic_train_episode_return",
        "Mean episode return per pipeline in the latest iteration, by agent.",
        ("agent",),
    ),
    (
        "pipemedic_train_validation_score",
        "Validation score at the latest review (lower is better; it picks the policy).",
        (),
    ),
    (
        "pipemedic_train_eval_mttr_seconds",
        "Held-out mean time to recovery at the latest review (watched only).",
        (),
    ),
    (
        "pipemedic_train_eval_slo_adherence",
        "Held-out SLO adherence, 0 to 1, at the latest review (watched only).",
        (),
    ),
)

METRIC_NAMES: tuple[str, ...] = tuple(name for name, _, _ in _DEFINITIONS)
"""The names given to ``ray.util.metrics.Gauge``."""

EXPORTED_NAMES: tuple[str, ...] = tuple(RAY_PREFIX + name for name in METRIC_NAMES)
"""The names Prometheus sees (and dashboards must query)."""

# metrics.jsonl keys -> gauge; ``eval`` holds envs.metrics.aggregate()'s figures.
_TOP_LEVEL = {
    "iteration": "pipemedic_train_iteration",
    "pipeline_steps": "pipemedic_train_pipeline_steps_total",
    "pipeline_steps_per_s": "pipemedic_train_steps_per_second",
    "validation_score": "pipemedic_train_validation_score",
}
_HELD_OUT = {
    "mttr_s": "pipemedic_train_eval_mttr_seconds",
    "slo_adherence": "pipemedic_train_eval_slo_adherence",
}


class TrainingMetrics:
    """The training gauges of one run, tagged with its kind and run id."""

    def __init__(self, *, kind: str, run_id: str) -> None:
        self._warned = False
        self._gauges: dict[str, Any] = {}
        try:
            from ray.util.metrics import Gauge

            tags = {"kind": kind, "run_id": run_id}
            self._gauges = {
                name: Gauge(
                    name, description=description, tag_keys=("kind", "run_id", *extra)
                ).set_default_tags(tags)
                for name, description, extra in _DEFINITIONS
            }
        except Exception:  # metrics are for watching: never the reason training stops
            self._warn("could not create the training gauges; none will be exported")

    def record(self, record: Mapping[str, Any]) -> None:
        """Set the gauges from one line of ``metrics.jsonl``: whatever figures it holds (an
        iteration line has steps/s and returns; a review adds the validation score and, with
        held-out scenarios, ``eval``)."""
        if not self._gauges:
            return
        try:
            for key, name in _TOP_LEVEL.items():
                if record.get(key) is not None:
                    self._gauges[name].set(float(record[key]))
            for agent, value in (record.get("return_per_pipeline") or {}).items():
                self._gauges["pipemedic_train_episode_return"].set(
                    float(value), tags={"agent": str(agent)}
                )
            held_out = record.get("eval") or {}
            for key, name in _HELD_OUT.items():
                if held_out.get(key) is not None:
                    self._gauges[name].set(float(held_out[key]))
        except Exception:  # see __init__
            self._warn("could not record training metrics; training goes on")

    def _warn(self, message: str) -> None:
        # Once per run at warning level: a broken exporter would otherwise log every iteration.
        log.log(logging.DEBUG if self._warned else logging.WARNING, message, exc_info=True)
        self._warned = True
