"""The contract: stage, fault and action names, and which actions cure, waste or harm.

The names here are fixed by ``DESIGN.md``; the simulator, the baselines, the agents and the
serving API all index into these tuples, so their order is part of the contract too (append,
never reorder).

How a fault is cleared
    Each fault lists its *cures*: an action applied to the right target stage that clears the
    fault with some probability after some delay. Every other action leaves the fault alone;
    most of them still cost money (see ``SimParams.action_cost``) and some make things worse.

How actions do harm
    Harm is not a penalty table: it falls out of the simulator's physics. ``restart_stage``
    drops the stage's queue; ``retry_backoff`` re-sends failed records, so a corrupt batch is
    delivered twice; ``replay_from_backup`` re-sends records that were already delivered;
    ``scale_out`` adds replicas that cost money whether or not they help; ``rollback_model``
    without a bad deploy swaps in an older, staler model. ``HARMS`` below names, per fault, the
    actions a responder is tempted by that make that incident worse, and which metric suffers;
    the tests check each one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

STAGES: tuple[str, ...] = ("ingest", "validate", "transform", "load", "model")
DEFAULT_TOPOLOGY: tuple[str, ...] = STAGES
MODEL_STAGE = "model"
SINK_STAGES: tuple[str, ...] = ("load", "model")

DOMAINS: tuple[str, ...] = ("drift", "infra", "quality")

FAULTS_BY_DOMAIN: dict[str, tuple[str, ...]] = {
    "drift": ("schema_drift", "data_drift", "concept_drift", "bad_model_deploy"),
    "infra": (
        "cpu_contention",
        "memory_leak",
        "node_failure",
        "transient_timeout",
        "traffic_surge",
        "downstream_outage",
    ),
    "quality": ("null_spike", "duplicate_burst", "corrupt_batch", "out_of_range", "late_data"),
}
FAULT_TYPES: tuple[str, ...] = tuple(f for d in DOMAINS for f in FAULTS_BY_DOMAIN[d])
FAULT_DOMAIN: dict[str, str] = {f: d for d, fs in FAULTS_BY_DOMAIN.items() for f in fs}
#: Per fault type (indexed like FAULT_TYPES, as the simulator's fault slots are), its domain's
#: index in DOMAINS.
FAULT_DOMAIN_INDEX: tuple[int, ...] = tuple(DOMAINS.index(FAULT_DOMAIN[f]) for f in FAULT_TYPES)

MASTER_ACTIONS: tuple[str, ...] = (
    "delegate_drift",
    "delegate_infra",
    "delegate_quality",
    "observe",
    "escalate",
)
SPECIALIST_ACTIONS: dict[str, tuple[str, ...]] = {
    "drift": ("schema_remap", "retrain_model", "rollback_model", "observe"),
    "infra": (
        "retry_backoff",
        "scale_out",
        "scale_in",
        "restart_stage",
        "failover",
        "throttle",
        "observe",
    ),
    "quality": ("quarantine_batch", "deduplicate", "replay_from_backup", "observe"),
}

# The simulator's own action space: every concrete remediation, plus doing nothing and paging a
# human. A step applies one of these to one target stage.
SIM_ACTIONS: tuple[str, ...] = (
    "observe",
    "escalate",
    "schema_remap",
    "retrain_model",
    "rollback_model",
    "retry_backoff",
    "scale_out",
    "scale_in",
    "restart_stage",
    "failover",
    "throttle",
    "quarantine_batch",
    "deduplicate",
    "replay_from_backup",
)
ACTION_ID: dict[str, int] = {a: i for i, a in enumerate(SIM_ACTIONS)}
FAULT_ID: dict[str, int] = {f: i for i, f in enumerate(FAULT_TYPES)}
ACTION_DOMAIN: dict[str, str] = {
    a: d for d, acts in SPECIALIST_ACTIONS.items() for a in acts if a != "observe"
}


def master_action_name(sim_action: int) -> str:
    """The master's action behind a concrete one: its domain's delegation, or the action itself
    (``observe``, ``escalate``). How a teacher's choice labels the master."""
    name = SIM_ACTIONS[sim_action]
    return f"delegate_{ACTION_DOMAIN[name]}" if name in ACTION_DOMAIN else name


# Which stages each fault may be injected at. Drift in the model needs a model stage; a late
# feed arrives at the pipeline's entrance; an outage is of an external system a sink writes to.
FAULT_STAGES: dict[str, tuple[str, ...]] = {
    "schema_drift": ("ingest", "validate", "transform"),
    "data_drift": ("ingest", "transform"),
    "concept_drift": ("model",),
    "bad_model_deploy": ("model",),
    "cpu_contention": STAGES,
    "memory_leak": STAGES,
    "node_failure": STAGES,
    "transient_timeout": STAGES,
    "traffic_surge": STAGES,
    "downstream_outage": SINK_STAGES,
    "null_spike": ("ingest", "validate", "transform"),
    "duplicate_burst": ("ingest", "validate", "transform"),
    "corrupt_batch": ("ingest", "validate", "transform"),
    "out_of_range": ("ingest", "validate", "transform"),
    "late_data": ("ingest",),
}

