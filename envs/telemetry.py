"""The telemetry a pipeline reports: names, units, and a batch container.

The simulator produces :class:`Telemetry` for many pipelines at once; the baselines read it, the
RL observation encoder and the serving API map to and from it. A value the pipeline failed to
report is ``NaN`` (telemetry is partial); readers must cope with that.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Per-stage metrics, in this order along the last axis of ``Telemetry.stage``.
STAGE_METRICS: tuple[str, ...] = (
    "throughput_in_rps",  # records/s arriving at the stage
    "throughput_out_rps",  # records/s leaving it
    "queue",  # records waiting
    "latency_p99_s",  # time a record spends in the stage, tail
    "error_rate",  # share of attempts that fail (all causes)
    "timeout_rate",  # share of attempts that time out (a subset of errors)
    "cpu",  # utilisation, 0..1
    "mem",  # memory use as a share of the limit, 0..1
    "replicas",  # desired replicas
    "replicas_ready",  # replicas actually serving
    "null_rate",  # share of records with nulls in required fields
    "dup_rate",  # share of duplicate records
    "oor_rate",  # share of values out of their valid range
    "invalid_rate",  # share of records that fail parsing
    "schema_mismatch",  # 1 when the stage saw a schema it does not expect
    "feature_psi",  # population stability index of the features vs. the reference window
    "retry_on",  # 1 while retry_backoff is active at the stage
    "dedupe_on",  # 1 while deduplicate is active
    "throttle_on",  # 1 while throttle is active
)
# Pipeline-wide metrics, in this order along the last axis of ``Telemetry.pipeline``.
PIPELINE_METRICS: tuple[str, ...] = (
    "e2e_latency_p99_s",
    "e2e_error_rate",  # share of records lost to errors end to end (after retries)
    "freshness_s",  # age of the newest data at the sink
    "model_accuracy",  # observed with a delay (labels arrive late); NaN without a model stage
    "prediction_psi",  # drift of the model's output distribution
    "model_age_steps",  # steps since the model in production was deployed
    "human_paged",  # 1 while an on-call engineer is on the way
)
STAGE_INDEX = {m: i for i, m in enumerate(STAGE_METRICS)}
PIPELINE_INDEX = {m: i for i, m in enumerate(PIPELINE_METRICS)}


@dataclass
class Telemetry:
    """Observed telemetry of ``n`` pipelines sharing one topology.

    ``stage`` has shape (n, n_stages, len(STAGE_METRICS)); ``pipeline`` has shape
    (n, len(PIPELINE_METRICS)); ``step`` is the simulator step the snapshot describes.
    """

    topology: tuple[str, ...]
    stage: np.ndarray
    pipeline: np.ndarray
    step: int

    def of_stage(self, metric: str) -> np.ndarray:
        """One per-stage metric for all pipelines, shape (n, n_stages)."""
        return self.stage[:, :, STAGE_INDEX[metric]]

    def of_pipeline(self, metric: str) -> np.ndarray:
        """One pipeline-wide metric for all pipelines, shape (n,)."""
        return self.pipeline[:, PIPELINE_INDEX[metric]]
