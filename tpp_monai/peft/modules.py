"""Small building blocks shared by several PEFT methods."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tpp_monai.errors import ConfigError

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU}
HOULSBY_STD = 1e-3  # adapter-bert's adapter_init_scale


def activation(name: str) -> nn.Module:
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ConfigError(f"unknown activation {name!r}; valid: {', '.join(ACTIVATIONS)}") from None


class Bottleneck(nn.Module):
    """``up(dropout(act(down(x))))``; ``up`` starts at zero (LoRA-style init) so the module starts as zero output.

    ``init="houlsby"`` draws both projections from adapter-bert's near-identity init instead (Houlsby et al. 2019,
    ``feedforward_adapter``: TensorFlow's ``truncated_normal_initializer(stddev=1e-3)``, i.e. N(0, 1e-3) truncated
    at two standard deviations), biases zero.
    """

    def __init__(self, dim: int, hidden: int, act: str = "relu", dropout: float = 0.0, init: str = "lora") -> None:
        super().__init__()
        self.down = nn.Linear(dim, hidden)
        self.act = activation(act)
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(hidden, dim)
        if init == "lora":
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.up.weight)
        elif init == "houlsby":
            for linear in (self.down, self.up):
                nn.init.trunc_normal_(linear.weight, std=HOULSBY_STD, a=-2 * HOULSBY_STD, b=2 * HOULSBY_STD)
        else:
            raise ConfigError(f"unknown adapter init {init!r}; valid: lora, houlsby")
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.dropout(self.act(self.down(x))))


class LowRank(nn.Module):
    """``x A^T B^T`` with ``A`` [r, d_in] kaiming-uniform and ``B`` [d_out, r] zero (LoRA's reference init)."""

    def __init__(self, d_in: int, d_out: int, rank: int) -> None:
        super().__init__()
        if rank < 1:
            raise ConfigError(f"rank must be >= 1, got {rank}")
        self.lora_a = nn.Parameter(torch.empty(rank, d_in))
        self.lora_b = nn.Parameter(torch.zeros(d_out, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.linear(x, self.lora_a), self.lora_b)


class ScaleShift(nn.Module):
    """SSF's ``y = gamma * x + beta`` over the last dimension; gamma ~ N(1, 0.02), beta ~ N(0, 0.02) (Lian et al.)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.empty(dim).normal_(1.0, 0.02))
        self.shift = nn.Parameter(torch.empty(dim).normal_(0.0, 0.02))

    def forward(self, x: Tensor, inp: Tensor | None = None) -> Tensor:
        return x * self.scale + self.shift
