"""Scenario files (``configs/scenarios/*.yaml``): loading, validation, and fault schedules.

A scenario fixes the pipeline's topology, its traffic, the faults injected at given steps, an
optional rate of random faults and an optional rate of random traffic bursts (busy periods that
are not faults). ``load_scenarios`` accepts one file or a folder; any mistake is a
:class:`ScenarioError` naming the file, the key and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from envs.catalogue import DEFAULT_TOPOLOGY, FAULT_STAGES, FAULT_TYPES, MODEL_STAGE, STAGES
from envs.config_files import load_model
from envs.errors import ScenarioError
from envs.params import STEP_SECONDS

# Faults that come and go by themselves; the random generator gives them a duration.
TRANSIENT_FAULTS = frozenset(
    {"transient_timeout", "traffic_surge", "downstream_outage", "late_data"}
)


class _Strict(BaseModel):
    """Frozen, and an unknown key is an error that lists the keys allowed here."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = [k for k in data if k not in cls.model_fields]
            if unknown:
                raise ValueError(
                    f"unknown key {unknown[0]!r}; allowed keys: {', '.join(cls.model_fields)}"
                )
        return data


class Burst(_Strict):
    at: int = Field(ge=0)
    factor: float = Field(gt=0)
    duration: int = Field(ge=1)


class Load(_Strict):
    base_rps: float = Field(1000.0, gt=0)
    pattern: Literal["flat", "diurnal"] = "diurnal"
    bursts: tuple[Burst, ...] = ()


class FaultSpec(_Strict):
    type: str
    stage: str
    at: int = Field(ge=0)
    severity: float = Field(gt=0, le=1)
    duration: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _known_type_and_stage(self) -> FaultSpec:
        if self.type not in FAULT_TYPES:
            raise ValueError(f"unknown fault type {self.type!r}; allowed: {', '.join(FAULT_TYPES)}")
        allowed = FAULT_STAGES[self.type]
        if self.stage not in allowed:
            raise ValueError(
                f"fault {self.type!r} cannot target stage {self.stage!r}; allowed: {', '.join(allowed)}"
            )
        return self


class RandomFaults(_Strict):
    rate_per_hour: float = Field(ge=0)
    types: tuple[str, ...] = FAULT_TYPES

    @model_validator(mode="after")
    def _known_types(self) -> RandomFaults:
        unknown = [t for t in self.types if t not in FAULT_TYPES]
        if unknown:
            raise ValueError(
                f"unknown fault type {unknown[0]!r}; allowed: {', '.join(FAULT_TYPES)}"
            )
        return self


class RandomBursts(_Strict):
    """Traffic bursts at random times, drawn per episode like random faults: a busy hour is not
    an incident. Overlapping bursts multiply."""

    rate_per_hour: float = Field(ge=0)
    factor: tuple[float, float] = Field(
        (1.5, 2.5), description="load multiplier, uniform in [lo, hi)"
    )
    duration_steps: tuple[int, int] = Field(
        (6, 30), description="length in steps, uniform in [lo, hi]"
    )

    @model_validator(mode="after")
    def _ordered_ranges(self) -> RandomBursts:
        lo, hi = self.factor
        if not 0 < lo <= hi:
            raise ValueError(f"factor: need 0 < lo <= hi, got [{lo}, {hi}]")
        lo_d, hi_d = self.duration_steps
        if not 1 <= lo_d <= hi_d:
            raise ValueError(f"duration_steps: need 1 <= lo <= hi, got [{lo_d}, {hi_d}]")
        return self


