"""The networks behind every learned agent, in plain PyTorch (no Ray needed to use them).

RLlib trains them inside ``agents.rl_module.MaskedPPOModule``; ``agents.inference`` loads the
same class from exported weights to decide without Ray. Keeping one definition is what makes
the served decision the trained one.
"""

from __future__ import annotations

import torch
from torch import nn

#: Logit given to a masked action: far below any real logit, finite so softmax stays defined.
MASKED_LOGIT = -1e9


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:], strict=False)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


class PolicyValueNet(nn.Module):
    """Separate policy and value MLPs over one observation vector; logits are masked."""

    def __init__(self, obs_size: int, n_actions: int, hidden: list[int] | tuple[int, ...]):
        super().__init__()
        self.obs_size, self.n_actions, self.hidden = obs_size, n_actions, list(hidden)
        self.pi = _mlp([obs_size, *hidden, n_actions])
        self.vf = _mlp([obs_size, *hidden, 1])
        # Small last policy layer: near-uniform over the allowed actions at the start.
        with torch.no_grad():
            self.pi[-1].weight.mul_(0.01)
            self.pi[-1].bias.zero_()

    def logits(self, obs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.pi(obs).masked_fill(mask <= 0, MASKED_LOGIT)

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.vf(obs).squeeze(-1)
