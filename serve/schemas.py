"""The Decision API's request and response models (DESIGN.md, "Decision API").

Every model forbids unknown fields and refuses NaN and Infinity (pydantic accepts both by
default, and Python's JSON parser reads the bare words ``NaN``/``Infinity``), so a malformed
snapshot is a 422 that names the field instead of a poisoned observation. Metric names and units
are those of ``envs.telemetry``; a metric a pipeline does not report is simply left out.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from envs.catalogue import DOMAINS, SIM_ACTIONS

StageName = Literal["ingest", "validate", "transform", "load", "model"]
ActionName = Literal[SIM_ACTIONS]  # type: ignore[valid-type]
Mode = Literal["shadow", "autonomous", "escalate"]
RequestedMode = Literal["shadow", "autonomous"]
Specialist = Literal[DOMAINS]  # type: ignore[valid-type]

_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)

Rate = Annotated[float, Field(ge=0, le=1)]
NonNegative = Annotated[float, Field(ge=0)]
Flag = Annotated[float, Field(ge=0, le=1)]


def _iso_text(value: object) -> object:
    # Lax datetimes would also take numbers (seconds since 1970); the document says string.
    if not isinstance(value, str):
        raise ValueError("timestamp must be an ISO 8601 string, e.g. 2026-11-22T10:00:00Z")
    return value


Timestamp = Annotated[datetime, BeforeValidator(_iso_text), Field(strict=False)]
PipelineId = Annotated[
    str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")
]


class StageTelemetry(BaseModel):
    """One stage's metrics (see ``envs.telemetry.STAGE_METRICS`` for their meaning)."""

    model_config = _STRICT

    throughput_in_rps: NonNegative | None = None
    throughput_out_rps: NonNegative | None = None
    queue: NonNegative | None = None
    latency_p99_s: NonNegative | None = None
    error_rate: Rate | None = None
    timeout_rate: Rate | None = None
    cpu: Annotated[float, Field(ge=0, le=10)] | None = None
    mem: Annotated[float, Field(ge=0, le=10)] | None = None
    replicas: Annotated[float, Field(ge=0, le=10_000)] | None = None
    replicas_ready: Annotated[float, Field(ge=0, le=10_000)] | None = None
    null_rate: Rate | None = None
    dup_rate: Rate | None = None
    oor_rate: Rate | None = None
    invalid_rate: Rate | None = None
    schema_mismatch: Flag | None = None
    feature_psi: NonNegative | None = None
    retry_on: Flag | None = None
    dedupe_on: Flag | None = None
    throttle_on: Flag | None = None


class PipelineTelemetry(BaseModel):
    """Pipeline-wide metrics (``envs.telemetry.PIPELINE_METRICS``)."""

    model_config = _STRICT

    e2e_latency_p99_s: NonNegative | None = None
    e2e_error_rate: Rate | None = None
    freshness_s: NonNegative | None = None
    model_accuracy: Rate | None = None
    prediction_psi: NonNegative | None = None
    model_age_steps: NonNegative | None = None
    human_paged: Flag | None = None


class Slo(BaseModel):
    """The pipeline's service-level objectives; omitted ones take the defaults of DESIGN.md."""

    model_config = _STRICT

    p99_latency_s: Annotated[float, Field(gt=0)] | None = None
    error_rate: Annotated[float, Field(gt=0, lt=1)] | None = None
    freshness_s: Annotated[float, Field(gt=0)] | None = None


