"""What a policy is, and the registry that names them.

A policy sees a batch of telemetry (one row per pipeline) and answers one action and one target
stage per pipeline. Policies are looked up by name (``oncall``, ``runbook``, ``oracle``; the
learned ``flat`` and ``hierarchical`` register themselves the same way), so the evaluation
harness and the CLI never need to know which kinds exist.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from envs.errors import ConfigError
from envs.params import SimParams
from envs.simulator import GroundTruth
from envs.telemetry import Telemetry


@dataclass(frozen=True)
class EpisodeContext:
    """What a policy may know before an episode starts: the pipeline's shape and its SLOs."""

    n: int
    topology: tuple[str, ...]
    params: SimParams


class Policy(Protocol):
    """The interface every policy implements."""

    name: str
    #: True only for the oracles: they are handed the simulator's ground truth each step.
    #: An oracle may also set ``ground_truth_shown_only = True`` to be handed only the faults
    #: telemetry can show (``PipelineSim.ground_truth(shown_only=True)``); absent means False.
    needs_ground_truth: bool

    def reset(self, ctx: EpisodeContext) -> None:
        """Forget everything about previous episodes."""

    def act(
        self, telemetry: Telemetry, truth: GroundTruth | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Actions (ids into ``SIM_ACTIONS``) and target stages (topology indices), shape (n,)."""


_REGISTRY: dict[str, Callable[[], Policy]] = {}
_VERSIONED: dict[str, Callable[[int], Policy]] = {}


def register_policy(
    name: str,
    factory: Callable[[], Policy],
    *,
    versioned: Callable[[int], Policy] | None = None,
) -> None:
    """Make ``name`` available to ``make_policy`` (and so to ``pipemedic evaluate``); with
    ``versioned``, also ``name:vN``, the stored version N (the learned kinds)."""
    _REGISTRY[name] = factory
    if versioned is not None:
        _VERSIONED[name] = versioned


def available_policies() -> list[str]:
    _load_builtin_policies()
    return sorted(_REGISTRY)


def make_policy(name: str) -> Policy:
    """A fresh policy by name, or ``KIND:vN`` for a stored version of a learned kind; an
    unknown name is a ConfigError listing the known ones."""
    _load_builtin_policies()
    kind, colon, version = name.partition(":")
    if colon:
        if kind not in _VERSIONED or not re.fullmatch(r"v[1-9]\d*", version):
            raise ConfigError(
                f"policy {name!r}: KIND:vN names a stored version (N from 1) of a learned kind, "
                f"KIND one of {', '.join(sorted(_VERSIONED))}"
            )
        return _VERSIONED[kind](int(version[1:]))
    if name not in _REGISTRY:
        raise ConfigError(
            f"unknown policy {name!r}; available: {', '.join(sorted(_REGISTRY))} "
            f"(and {', '.join(f'{k}:vN' for k in sorted(_VERSIONED))} for a stored version)"
        )
    return _REGISTRY[name]()


def _load_builtin_policies() -> None:
    # Imported for their registration side effect; late to avoid an import cycle.
    import agents.baselines  # noqa: F401
    import agents.inference  # noqa: F401
