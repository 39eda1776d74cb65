"""Telemetry → fixed-size observation vectors and action masks, for training and serving alike.

Every learned policy sees the pipeline through :class:`ObservationEncoder`, whether the telemetry
comes from the simulator (training, evaluation) or from an HTTP request (serving), so the two
can never disagree about what a feature means.

Layout
    Stages are placed in the canonical slots of ``STAGES`` (ingest, validate, transform, load,
    model); a stage the pipeline does not have is all zeros and every action on it is masked.
    Each metric is squashed to roughly [0, 1] (rates on a log scale, traffic relative to the
    pipeline's usual inflow, latency and freshness relative to their SLO). The encoder keeps,
    per pipeline, the last value seen of every metric (telemetry is partial: a missing value
    repeats the last one), a slow moving average, its picture of "usual", and a fast one of the
    last few steps. "Usual" starts at a metric's first *observed* reading and is the plain mean
    of the readings until the slow average's memory is reached (rate ``max(1/k, BASELINE_RATE)``
    after ``k`` readings), so neither one noisy first reading nor a first reading that was
    missing (which would read as zero) stays in it for the next hundred steps. The observation has three blocks (``FEATURE_BLOCKS``): the current value,
    its departure from usual, and the recent average, which carries a third of a single
    reading's noise variance, so a slow climb (a memory leak's) stands out of the noise
    sooner; then the last action taken.

Views
    ``master`` and ``flat`` see every metric; a specialist sees its domain's metrics only
    (``DOMAIN_STAGE_METRICS``) plus the pipeline-wide ones.

Action spaces
    A specialist (and ``flat``) chooses one (action, stage slot) pair, encoded as
    ``action_index * N_SLOTS + slot``. Masked out: slots the pipeline lacks, model actions on
    anything but the model stage, ``observe``/``escalate`` on any slot but the first (they take
    no target), ``scale_out`` at the replica limit, ``scale_in`` at one replica and ``escalate``
    while a human is already on the way.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from envs.catalogue import (
    ACTION_ID,
    DOMAINS,
    MASTER_ACTIONS,
    MODEL_STAGE,
    SIM_ACTIONS,
    SPECIALIST_ACTIONS,
    STAGES,
)
from envs.params import SimParams, SloParams
from envs.telemetry import PIPELINE_INDEX, STAGE_INDEX, STAGE_METRICS, Telemetry

N_SLOTS = len(STAGES)
MODEL_SLOT = STAGES.index(MODEL_STAGE)
#: Actions that act on the model rather than on a stage of the data path.
MODEL_ACTIONS = frozenset({"retrain_model", "rollback_model"})
#: Actions that take no target stage.
UNTARGETED_ACTIONS = frozenset({"observe", "escalate"})

#: The per-stage metrics each specialist sees.
DOMAIN_STAGE_METRICS: dict[str, tuple[str, ...]] = {
    "drift": (
        "throughput_out_rps",
        "error_rate",
        "invalid_rate",
        "schema_mismatch",
        "feature_psi",
        "null_rate",
        "oor_rate",
    ),
    "infra": (
        "throughput_in_rps",
        "throughput_out_rps",
        "queue",
        "latency_p99_s",
        "error_rate",
        "timeout_rate",
        "cpu",
        "mem",
        "replicas",
        "replicas_ready",
        "retry_on",
        "throttle_on",
    ),
    "quality": (
        "throughput_in_rps",
        "throughput_out_rps",
        "error_rate",
        "null_rate",
        "dup_rate",
        "oor_rate",
        "invalid_rate",
        "schema_mismatch",
        "dedupe_on",
    ),
}
#: Observation values are clipped to this range (they are squashed to about [-2, 10] anyway).
OBS_BOUND = 10.0
# How fast the picture of "usual" follows the telemetry (per step; ~50 steps of memory).
BASELINE_RATE = 0.02
#: How fast the recent average follows the telemetry: weights 1/2, 1/4, 1/8... on the last
#: readings. Independent noise keeps rate / (2 - rate) = 1/3 of its variance; a steady climb
#: lags by (1 - rate) / rate = 1 step.
RECENT_RATE = 0.5
#: The blocks of the feature vector, in order; each is every (slot, stage metric), then the
#: pipeline features.
FEATURE_BLOCKS: tuple[str, ...] = ("current", "departure", "recent")


def clip(x: np.ndarray, low: float, high: float) -> np.ndarray:
    """``np.clip`` as two ufunc calls: the same values (NaN stays NaN), without ``np.clip``'s
    dispatch overhead, which dominated encoding one pipeline (~20 calls per step)."""
    return np.minimum(np.maximum(x, low), high)


def _lograte(x: np.ndarray) -> np.ndarray:
    """A rate in [1e-4, 1] on a log scale mapped to [0, 1]."""
    return np.log10(clip(x, 1e-4, 1.0) * 1e4) / 4.0


# Pipeline-wide features, in order: (the pipeline metric it is made of, how it is squashed given
# the SLOs): the 7 raw metrics, then 3 SLO ratios. What a feature is made of also tells the
# encoder when it has been read (ObservationEncoder._follow_rates).
_PIPELINE_FEATURES: tuple[tuple[str, Callable[[np.ndarray, SloParams], np.ndarray]], ...] = (
    ("e2e_latency_p99_s", lambda x, slo: np.log1p(x) / 6),
    ("e2e_error_rate", lambda x, slo: _lograte(x)),
    ("freshness_s", lambda x, slo: np.log1p(x) / 8),
    ("model_accuracy", lambda x, slo: clip(x, 0, 1)),
    ("prediction_psi", lambda x, slo: np.log1p(clip(x, 0, 100))),
    ("model_age_steps", lambda x, slo: np.log1p(x) / 12),
    ("human_paged", lambda x, slo: x),
    ("e2e_latency_p99_s", lambda x, slo: clip(x / slo.p99_latency_s, 0, 10) / 10),
    ("e2e_error_rate", lambda x, slo: clip(x / slo.error_rate, 0, 10) / 10),
    ("freshness_s", lambda x, slo: clip(x / slo.freshness_s, 0, 10) / 10),
)
_N_PIPELINE_FEATURES = len(_PIPELINE_FEATURES)
_PIPELINE_FEATURE_SOURCE = np.array([PIPELINE_INDEX[m] for m, _ in _PIPELINE_FEATURES])


def _follow_rate(readings: np.ndarray) -> np.ndarray:
    """The rate at which a "usual" value follows a reading, given how many readings it has
    taken in (this one included): the plain mean of them (1/k) until ``BASELINE_RATE`` is
    larger; 1 before any (the usual is the current value)."""
    return np.maximum(1.0 / np.maximum(readings, 1.0), BASELINE_RATE)


@dataclass(frozen=True)
class ActionLayout:
    """One agent's discrete action space: concrete actions × stage slots (or master actions)."""

    agent: str
    actions: tuple[str, ...]
    targeted: bool  # False for the master: its actions take no stage

    @property
    def size(self) -> int:
        return len(self.actions) * (N_SLOTS if self.targeted else 1)

    def decode(self, index: int) -> tuple[str, int]:
        """(action name, stage slot) of a flat index."""
        if not self.targeted:
            return self.actions[index], 0
        return self.actions[index // N_SLOTS], index % N_SLOTS

    def encode(self, action: str, slot: int = 0) -> int:
        i = self.actions.index(action)
        return i * N_SLOTS + slot if self.targeted else i


MASTER_LAYOUT = ActionLayout("master", MASTER_ACTIONS, targeted=False)
SPECIALIST_LAYOUTS = {d: ActionLayout(d, SPECIALIST_ACTIONS[d], targeted=True) for d in DOMAINS}
FLAT_LAYOUT = ActionLayout("flat", SIM_ACTIONS, targeted=True)
LAYOUTS: dict[str, ActionLayout] = {
    "master": MASTER_LAYOUT,
    **SPECIALIST_LAYOUTS,
    "flat": FLAT_LAYOUT,
}


def observation_size(view: str) -> int:
    """Length of the observation vector of a view (``master``, ``flat`` or a domain)."""
    n_metrics = (
        len(STAGE_METRICS) if view in ("master", "flat") else len(DOMAIN_STAGE_METRICS[view])
    )
    per_block = N_SLOTS * n_metrics + _N_PIPELINE_FEATURES
    return len(FEATURE_BLOCKS) * per_block + len(SIM_ACTIONS) + N_SLOTS + 1


class ObservationEncoder:
    """Stateful encoder for ``n`` pipelines of one topology (see the module docstring)."""

    def __init__(self, topology: tuple[str, ...], params: SimParams, n: int = 1):
        self.topology = tuple(topology)
        self.params = params
        self.n = n
        self.slots = np.array([STAGES.index(s) for s in self.topology], dtype=np.int64)
        self.present = np.zeros(N_SLOTS, dtype=bool)
        self.present[self.slots] = True
        #: Topology index of each slot (0 for slots the pipeline lacks; they are masked).
        self.stage_of_slot = np.zeros(N_SLOTS, dtype=np.int64)
        self.stage_of_slot[self.slots] = np.arange(len(self.slots))
        self._view_columns = {
            d: np.array([STAGE_INDEX[m] for m in DOMAIN_STAGE_METRICS[d]]) for d in DOMAINS
        }
        # Per feature of a block: the column, in [stage readings (topology order, flattened),
        # pipeline readings, a constant], of the telemetry value it is made of.
        n_metrics, n_stage_values = len(STAGE_METRICS), len(self.slots) * len(STAGE_METRICS)
        n_pipeline = len(PIPELINE_INDEX)
        stage_source = np.full((N_SLOTS, n_metrics), n_stage_values + n_pipeline)
        stage_source[self.slots] = np.arange(n_stage_values).reshape(len(self.slots), n_metrics)
        self._feature_source = np.concatenate(
            [stage_source.ravel(), n_stage_values + _PIPELINE_FEATURE_SOURCE]
        )
        self.reset()

    def reset(self) -> None:
        self._last_stage: np.ndarray | None = None
        self._last_pipeline: np.ndarray | None = None
        self._usual: np.ndarray | None = None
        self._recent: np.ndarray | None = None
        self._usual_inflow = np.ones(self.n)  # rps; the first reading replaces it
        # Per feature (and per pipeline for the inflow): readings seen so far, which set the
        # rate at which "usual" follows (module docstring); 0 until the first observed one.
        self._seen: np.ndarray | None = None
        self._inflow_seen = np.zeros(self.n)
        self.last_action = np.full(self.n, ACTION_ID["observe"], dtype=np.int64)
        self.last_slot = np.zeros(self.n, dtype=np.int64)
        self.steps_since_action = np.zeros(self.n)
        self.features = np.zeros((self.n, 0), dtype=np.float32)
        self.replicas = np.full((self.n, N_SLOTS), float(self.params.replicas))
        self.human_paged = np.zeros(self.n, dtype=bool)

    # ------------------------------------------------------------------ telemetry
    def update(self, tel: Telemetry) -> None:
        """Take in the next telemetry snapshot (call once per step, before ``observe``)."""
        stage = tel.stage.astype(np.float64)
        pipe = tel.pipeline.astype(np.float64)
        stage_seen, pipe_seen = ~np.isnan(stage), ~np.isnan(pipe)
        if self._last_stage is None:
            # Nothing seen yet: a missing value reads as zero (the pipeline's quiet state) until
            # its first reading; it does not enter "usual" (see _follow_rates).
            self._last_stage = np.zeros_like(stage)
            self._last_pipeline = np.zeros_like(pipe)
            self._last_pipeline[:, PIPELINE_INDEX["model_accuracy"]] = self.params.base_accuracy
        stage = np.where(stage_seen, stage, self._last_stage)
        pipe = np.where(pipe_seen, pipe, self._last_pipeline)
        self._last_stage, self._last_pipeline = stage, pipe

        self._update_usual_inflow(tel.stage[:, :, STAGE_INDEX["throughput_in_rps"]])
        current = self._squash(stage, pipe)
        if self._usual is None:
            self._usual = current.copy()
            self._recent = current.copy()
            self._seen = np.zeros_like(current)
        usual_rate, first = self._follow_rates(stage_seen, pipe_seen)
        # A feature read for the first time starts both averages at its reading.
        self._usual = np.where(first, current, self._usual)
        self._recent = np.where(
            first, current, self._recent + RECENT_RATE * (current - self._recent)
        )
        self.features = np.concatenate([current, current - self._usual, self._recent], axis=1)
        self._usual += usual_rate * (current - self._usual)

        slots = np.zeros((self.n, N_SLOTS))
        slots[:, self.slots] = stage[:, :, STAGE_INDEX["replicas"]]
        self.replicas = np.where(self.present, slots, 1.0)
        self.human_paged = pipe[:, PIPELINE_INDEX["human_paged"]] > 0.5

    def copy(self) -> ObservationEncoder:
        """An independent copy (cheap: the parameters and topology are shared, read-only)."""
        twin = copy.copy(self)
        # The arrays updated in place (the others are replaced whole on each update).
        for name in ("_usual", "_recent", "_usual_inflow", "_seen", "_inflow_seen"):
            value = getattr(self, name)
            setattr(twin, name, None if value is None else value.copy())
        return twin

    def _update_usual_inflow(self, inflow: np.ndarray) -> None:
        """Follow the pipeline's usual inflow (rps) from this step's raw stage inflows
        (n, n_stages), NaN where missing. Ingest's reading is the pipeline's inflow; when it is
        missing, the mean of the other stages' readings stands in (records pass through every
        stage, so each sees about the same rate). The first reading sets it and the mean of
        the readings follows until ``BASELINE_RATE`` takes over, as for "usual"."""
        reading = inflow[:, 0]
        missing = np.isnan(reading)
        if missing.any():  # rare (3% of steps): the mean of the stages that were read
            read_at = ~np.isnan(inflow)
            count = read_at.sum(axis=1)
            others = np.where(read_at, inflow, 0.0).sum(axis=1) / np.maximum(count, 1)
            reading = np.where(missing & (count > 0), others, reading)
        read = ~np.isnan(reading)
        self._inflow_seen += read
        rate = np.where(read, _follow_rate(self._inflow_seen), 0.0)
        # Floored at 1 rps: a usual inflow near 0 makes every rate over it huge, and a reading
        # near the float limit over one below 1 overflowed to inf (the departure came out inf).
        self._usual_inflow = np.maximum(
            self._usual_inflow + rate * (np.nan_to_num(reading) - self._usual_inflow), 1.0
        )

    def _follow_rates(
        self, stage_seen: np.ndarray, pipe_seen: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per feature, the rate at which "usual" follows this step's value and whether the
        feature was read for the first time now, both (n, n_features). A feature counts as
        read once its telemetry value (or, for the pipeline features, the metric it is made
        of) has been observed; until then "usual" simply equals the current value."""
        always = np.ones((self.n, 1), dtype=bool)  # slots the pipeline lacks: nothing to read
        readings = np.concatenate([stage_seen.reshape(self.n, -1), pipe_seen, always], axis=1)
        seen = readings[:, self._feature_source]
        first = seen & (self._seen == 0)
        self._seen += seen
        return _follow_rate(self._seen), first

    def last_values(self) -> tuple[np.ndarray, np.ndarray]:
        """The raw telemetry as last seen, gaps filled with earlier values: stage metrics
        (n, n_stages, len(STAGE_METRICS)) in topology order and pipeline metrics (n, 7)."""
        if self._last_stage is None:
            raise RuntimeError("no telemetry seen yet; call update() first")
        return self._last_stage, self._last_pipeline

    def _squash(self, stage: np.ndarray, pipe: np.ndarray) -> np.ndarray:
        """Per pipeline: squashed stage metrics in slot order, then pipeline features."""
        p, ix = self.params, STAGE_INDEX
        usual = self._usual_inflow[:, None]
        x = np.zeros((self.n, N_SLOTS, len(STAGE_METRICS)))
        s = np.zeros_like(stage)
        s[..., ix["throughput_in_rps"]] = stage[..., ix["throughput_in_rps"]] / usual / 2
        s[..., ix["throughput_out_rps"]] = stage[..., ix["throughput_out_rps"]] / usual / 2
        s[..., ix["queue"]] = np.log1p(stage[..., ix["queue"]] / usual) / 6
        s[..., ix["latency_p99_s"]] = np.log1p(stage[..., ix["latency_p99_s"]]) / 6
        for m in (
            "error_rate",
            "timeout_rate",
            "null_rate",
            "dup_rate",
            "oor_rate",
            "invalid_rate",
        ):
            s[..., ix[m]] = _lograte(stage[..., ix[m]])
        for m in ("cpu", "mem", "schema_mismatch", "retry_on", "dedupe_on", "throttle_on"):
            s[..., ix[m]] = clip(stage[..., ix[m]], 0, 2)
        for m in ("replicas", "replicas_ready"):
            s[..., ix[m]] = stage[..., ix[m]] / p.max_replicas
        s[..., ix["feature_psi"]] = np.log1p(clip(stage[..., ix["feature_psi"]], 0, 100))
        x[:, self.slots] = s

        pf = np.stack(
            [squash(pipe[:, PIPELINE_INDEX[m]], p.slo) for m, squash in _PIPELINE_FEATURES],
            axis=1,
        )
        return np.concatenate([x.reshape(self.n, -1), pf], axis=1)

    def record_action(self, actions: np.ndarray, slots: np.ndarray) -> None:
        """Remember what was done (sim action ids, stage slots); part of the next observation."""
        acted = actions != ACTION_ID["observe"]
        self.last_action = np.where(acted, actions, self.last_action)
        self.last_slot = np.where(acted, slots, self.last_slot)
        self.steps_since_action = np.where(acted, 0.0, self.steps_since_action + 1)

    # ------------------------------------------------------------------ observations
    def observe(self, view: str) -> np.ndarray:
        """Observation vectors of one view, shape (n, observation_size(view)), float32."""
        f = self.features
        if view not in ("master", "flat"):
            cols = self._view_columns[view]
            parts = []
            for name in FEATURE_BLOCKS:
                stage, pipe = self.block(name)
                parts += [stage[:, :, cols].reshape(self.n, -1), pipe]
            f = np.concatenate(parts, axis=1)
        context = np.concatenate(
            [
                np.eye(len(SIM_ACTIONS))[self.last_action],
                np.eye(N_SLOTS)[self.last_slot],
                np.log1p(self.steps_since_action)[:, None] / 6,
            ],
            axis=1,
        )
        return np.concatenate([f, context], axis=1).astype(np.float32)

    def block(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """One block of the features (``FEATURE_BLOCKS``): stage metrics in slot order,
        (n, N_SLOTS, len(STAGE_METRICS)), and pipeline features (n, _N_PIPELINE_FEATURES)."""
        per_block = self.features.shape[1] // len(FEATURE_BLOCKS)
        start = FEATURE_BLOCKS.index(name) * per_block
        b = self.features[:, start : start + per_block]
        n_stage = N_SLOTS * len(STAGE_METRICS)
        return b[:, :n_stage].reshape(self.n, N_SLOTS, -1), b[:, n_stage:]

    def action_mask(self, agent: str) -> np.ndarray:
        """1 where an action of ``agent``'s layout is allowed now, shape (n, layout size)."""
        layout = LAYOUTS[agent]
        if not layout.targeted:
            mask = np.ones((self.n, layout.size), dtype=np.float32)
            if "escalate" in layout.actions:
                mask[self.human_paged, layout.encode("escalate")] = 0.0
            return mask
        mask = np.zeros((self.n, len(layout.actions), N_SLOTS), dtype=np.float32)
        for i, action in enumerate(layout.actions):
            if action in UNTARGETED_ACTIONS:
                mask[:, i, 0] = 1.0
            elif action in MODEL_ACTIONS:
                mask[:, i, MODEL_SLOT] = float(self.present[MODEL_SLOT])
            else:
                mask[:, i, :] = self.present
            if action == "scale_out":
                mask[:, i, :] *= self.replicas < self.params.max_replicas
            elif action == "scale_in":
                mask[:, i, :] *= self.replicas > 1
            elif action == "escalate":
                mask[self.human_paged, i, :] = 0.0
        return mask.reshape(self.n, -1)

    def to_sim(self, agent: str, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Flat action indices of a targeted layout → (sim action ids, topology stage indices)."""
        layout = LAYOUTS[agent]
        index = np.asarray(index, dtype=np.int64)
        action_ids = np.array([ACTION_ID[a] for a in layout.actions])[index // N_SLOTS]
        return action_ids, self.stage_of_slot[index % N_SLOTS]