class DriftInput(BaseModel):
    """Reference and current distributions of one feature (or of the model's predictions).

    Give either two histograms over the same bins or two raw samples; the server computes PSI
    and KS itself. With ``target: "predictions"`` the result is the pipeline's
    ``prediction_psi``; otherwise the largest PSI per stage becomes that stage's ``feature_psi``
    (unless the request reports ``feature_psi`` itself).
    """

    model_config = _STRICT

    feature: Annotated[str, Field(min_length=1, max_length=128)]
    stage: StageName = "transform"
    target: Literal["feature", "predictions"] = "feature"
    reference_counts: Annotated[list[NonNegative], Field(min_length=2, max_length=1000)] | None = (
        None
    )
    current_counts: Annotated[list[NonNegative], Field(min_length=2, max_length=1000)] | None = None
    reference_sample: Annotated[list[float], Field(min_length=2, max_length=100_000)] | None = None
    current_sample: Annotated[list[float], Field(min_length=2, max_length=100_000)] | None = None

    @model_validator(mode="after")
    def _one_kind_of_input(self) -> DriftInput:
        counts = (self.reference_counts is not None, self.current_counts is not None)
        samples = (self.reference_sample is not None, self.current_sample is not None)
        if counts == (True, True) and samples == (False, False):
            if len(self.reference_counts) != len(self.current_counts):
                raise ValueError(
                    f"reference_counts has {len(self.reference_counts)} bins, "
                    f"current_counts has {len(self.current_counts)}; they must match"
                )
            return self
        if samples == (True, True) and counts == (False, False):
            return self
        raise ValueError(
            "give either reference_counts and current_counts, or reference_sample and "
            "current_sample (exactly one pair)"
        )


class DecideRequest(BaseModel):
    """One telemetry snapshot of one pipeline."""

    model_config = _STRICT

    pipeline_id: PipelineId
    stages: Annotated[dict[StageName, StageTelemetry], Field(min_length=1)]
    pipeline: PipelineTelemetry = PipelineTelemetry()
    slo: Slo = Slo()
    drift: Annotated[list[DriftInput], Field(max_length=64)] = []
    mode: RequestedMode | None = Field(
        None, description="Ask for shadow or autonomous; the service default when omitted."
    )
    timestamp: Timestamp | None = None


class Alternative(BaseModel):
    action: ActionName
    target_stage: StageName | None
    probability: float


class Signal(BaseModel):
    """A telemetry signal that stood out: its value now, and how far it moved from this
    pipeline's usual value in the observation's normalised units (positive: above usual)."""

    metric: str
    stage: StageName | None
    value: float
    departure: float
    alarm_level: float | None = Field(
        None, description="Set when the value is over a fixed alarm level (serve.decider.ALARMS)."
    )


class HeldBack(BaseModel):
    """Set when a guardrail held the recommended action back (the answer is then ``observe``)."""

    action: ActionName
    target_stage: StageName | None
    reason: Literal["cooldown", "hourly_cap"]
    retry_after_s: float


class DriftScore(BaseModel):
    feature: str
    stage: StageName
    target: Literal["feature", "predictions"]
    psi: float
    ks: float
    ks_pvalue: float | None


class Decision(BaseModel):
    decision_id: str
    pipeline_id: str
    action: ActionName
    target_stage: StageName | None
    parameters: dict[str, float | int | str]
    specialist: Specialist | None
    confidence: float
    mode: Mode
    policy_version: str
    alternatives: list[Alternative]
    explanation: str
    signals: list[Signal]
    held_back: HeldBack | None = None
    drift_scores: list[DriftScore] = []


class DecideBatchRequest(BaseModel):
    model_config = _STRICT

    requests: Annotated[list[DecideRequest], Field(min_length=1, max_length=1024)]


class DecideBatchResponse(BaseModel):
    decisions: list[Decision]


Outcome = Literal["resolved", "improved", "unchanged", "worse"]


class FeedbackRequest(BaseModel):
    """What happened after a decision; it becomes experience (source ``prod`` or ``shadow``)."""

    model_config = _STRICT

    decision_id: Annotated[str, Field(min_length=1, max_length=64)]
    outcome: Outcome
    executed: bool = Field(True, description="Whether the recommended action was carried out.")
    telemetry_after: DecideRequest | None = Field(
        None, description="A snapshot taken after the action; its pipeline_id must match."
    )


class FeedbackResponse(BaseModel):
    decision_id: str
    recorded_rows: int
    source: Literal["prod", "shadow"]
    reward: float


class PolicyInfo(BaseModel):
    kind: str
    version: str
    loaded_at: datetime
    trained: dict[str, str | int | float | None]
    settings: dict[str, float | int | str | bool | dict[str, float]]


class Health(BaseModel):
    status: Literal["ok"]
    policy_version: str


class ErrorField(BaseModel):
    field: str
    message: str


class ErrorBody(BaseModel):
    """Every 4xx/5xx answer: what went wrong, and for bad input which fields."""

    error: str
    fields: list[ErrorField] = []
