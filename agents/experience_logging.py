"""Training writes samples of its experience to the experience table.

``log_sampled_experience`` is an RLlib ``on_sample_end`` callback: it runs inside each env runner
and, every ``every_n_samples``-th sample call, appends the transitions of the episodes just
sampled (every agent's observation, action mask, action, its probability, reward, next
observation, termination flags) with ``source = "sim"`` and ``policy_version =
"train:RUN:WEIGHTS_SEQ"``. Each env runner process has its own writer, so runners append side by
side; ``checkpoints.storage.append_batch`` keeps that safe.

The settings travel to the runners inside the callback (a ``functools.partial``), so runners
need no shared files, only access to the store (``PIPEMEDIC_STORE_URI`` is passed to local
workers; on a cluster set it in the job's environment).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from envs.multi_agent_env import split_agent_id

log = logging.getLogger(__name__)


class ExperienceLoggingConfig(BaseModel):
    """``experience`` in ``configs/train.yaml``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    every_n_samples: int = Field(
        5, ge=1, description="write the episodes of every n-th sample call of each runner"
    )


# One writer per env-runner process and run; kept across callback calls.
_WRITERS: dict[str, Any] = {}
_CALLS: dict[str, int] = {}


def log_sampled_experience(
    settings: dict[str, Any], *, env_runner=None, samples=None, **_: Any
) -> None:
    """RLlib ``on_sample_end`` hook (bind ``settings`` with ``functools.partial``): ``run_id``,
    ``store_root`` (None = the environment's), ``every_n_samples``, ``scenario``."""
    run_id = settings["run_id"]
    _CALLS[run_id] = _CALLS.get(run_id, 0) + 1
    if (_CALLS[run_id] - 1) % settings["every_n_samples"] or not samples:
        return
    from checkpoints.experience import ExperienceWriter, experience_uri

    writer = _WRITERS.get(run_id)
    if writer is None:
        writer = ExperienceWriter(
            run_id=run_id, source="sim", uri=experience_uri(settings.get("store_root"))
        )
        _WRITERS[run_id] = writer
    seq = getattr(env_runner, "_weights_seq_no", 0)
    try:
        for batch in episodes_to_transitions(samples, policy_version=f"train:{run_id}:{seq}"):
            writer.add(batch)
        writer.flush()
    except Exception as exc:  # logging experience must never stop training
        log.error("could not write sampled experience: %s", exc)


def episodes_to_transitions(episodes, *, policy_version: str) -> list:
    """One ``Transitions`` batch per (episode chunk, agent) with at least one full step."""
    from checkpoints.experience import Transitions

    out = []
    for episode in episodes:
        for aid, agent_episode in episode.agent_episodes.items():
            actions = np.asarray(agent_episode.get_actions())
            n = len(actions)
            observations = agent_episode.get_observations()
            if n == 0 or len(observations["observations"]) < n + 1:
                continue  # a step without its next observation is not a transition yet
            obs = np.asarray(observations["observations"], dtype=np.float32)
            mask = np.asarray(observations["action_mask"]) > 0
            logp = np.asarray(agent_episode.get_extra_model_outputs("action_logp"), np.float32)
            role, pipeline = split_agent_id(aid)
            terminated = np.zeros(n, dtype=bool)
            truncated = np.zeros(n, dtype=bool)
            terminated[-1] = agent_episode.is_terminated
            truncated[-1] = agent_episode.is_truncated
            out.append(
                Transitions(
                    episode=[f"{episode.id_}/{pipeline}"] * n,
                    step=agent_episode.t_started + np.arange(n),
                    agent=[role] * n,
                    observation=obs[:n],
                    next_observation=obs[1 : n + 1],
                    action_mask=mask[:n],
                    action=actions,
                    action_prob=np.exp(logp[:n]),
                    reward=np.asarray(agent_episode.get_rewards(), dtype=np.float32),
                    terminated=terminated,
                    truncated=truncated,
                    policy_version=policy_version,
                    scenario="training-mix",
                )
            )
    return out
