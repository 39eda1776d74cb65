"""The RLModule every Pipeline Medic agent uses on RLlib's new API stack (PyTorch).

Observations are dicts ``{"observations": vector, "action_mask": 0/1 vector}`` (see
``envs.observation``). Masked actions get a huge negative logit, so they are never sampled
and never need to be punished. The network itself is ``agents.networks.PolicyValueNet``.
"""

from __future__ import annotations

from typing import Any

from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.apis.value_function_api import ValueFunctionAPI
from ray.rllib.core.rl_module.torch import TorchRLModule

from agents.networks import PolicyValueNet


class MaskedPPOModule(TorchRLModule, ValueFunctionAPI):
    """Masked categorical policy + value function; ``model_config = {"hidden": [...]}``."""

    def setup(self) -> None:
        obs_size = self.observation_space["observations"].shape[0]
        hidden = (self.model_config or {}).get("hidden", [128, 128])
        self.net = PolicyValueNet(obs_size, int(self.action_space.n), hidden)

    def _forward(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        obs = batch[Columns.OBS]
        return {
            Columns.ACTION_DIST_INPUTS: self.net.logits(obs["observations"], obs["action_mask"])
        }

    def compute_values(self, batch: dict[str, Any], embeddings: Any = None):
        return self.net.value(batch[Columns.OBS]["observations"])
