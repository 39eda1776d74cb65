"""The training configuration (``configs/train.yaml``) and the RLlib PPO config built from it.

``TrainConfig`` validates the YAML (unknown keys are errors); ``build_ppo_config`` turns it into
an RLlib ``PPOConfig`` on the new API stack: one ``MaskedPPOModule`` per agent (``master``,
``drift``, ``infra``, ``quality``, or just ``flat``), each agent mapped to the module of its own
name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from agents.delegation_gate import DelegationGateConfig
from agents.experience_logging import ExperienceLoggingConfig
from agents.inference import AGENTS_OF_KIND
from agents.warm_start import WarmStartConfig
from envs.catalogue import DOMAINS
from envs.config_files import load_model
from envs.multi_agent_env import EnvConfig, RandomTraining, RewardWeights, module_of
from envs.params import load_sim_params
from envs.scenario import load_scenario


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EnvSection(_Strict):
    scenarios: tuple[str, ...] = ()
    random: RandomTraining = RandomTraining()
    max_episode_steps: int | None = Field(200, ge=10)
    rewards: RewardWeights = RewardWeights()
    pipelines: int = Field(8, ge=1)
    sim_config: str | None = None


class PPOSection(_Strict):
    env_runners: int = Field(2, ge=0)
    envs_per_runner: int = Field(4, ge=1)
    train_batch_size: int = Field(4000, ge=64)
    minibatch_size: int = Field(500, ge=16)
    num_epochs: int = Field(6, ge=1)
    lr: float = Field(3e-4, gt=0)
    gamma: float = Field(0.98, gt=0, le=1)
    lambda_: float = Field(0.95, ge=0, le=1, alias="lambda")
    clip_param: float = Field(0.2, gt=0)
    entropy_coeff: float = Field(0.01, ge=0)
    vf_loss_coeff: float = Field(0.5, ge=0)
    hidden: tuple[int, ...] = (128, 128)
    train_modules: tuple[str, ...] = Field(
        (),
        description="hierarchy modules PPO updates (empty: all); the others keep their "
        "warm-start weights, e.g. [master] fine-tunes the routing over fixed specialists. "
        "A flat policy has one module and always trains it, so flat ignores this list, and "
        "one config serves both kinds",
    )


class StopSection(_Strict):
    pipeline_steps: int = Field(1_000_000, ge=1, description="simulated pipeline steps (10 s each)")
    minutes: float = Field(28.0, gt=0)
    validation_score: float | None = Field(
        None, description="also stop once a review scores at or below this (lower is better)"
    )


class TrainConfig(_Strict):
    kind: Literal["hierarchical", "flat"] = "hierarchical"
    seed: int = 0
    env: EnvSection = EnvSection()
    held_out: tuple[str, ...] = ()
    ppo: PPOSection = PPOSection()
    stop: StopSection = StopSection()
    checkpoint_every: int = Field(5, ge=1)
    evaluate_every: int = Field(10, ge=1)
    eval_episodes: int = Field(3, ge=1)
    act_thresholds: tuple[Annotated[float, Field(gt=0, lt=1)], ...] = Field(
        (),
        description="act thresholds tried, besides greedy, at every review; the validation "
        "score picks (agents.inference)",
    )
    hand_raise_thresholds: dict[str, tuple[Annotated[float, Field(gt=0, lt=1)], ...]] = Field(
        {},
        description="per specialist, hand-raise thresholds tried at every review, each alone, "
        "besides none (hierarchical only; flat ignores them); the validation score picks "
        "(agents.inference)",
    )
    delegation_gate: DelegationGateConfig = Field(
        DelegationGateConfig(),
        description="a learned rule for the master's choice, fitted and scored at every review "
        "(hierarchical only; flat ignores it; agents.delegation_gate)",
    )
    warm_start: WarmStartConfig = WarmStartConfig()
    experience: ExperienceLoggingConfig = ExperienceLoggingConfig()

    @model_validator(mode="after")
    def _held_out_never_trained(self) -> TrainConfig:
        both = {Path(p).resolve() for p in self.env.scenarios} & {
            Path(p).resolve() for p in self.held_out
        }
        if both:
            raise ValueError(
                f"held_out scenarios must not be trained on; listed in both: {sorted(map(str, both))}"
            )
        return self

    @model_validator(mode="after")
    def _hand_raisers_are_specialists(self) -> TrainConfig:
        unknown = sorted(set(self.hand_raise_thresholds) - set(DOMAINS))
        if unknown:
            raise ValueError(
                f"hand_raise_thresholds: {unknown} are not specialists; expected some of {list(DOMAINS)}"
            )
        return self

    @model_validator(mode="after")
    def _train_modules_exist(self) -> TrainConfig:
        known = AGENTS_OF_KIND["hierarchical"]
        unknown = [m for m in self.ppo.train_modules if m not in known]
        if unknown:
            raise ValueError(
                f"ppo.train_modules: no module {unknown[0]!r} in a hierarchical policy; "
                f"allowed: {', '.join(known)} (a flat policy always trains its one module)"
            )
        return self

    def modules_to_train(self) -> tuple[str, ...]:
        """The modules PPO updates in this kind's run; empty means all of them."""
        return self.ppo.train_modules if self.kind == "hierarchical" else ()

    def env_config(self) -> EnvConfig:
        """The environment's config with files already read, so workers need no file access
        (on a cluster they may not share the driver's folder)."""
        return EnvConfig(
            mode=self.kind,
            sim=load_sim_params(self.env.sim_config),
            scenarios=tuple(load_scenario(p) for p in self.env.scenarios),
            random=self.env.random,
            max_episode_steps=self.env.max_episode_steps,
            rewards=self.env.rewards,
            pipelines=self.env.pipelines,
        )