CureTarget = Literal["fault_stage", "model", "fault_stage_or_downstream"]


@dataclass(frozen=True)
class Cure:
    """An action that clears a fault: with ``probability``, ``delay_steps`` after it is applied."""

    action: str
    target: CureTarget
    probability: float
    delay_steps: int


@dataclass(frozen=True)
class Harm:
    """An action that makes an incident of this fault worse, and the metric that shows it."""

    action: str
    metric: Literal["records_lost", "cost", "slo"]
    why: str


# Probabilities and delays are judgement calls, documented in the README's simulator section.
# They are the same for every policy and were set before any policy was evaluated.
CURES: dict[str, tuple[Cure, ...]] = {
    "schema_drift": (Cure("schema_remap", "fault_stage", 0.9, 1),),
    "data_drift": (Cure("retrain_model", "model", 0.95, 12),),
    "concept_drift": (Cure("retrain_model", "model", 0.95, 12),),
    "bad_model_deploy": (
        Cure("rollback_model", "model", 0.95, 1),
        Cure("retrain_model", "model", 0.9, 12),
    ),
    "cpu_contention": (
        Cure("failover", "fault_stage", 0.9, 1),
        Cure("scale_out", "fault_stage", 0.6, 2),
    ),
    "memory_leak": (Cure("restart_stage", "fault_stage", 0.85, 1),),
    "node_failure": (
        Cure("failover", "fault_stage", 0.95, 1),
        Cure("scale_out", "fault_stage", 0.9, 2),
    ),
    "transient_timeout": (Cure("retry_backoff", "fault_stage", 0.9, 1),),
    "traffic_surge": (Cure("throttle", "fault_stage", 0.95, 1),),
    "downstream_outage": (Cure("failover", "fault_stage", 0.9, 1),),
    "null_spike": (Cure("quarantine_batch", "fault_stage_or_downstream", 0.9, 1),),
    "duplicate_burst": (Cure("deduplicate", "fault_stage_or_downstream", 0.95, 1),),
    "corrupt_batch": (
        Cure("quarantine_batch", "fault_stage_or_downstream", 0.9, 1),
        Cure("replay_from_backup", "fault_stage", 0.85, 3),
    ),
    "out_of_range": (Cure("quarantine_batch", "fault_stage_or_downstream", 0.9, 1),),
    "late_data": (Cure("replay_from_backup", "fault_stage", 0.85, 3),),
}

HARMS: dict[str, tuple[Harm, ...]] = {
    "schema_drift": (
        Harm("scale_out", "cost", "more replicas parse the same bad schema; only the bill grows"),
    ),
    "data_drift": (
        Harm("rollback_model", "records_lost", "an older model is even further from today's data"),
    ),
    "concept_drift": (
        Harm("rollback_model", "records_lost", "an older model is even further from today's world"),
    ),
    "bad_model_deploy": (
        Harm(
            "scale_out",
            "cost",
            "more replicas of a bad model: the bill grows, predictions stay wrong",
        ),
    ),
    "cpu_contention": (
        Harm(
            "restart_stage", "records_lost", "drops the queue; the noisy neighbour is still there"
        ),
    ),
    "memory_leak": (
        Harm(
            "scale_out", "cost", "more replicas that leak the same way and still run out of memory"
        ),
    ),
    "node_failure": (
        Harm(
            "restart_stage", "records_lost", "restarts the surviving replicas, dropping the queue"
        ),
    ),
    "transient_timeout": (
        Harm("scale_out", "cost", "more replicas time out against the same dependency"),
    ),
    "traffic_surge": (
        Harm("restart_stage", "records_lost", "drops a queue that is longest exactly now"),
    ),
    "downstream_outage": (Harm("scale_out", "cost", "more writers hammer a sink that is down"),),
    "null_spike": (
        Harm("replay_from_backup", "records_lost", "replays delivered records again as duplicates"),
    ),
    "duplicate_burst": (
        Harm("replay_from_backup", "records_lost", "replaying adds yet more duplicates"),
    ),
    "corrupt_batch": (
        Harm(
            "retry_backoff",
            "records_lost",
            "the retried batch delivers its corrupt rows, some twice",
        ),
    ),
    "out_of_range": (
        Harm("replay_from_backup", "records_lost", "replays delivered records again as duplicates"),
    ),
    "late_data": (
        Harm("scale_out", "cost", "more replicas do not make a late feed arrive sooner"),
    ),
}


def cure_for(fault: str, action: str) -> Cure | None:
    """The cure of ``fault`` that uses ``action``, or None."""
    return next((c for c in CURES[fault] if c.action == action), None)


def best_cure(fault: str) -> Cure:
    """The cure a responder who knows the fault would pick: fastest expected clearance."""
    return min(CURES[fault], key=lambda c: (c.delay_steps + 1) / c.probability)
