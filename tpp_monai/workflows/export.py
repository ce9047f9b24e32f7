"""The network of ``inference.json`` in the form model-zoo's tools take: ``ckpt_export`` (TorchScript) and
``verify_net_in_out`` run on it exactly as model-zoo CI runs them, with the fine-tuned ``models/model.pt``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from tpp_monai.errors import CheckpointError
from tpp_monai.io import DIGEST_KEY, content_digest


class _TracedForward(nn.Module):
    """A scriptable module around a traced network (``torch.jit.script`` keeps traced submodules as they are)."""

    def __init__(self, traced: torch.jit.ScriptModule) -> None:
        super().__init__()
        self.traced = traced

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.traced(x)


class ExportableNetwork(nn.Module):
    """``network`` as is (same forward, same parameter names), plus what model-zoo's tools need.

    * ``load_state_dict`` also takes the project's checkpoint file as written by ``finetune`` (weights under
      ``model``, the run's provenance and a content digest beside them): the digest is checked, the weights loaded.
      ``ckpt_export`` hands the whole file to ``load_state_dict`` when no ``--key_in_ckpt`` is given.
    * ``torch.jit.script`` (``ckpt_export``'s default) receives the network traced on one ``input_shape`` input:
      the backbones and PEFT modules are written for eager PyTorch, not for the TorchScript compiler, and every
      workflow feeds the network fixed-size inputs (resized images, sliding-window ROIs of ``image_size``).

    Args:
        network: the network (``tpp_monai.network.build_network``).
        in_channels: image channels of the example input the export traces with.
        image_size: its spatial size (the workflow's ``image_size``).
    """

    def __init__(self, network: nn.Module, in_channels: int, image_size: Sequence[int]) -> None:
        super().__init__()
        self.network = network
        self.input_shape = [1, int(in_channels), *(int(s) for s in image_size)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)

    def load_state_dict(self, state_dict: Mapping, strict: bool = True, assign: bool = False):  # type: ignore[override]
        state = dict(state_dict)
        if DIGEST_KEY in state:
            stored = state.pop(DIGEST_KEY)
            if content_digest(state) != stored:
                raise CheckpointError("the checkpoint does not match the digest written with it; re-run finetune")
        state.pop("run_info", None)
        if "model" in state and isinstance(state["model"], Mapping):
            state = dict(state["model"])
        if any(k.startswith("network.") for k in state):
            return super().load_state_dict(state, strict=strict, assign=assign)
        return self.network.load_state_dict(state, strict=strict, assign=assign)

    def __prepare_scriptable__(self) -> nn.Module:
        was_training = self.network.training
        self.network.eval()
        with torch.no_grad():
            example = torch.rand(*self.input_shape, device=next(self.network.parameters()).device)
            traced = torch.jit.trace(self.network, example, check_trace=False)
        self.network.train(was_training)
        return _TracedForward(traced)