class Scenario(_Strict):
    """One scenario file, validated."""

    name: str
    description: str = ""
    topology: tuple[str, ...] = DEFAULT_TOPOLOGY
    duration_steps: int = Field(360, ge=10)
    load: Load = Load()
    faults: tuple[FaultSpec, ...] = ()
    random_faults: RandomFaults | None = None
    random_bursts: RandomBursts | None = None
    seed: int = 0

    @model_validator(mode="after")
    def _consistent(self) -> Scenario:
        for stage in self.topology:
            if stage not in STAGES:
                raise ValueError(f"topology: unknown stage {stage!r}; allowed: {', '.join(STAGES)}")
        if "ingest" not in self.topology or "load" not in self.topology:
            raise ValueError("topology must contain at least 'ingest' and 'load'")
        if list(self.topology) != [s for s in STAGES if s in self.topology]:
            raise ValueError(
                f"topology: stages must be listed once each, in pipeline order {', '.join(STAGES)}"
            )
        for i, fault in enumerate(self.faults):
            if fault.stage not in self.topology:
                raise ValueError(
                    f"faults.{i}.stage: {fault.stage!r} is not in the topology {list(self.topology)}"
                )
            if fault.at >= self.duration_steps:
                raise ValueError(
                    f"faults.{i}.at: {fault.at} is not before duration_steps {self.duration_steps}"
                )
        if MODEL_STAGE not in self.topology and self.random_faults is not None:
            needs_model = [t for t in self.random_faults.types if FAULT_STAGES[t] == (MODEL_STAGE,)]
            if needs_model:
                raise ValueError(
                    f"random_faults.types: {needs_model} need a 'model' stage in the topology"
                )
        return self


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate one scenario file."""
    return load_model(path, Scenario, what="scenario file", error=ScenarioError, allow_empty=False)


def load_scenarios(path: str | Path) -> list[Scenario]:
    """Load a single scenario file, or every ``*.yaml``/``*.yml`` file in a folder (sorted)."""
    path = Path(path)
    if path.is_dir():
        files = sorted([*path.glob("*.yaml"), *path.glob("*.yml")])
        if not files:
            raise ScenarioError(f"{path}: folder holds no *.yaml scenario files")
    elif path.exists():
        files = [path]
    else:
        raise ScenarioError(f"{path}: no such scenario file or folder")
    scenarios = [load_scenario(f) for f in files]
    names = [s.name for s in scenarios]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ScenarioError(f"{path}: scenario names must be unique; repeated: {dupes}")
    return scenarios


@dataclass(frozen=True)
class FaultSchedule:
    """The faults of one episode as arrays (one entry per fault), ready for the simulator."""

    types: np.ndarray  # int, index into FAULT_TYPES
    stages: np.ndarray  # int, index into the scenario's topology
    onsets: np.ndarray  # int steps
    severities: np.ndarray  # float in (0, 1]
    ends: np.ndarray  # int step at which the fault goes away by itself (huge if never)

    def __len__(self) -> int:
        return len(self.types)


NEVER = np.iinfo(np.int32).max // 2


def _poisson_count(rate_per_hour: float, duration_steps: int, rng: np.random.Generator) -> int:
    """How many events a Poisson process of ``rate_per_hour`` puts in an episode."""
    hours = duration_steps * STEP_SECONDS / 3600.0
    return int(rng.poisson(rate_per_hour * hours))


def draw_fault_schedule(scenario: Scenario, rng: np.random.Generator) -> FaultSchedule:
    """The scheduled faults plus random ones drawn from ``rng`` (a Poisson process)."""
    specs: list[tuple[str, str, int, float, int | None]] = [
        (f.type, f.stage, f.at, f.severity, f.duration) for f in scenario.faults
    ]
    if scenario.random_faults is not None and scenario.random_faults.rate_per_hour > 0:
        n = _poisson_count(scenario.random_faults.rate_per_hour, scenario.duration_steps, rng)
        types = [
            t for t in scenario.random_faults.types if set(FAULT_STAGES[t]) & set(scenario.topology)
        ]
        for _ in range(n):
            ftype = types[rng.integers(len(types))]
            stages = [s for s in FAULT_STAGES[ftype] if s in scenario.topology]
            stage = stages[rng.integers(len(stages))]
            # Leave the last tenth of the episode fault-free so every fault has a chance to be fixed.
            at = int(rng.integers(0, max(1, int(scenario.duration_steps * 0.9))))
            severity = float(rng.uniform(0.3, 0.9))
            duration = int(rng.integers(12, 61)) if ftype in TRANSIENT_FAULTS else None
            specs.append((ftype, stage, at, severity, duration))
    specs.sort(key=lambda s: s[2])
    return FaultSchedule(
        types=np.array([FAULT_TYPES.index(s[0]) for s in specs], dtype=np.int64),
        stages=np.array([scenario.topology.index(s[1]) for s in specs], dtype=np.int64),
        onsets=np.array([s[2] for s in specs], dtype=np.int64),
        severities=np.array([s[3] for s in specs], dtype=np.float64),
        ends=np.array([NEVER if s[4] is None else s[2] + s[4] for s in specs], dtype=np.int64),
    )


def draw_bursts(scenario: Scenario, rng: np.random.Generator) -> tuple[Burst, ...]:
    """The scenario's scheduled traffic bursts plus random ones drawn from ``rng`` (a Poisson
    process, onsets uniform over the episode). Without ``random_bursts`` nothing is drawn, so
    ``rng`` is left as it was."""
    bursts = scenario.load.bursts
    spec = scenario.random_bursts
    if spec is None or spec.rate_per_hour == 0:
        return bursts
    steps = scenario.duration_steps
    drawn = tuple(
        Burst(
            at=int(rng.integers(steps)),
            factor=float(rng.uniform(*spec.factor)),
            duration=int(rng.integers(spec.duration_steps[0], spec.duration_steps[1] + 1)),
        )
        for _ in range(_poisson_count(spec.rate_per_hour, steps, rng))
    )
    return bursts + drawn
