"""Simulator parameters: one frozen, documented object, loaded from ``configs/simulator.yaml``.

Every number the simulator's physics uses lives here (fault cure probabilities and delays live
in ``envs.catalogue`` beside the cure sets they belong to). The values were chosen from what
pipelines of this size typically see, before any policy was evaluated, and are the same for every
policy. Change them in the YAML file, not in code.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from envs.catalogue import SIM_ACTIONS, STAGES
from envs.config_files import load_model

STEP_SECONDS = 10.0
"""One simulator step is 10 simulated seconds (DESIGN.md)."""


class SloParams(BaseModel):
    """Service-level objectives; a step is in SLO when all three hold."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    p99_latency_s: float = Field(30.0, gt=0, description="End-to-end p99 latency bound (s).")
    error_rate: float = Field(0.01, gt=0, lt=1, description="End-to-end error-rate bound.")
    freshness_s: float = Field(120.0, gt=0, description="Age of the newest data at the sink (s).")


class SimParams(BaseModel):
    """The simulator's physics. See the README's simulator section for the reasoning."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    slo: SloParams = SloParams()
    replicas: int = Field(4, ge=1, description="Replicas per stage at the start.")
    max_replicas: int = Field(12, ge=1, description="Upper bound for scale_out.")
    headroom: dict[str, float] = Field(
        default_factory=lambda: {
            "ingest": 1.6,
            "validate": 1.8,
            "transform": 1.4,
            "load": 1.5,
            "model": 1.5,
        },
        description="Stage capacity at start as a multiple of base traffic.",
    )
    service_time_s: float = Field(0.2, gt=0, description="Per-stage processing latency (s).")
    max_queue_s: float = Field(
        600.0, gt=0, description="Queue bound, in seconds of base traffic; beyond it records drop."
    )
    base_error_rate: float = Field(0.0005, ge=0, lt=1, description="Errors of a healthy stage.")
    base_null_rate: float = Field(0.01, ge=0, lt=1, description="Legitimate nulls in the data.")
    base_accuracy: float = Field(0.92, gt=0, le=1, description="Healthy model accuracy.")
    label_delay_steps: int = Field(
        6, ge=0, description="Accuracy is observed this many steps late."
    )
    diurnal_amplitude: float = Field(0.25, ge=0, lt=1, description="Day/night traffic swing.")
    traffic_noise: float = Field(0.05, ge=0, description="Log-normal sigma of arrivals per step.")
    telemetry_noise: float = Field(0.1, ge=0, description="Log-normal sigma of observed metrics.")
    telemetry_missing: float = Field(
        0.03, ge=0, lt=1, description="Chance that one observed metric is missing (NaN)."
    )
    schema_detect_prob: float = Field(
        0.8, ge=0, le=1, description="Chance per step that a schema mismatch is reported."
    )
    replica_price: float = Field(0.01, ge=0, description="Cost of one replica for one step.")
    action_cost: dict[str, float] = Field(
        default_factory=lambda: {
            "observe": 0.0,
            "escalate": 10.0,
            "schema_remap": 0.5,
            "retrain_model": 20.0,
            "rollback_model": 1.0,
            "retry_backoff": 0.05,
            "scale_out": 0.1,
            "scale_in": 0.0,
            "restart_stage": 0.2,
            "failover": 1.0,
            "throttle": 0.1,
            "quarantine_batch": 0.3,
            "deduplicate": 0.5,
            "replay_from_backup": 3.0,
        },
        description="One-off cost of each action, on top of replica-steps.",
    )
    retry_window_steps: int = Field(30, ge=1, description="How long retry_backoff stays on.")
    dedupe_window_steps: int = Field(60, ge=1, description="How long deduplicate stays on.")
    throttle_window_steps: int = Field(30, ge=1, description="How long throttle stays on.")
    throttle_limit: float = Field(
        1.1, gt=0, description="Throttle admits this multiple of the stage's normal inflow."
    )
    replay_steps: int = Field(6, ge=1, description="Steps a replay_from_backup re-sends data.")
    replay_rate: float = Field(0.3, ge=0, description="Replay volume, as a share of base traffic.")
    rollback_staleness: float = Field(
        0.05, ge=0, lt=1, description="Accuracy an unneeded rollback costs (older model)."
    )
    human_delay_median_steps: float = Field(
        180.0, gt=0, description="On-call response, median (30 min, DESIGN.md)."
    )
    human_delay_sigma: float = Field(0.5, ge=0, description="Log-normal sigma of that delay.")
    alert_after_steps: int = Field(
        2, ge=1, description="An SLO alert fires after this many bad steps."
    )

    def model_post_init(self, _context: object) -> None:
        unknown = set(self.headroom) - set(STAGES)
        if unknown:
            raise ValueError(f"headroom names unknown stages {sorted(unknown)}; allowed: {STAGES}")
        missing = set(SIM_ACTIONS) - set(self.action_cost)
        extra = set(self.action_cost) - set(SIM_ACTIONS)
        if missing or extra:
            raise ValueError(
                f"action_cost must price exactly the actions {SIM_ACTIONS}; "
                f"missing {sorted(missing)}, unknown {sorted(extra)}"
            )


def load_sim_params(path: str | Path | None = None) -> SimParams:
    """Load simulator parameters from a YAML file; ``None`` gives the documented defaults."""
    if path is None:
        return SimParams()
    return load_model(path, SimParams, what="simulator parameters")
