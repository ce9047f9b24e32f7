"""TPP with DINO (paper §3.2, §4.2; Caron et al. 2021): self-distillation between a student and a momentum teacher.

* Student = the frozen backbone with its target parameters + a new projection head.
* Teacher = the same frozen backbone tensors (shared, never copied or touched) + exponential moving averages of the
  student's target parameters and head, paired by name (:meth:`DINOPretext.update_teacher`).
* Loss = cross-entropy between the teacher's centred and sharpened distribution on the two global crops and the
  student's distribution on every other crop; the centre is an EMA of the teacher's batch mean (all-reduced across
  processes under DDP), which keeps the teacher from collapsing to one dimension.

The head reads the mean of the patch tokens (the feature the fine-tuning head uses; MedCoSS never trained its class
token as an output). The head is discarded after the stage; the teacher's target parameters are exported.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

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


def pooled_features(backbone: nn.Module, images: Tensor) -> Tensor:
    """Mean of the patch tokens (prompts and class token excluded)."""
    return backbone.forward_features(images).patches.mean(dim=1)


class DINOPretext(nn.Module):
    """Student and teacher. ``forward(crops) -> (student_logits per crop, teacher_logits per global crop)``.

    Args:
        encoder: backbone + PEFT method, task ``features``, target parameters trainable.
        out_dim, hidden_dim, bottleneck_dim: head geometry (65536, 2048, 256 in DINO).
        num_global: how many leading crops are global (teacher) crops.
    """

    def __init__(
        self, encoder: nn.Module, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
        num_global: int = 2,
    ) -> None:  # fmt: skip
        super().__init__()
        self.num_global = num_global
        self.student = nn.ModuleDict({"backbone": encoder, "head": DINOHead(encoder.embed_dim, out_dim, hidden_dim,
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

    def train(self, mode: bool = True) -> DINOPretext:
        super().train(mode)
        self.teacher.eval()  # no drop-path or random position rows in the teacher, as in DINO
        return self

    def _student(self, crops: Sequence[Tensor]) -> list[Tensor]:
        out: list[Tensor] = []
        start = 0
        while start < len(crops):  # one forward per run of equally sized crops (DINO's MultiCropWrapper)
            end = start
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            feats = pooled_features(self.student["backbone"], torch.cat(list(crops[start:end])))
            out.extend(self.student["head"](feats).chunk(end - start))
            start = end
        return out

    def forward(self, crops: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        with torch.no_grad():
            globals_ = torch.cat(list(crops[: self.num_global]))
            teacher = self.teacher["head"](pooled_features(self.teacher["backbone"], globals_))
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
        count = torch.tensor(float(batch.shape[0]), device=batch.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(total)
            dist.all_reduce(count)
        self.center.mul_(self.center_momentum).add_(total / count, alpha=1 - self.center_momentum)
