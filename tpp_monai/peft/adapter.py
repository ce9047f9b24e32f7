"""Adapter (Houlsby et al. 2019): a serial bottleneck after the attention and the MLP sub-layers of every block.

The paper's Ratio column fits two adapters per block with bottleneck 76 (``methods.md`` §2.6, §3.3). Placement: the
adapter reads the sub-layer output ``h`` (before LayerScale) and its output joins the residual stream next to it,
``x + gamma * h + A(h)``: Houlsby's ``h + A(h)`` with MedCoSS's LayerScale kept on the frozen path only, so a
small pre-trained gamma does not damp the adapter. Zero-initialised up-projection: identity at initialisation.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import Tensor, nn

from tpp_monai.errors import ConfigError
from tpp_monai.peft.modules import Bottleneck
from tpp_monai.peft.registry import register_added


@dataclass(frozen=True)
class AdapterConfig:
    """Args:
    bottleneck: hidden width; ``None`` = embed_dim // 10 (76 on ViT-B/16, the paper's Ratio).
    positions: sub-layers that get an adapter, from ``("attn", "mlp")``.
    activation: ``"relu"`` or ``"gelu"``.
    init: ``"lora"`` (zero up-projection, identity at init) or ``"houlsby"`` (N(0, 1e-2) both).
    """

    bottleneck: int | None = None
    positions: tuple[str, ...] = ("attn", "mlp")
    activation: str = "relu"
    init: str = "lora"


class SerialAdapter(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str, init: str) -> None:
        super().__init__()
        self.adapter = Bottleneck(dim, hidden, act, init=init)

    def forward(self, branch: Tensor, stream: Tensor) -> Tensor:
        return self.adapter(branch)


def inject(model: nn.Module, cfg: AdapterConfig) -> AdapterConfig:
    cfg = replace(cfg, bottleneck=cfg.bottleneck or max(1, model.embed_dim // 10), positions=tuple(cfg.positions))
    bad = set(cfg.positions) - {"attn", "mlp"}
    if bad or not cfg.positions:
        raise ConfigError(f"adapter positions must be a non-empty subset of ['attn', 'mlp'], got {list(cfg.positions)}")
    for block in model.encoder_blocks():
        for pos in cfg.positions:
            block.peft_deltas[pos] = SerialAdapter(model.embed_dim, cfg.bottleneck, cfg.activation, cfg.init)
    return cfg


SPEC = register_added(
    "adapter",
    AdapterConfig,
    inject,
    identity_at_init=True,
    summary="Houlsby adapter: two serial bottlenecks (76) per block",
)