def load_train_config(path: str | Path, **overrides) -> TrainConfig:
    """Read and validate a training config; ``overrides`` replace top-level keys (e.g. kind)."""
    return load_model(path, TrainConfig, what="training config", overrides=overrides)


def build_ppo_config(cfg: TrainConfig, *, run_id: str | None = None):
    """RLlib's PPOConfig for this training config (new API stack, PyTorch). With ``run_id``
    and ``cfg.experience.enabled`` the env runners write samples of their experience to the
    experience table (``agents.experience_logging``)."""
    import functools

    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.rllib.core.rl_module.multi_rl_module import MultiRLModuleSpec
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec

    from agents.experience_logging import log_sampled_experience
    from agents.rl_module import MaskedPPOModule
    from envs.multi_agent_env import PipelineMedicEnv

    agents = AGENTS_OF_KIND[cfg.kind]
    p = cfg.ppo
    callbacks = {}
    if run_id is not None and cfg.experience.enabled:
        settings = {"run_id": run_id, "every_n_samples": cfg.experience.every_n_samples}
        callbacks["on_sample_end"] = functools.partial(log_sampled_experience, settings)
    module_specs = {
        a: RLModuleSpec(module_class=MaskedPPOModule, model_config={"hidden": list(p.hidden)})
        for a in agents
    }
    return (
        PPOConfig()
        .environment(PipelineMedicEnv, env_config=cfg.env_config().model_dump(mode="json"))
        .framework("torch")
        .env_runners(
            num_env_runners=p.env_runners,
            num_envs_per_env_runner=p.envs_per_runner,
            num_cpus_per_env_runner=1 if p.env_runners else 0,
            rollout_fragment_length="auto",
        )
        .learners(num_learners=0)
        .training(
            train_batch_size_per_learner=p.train_batch_size,
            minibatch_size=p.minibatch_size,
            num_epochs=p.num_epochs,
            lr=p.lr,
            gamma=p.gamma,
            lambda_=p.lambda_,
            clip_param=p.clip_param,
            entropy_coeff=p.entropy_coeff,
            vf_loss_coeff=p.vf_loss_coeff,
            vf_clip_param=1e6,  # rewards are not unit-scaled; let the value loss see them all
        )
        .multi_agent(
            policies=set(agents),
            policy_mapping_fn=_map_agent_to_module,
            policies_to_train=list(cfg.modules_to_train()) or None,
        )
        .rl_module(rl_module_spec=MultiRLModuleSpec(rl_module_specs=module_specs))
        .callbacks(**callbacks)
        .debugging(seed=cfg.seed)
    )


def _map_agent_to_module(agent_id, episode, **kwargs):
    """Agent ``ROLE/i`` (pipeline i's agent in that role) uses the module ``ROLE``."""
    return module_of(agent_id)
