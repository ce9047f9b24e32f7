"""TPP with DINO (paper §3.2, §4.2; Caron et al. 2021): self-distillation between a student and a momentum teacher.

* Student = the frozen backbone with its target parameters + a new projection head.
* Teacher = the same frozen backbone tensors (shared, never copied or touched) + exponential moving averages of the
  student's target parameters and head, paired by name (:meth:`DINOPretext.update_teacher`).
* Loss = cross-entropy between the teacher's centred and sharpened distribution on the two global crops and the
  student's distribution on every other crop; the centre is an EMA of the teacher's batch mean (all-reduced across
  processes under DDP), which keeps the teacher from collapsing to one dimension.

Features: what the backbone gives as ``global_features`` / ``global_feature`` (:mod:`tpp_monai.contract`):

* ViTs: the head reads the mean of the patch tokens (the feature the fine-tuning head uses; MedCoSS never trained its
  class token as an output).
* STU-Net (paper §5.4, Table 10; ``stunet.md`` §3.3 option b, after DeSD, Ye et al. 2022): the teacher's head reads
  the globally pooled bottleneck (encoder only); the student has that head *and* one extra head per decoder level
  (the pooled output of each ``conv_blocks_localization`` stage, :meth:`STUNet.forward_features`). Every student
  head is trained to match the teacher's bottleneck distribution, and the levels' losses are averaged (DeSD's deep
  self-distillation weights its levels equally). An encoder-only head would leave the decoder's Conv-Adapters
  without gradient; with these heads every adapter of the encoder and the decoder receives a training signal. Only
  the bottleneck head is averaged into the teacher; the decoder-level heads exist in the student only.

The heads are discarded after the stage; the teacher's target parameters are exported.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from tpp_monai.contract import GLOBAL_FEATURE, hooks_of
from tpp_monai.errors import ConfigError
from tpp_monai.peft import target_parameter_names


class DINOHead(nn.Module):
    """MLP (in -> hidden -> hidden -> bottleneck, GELU) -> L2 normalisation -> weight-normalised linear to ``out_dim``
    logits without bias; the weight-norm gain is fixed to 1 (``norm_last_layer``)."""

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )  # fmt: skip
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        gain = self.last_layer.parametrizations.weight.original0
        gain.data.fill_(1.0)
        gain.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1, p=2))


def _require_global_feature(backbone: nn.Module) -> None:
    if GLOBAL_FEATURE not in hooks_of(backbone):
        name = getattr(backbone, "backbone_name", "") or type(backbone).__name__
        raise ConfigError(f"DINO needs a global feature, which the {backbone.family} backbone {name!r} does not give")


class DINOPretext(nn.Module):
    """Student and teacher. ``forward(crops) -> (student_logits per crop, teacher_logits per global crop)``.

    A student entry is ``[B, K]`` with one feature level (ViTs) and ``[L, B, K]`` with ``L`` levels (STU-Net with
    ``level_heads``: the bottleneck head first, then one head per decoder level); :class:`DINOLoss` averages the
    levels.

    Args:
        encoder: backbone + PEFT method, task ``features``, target parameters trainable.
        out_dim, hidden_dim, bottleneck_dim: head geometry (65536, 2048, 256 in DINO).
        num_global: how many leading crops are global (teacher) crops.
        level_heads: give the student a head on every further feature level of the backbone (STU-Net's decoder
            levels; ViTs have one level, so this changes nothing for them).
    """

    def __init__(
        self, encoder: nn.Module, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
        num_global: int = 2, level_heads: bool = True,
    ) -> None:  # fmt: skip
        super().__init__()
        self.num_global = num_global
        _require_global_feature(encoder)
        dims = encoder.global_feature_dims()
        self.student = nn.ModuleDict({"backbone": encoder, "head": DINOHead(dims[0], out_dim, hidden_dim,
                                                                             bottleneck_dim)})  # fmt: skip
        self.ema_names = [f"backbone.{n}" for n in target_parameter_names(encoder)]
        self.ema_names += [f"head.{n}" for n, p in self.student["head"].named_parameters() if p.requires_grad]
        # The teacher shares every tensor that is not averaged (the frozen backbone): deepcopy's memo maps them to
        # themselves, so no second copy of the backbone exists and the EMA can never touch a frozen tensor.
        averaged = set(self.ema_names)
        memo = {id(p): p for n, p in self.student.named_parameters() if n not in averaged}
        memo.update({id(b): b for b in self.student.buffers()})
        teacher = copy.deepcopy(self.student, memo)
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.teacher = teacher
        self.teacher.eval()
        # Student-only heads on the further levels, added after the teacher copy so the teacher has none.
        self.level_dims = dims if level_heads else dims[:1]
        if len(self.level_dims) > 1:
            self.student["level_heads"] = nn.ModuleList(
                DINOHead(d, out_dim, hidden_dim, bottleneck_dim) for d in self.level_dims[1:]
            )

    def train(self, mode: bool = True) -> DINOPretext:
        super().train(mode)
        self.teacher.eval()  # no drop-path or random position rows in the teacher, as in DINO
        return self

    def heads(self) -> list[DINOHead]:
        """The student's heads, level 0 first."""
        extra = list(self.student["level_heads"]) if "level_heads" in self.student else []
        return [self.student["head"], *extra]

    def _student(self, crops: Sequence[Tensor]) -> list[Tensor]:
        out: list[Tensor] = []
        heads = self.heads()
        start = 0
        while start < len(crops):  # one forward per run of equally sized crops (DINO's MultiCropWrapper)
            end = start
            while end < len(crops) and crops[end].shape[2:] == crops[start].shape[2:]:
                end += 1
            levels = self.student["backbone"].global_features(torch.cat(list(crops[start:end])))
            logits = [head(f) for head, f in zip(heads, levels)]
            joined = logits[0] if len(logits) == 1 else torch.stack(logits)  # [B, K] or [L, B, K]
            out.extend(joined.chunk(end - start, dim=-2))
            start = end
        return out

    def forward(self, crops: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        with torch.no_grad():
            globals_ = torch.cat(list(crops[: self.num_global]))
            teacher = self.teacher["head"](self.teacher["backbone"].global_feature(globals_))
        return self._student(crops), list(teacher.chunk(self.num_global))

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student, for the averaged tensors only (paired by name)."""
        student = dict(self.student.named_parameters())
        teacher = dict(self.teacher.named_parameters())
        names = self.ema_names
        torch._foreach_mul_([teacher[n] for n in names], momentum)
        torch._foreach_add_([teacher[n] for n in names], [student[n].detach() for n in names], alpha=1 - momentum)

    def pretext_state_names(self) -> list[str]:
        """Tensors besides the student's target parameters that a resume needs: heads and teacher averages."""
        head = [f"student.{n}" for n in self.ema_names if n.startswith("head.")]
        if "level_heads" in self.student:
            levels = self.student["level_heads"].named_parameters(prefix="level_heads")
            head += [f"student.{n}" for n, p in levels if p.requires_grad]
        return head + [f"teacher.{n}" for n in self.ema_names]

    def export_backbone(self) -> nn.Module:
        """The backbone whose target parameters the stage exports: the teacher's (DINO evaluates its teacher)."""
        return self.teacher["backbone"]


class DINOLoss(nn.Module):
    """DINO's loss with centering and sharpening.

    Args:
        out_dim: logits width.
        student_temp: student temperature (0.1).
        center_momentum: EMA momentum of the centre (0.9).
        teacher_temp: teacher temperature; a handler may update :attr:`teacher_temp` on a schedule (0.04).
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9,
                 teacher_temp: float = 0.04) -> None:  # fmt: skip
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.teacher_temp = teacher_temp
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, output: tuple[list[Tensor], list[Tensor]], target: object = None) -> Tensor:
        """``output`` = (student ``[B, K]`` or ``[L, B, K]`` per crop, teacher ``[B, K]`` per global crop); with
        ``L`` student levels each level is matched to the same teacher distribution and the levels are averaged."""
        student, teacher = output
        log_p = [F.log_softmax(s.float() / self.student_temp, dim=-1) for s in student]
        q = [F.softmax((t.float() - self.center) / self.teacher_temp, dim=-1).detach() for t in teacher]
        total, pairs = 0.0, 0
        for iq, tq in enumerate(q):
            for v, lp in enumerate(log_p):
                if v == iq:
                    continue  # the same view for teacher and student
                total = total + torch.sum(-tq * lp, dim=-1).mean()
                pairs += 1
        self.update_center(teacher)
        return total / pairs

    @torch.no_grad()
    def update_center(self, teacher: Sequence[Tensor]) -> None:
        batch = torch.cat([t.float() for t in teacher])
        total = batch.sum(dim=0, keepdim=True)
        count = batch.new_full((), float(batch.shape[0]))  # filled on the device: no blocking host-to-device copy
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(total)
            dist.all_reduce(count)
        self.center.mul_(self.center_momentum).add_(total / count, alpha=1 - self.center_momentum)
