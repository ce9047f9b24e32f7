"""Ignite/MONAI handlers the TPP workflows need beyond MONAI's own, by concern.

* :mod:`.optimization`: per-iteration schedules (learning rate, weight decay, teacher temperature) indexed by the
  engine's iteration so a resumed run continues them, the DINO teacher's EMA, global or per-tensor gradient clipping,
  DINO's first-epoch freeze of the head's last layer, the non-finite-loss guard, and the AdamW parameter groups.
* :mod:`.checkpoints`: the target-parameter file (target tensors only), MONAI's ``CheckpointSaver`` writing
  atomically (temporary file, fsync, rename) with a content digest, the verified loader, and the random states.
* :mod:`.reporting`: validation after the last epoch, ``history.csv``, the evaluation summary and the progress bar.

Bundles name these by their package path (``tpp_monai.handlers.HistoryWriter``).
"""

from tpp_monai.handlers.checkpoints import (
    RandomStates,
    SafeCheckpointSaver,
    TargetStateSaver,
    VerifiedCheckpointLoader,
    is_rank0,
    latest_checkpoint,
    restore_objects,
)
from tpp_monai.handlers.optimization import (
    FreezeLastLayerHandler,
    GradientClipHandler,
    NonFiniteLossGuard,
    OptimizerScheduleHandler,
    TeacherEMAHandler,
    ValueScheduleHandler,
    clip_each_gradient_,
    param_groups,
)
from tpp_monai.handlers.reporting import (
    DISTANCE_METRICS,
    EvaluationWriter,
    HistoryWriter,
    ProgressBar,
    ValidationHandler,
)

__all__ = [
    "DISTANCE_METRICS",
    "EvaluationWriter",
    "FreezeLastLayerHandler",
    "GradientClipHandler",
    "HistoryWriter",
    "NonFiniteLossGuard",
    "OptimizerScheduleHandler",
    "ProgressBar",
    "RandomStates",
    "SafeCheckpointSaver",
    "TargetStateSaver",
    "TeacherEMAHandler",
    "ValidationHandler",
    "ValueScheduleHandler",
    "VerifiedCheckpointLoader",
    "clip_each_gradient_",
    "is_rank0",
    "latest_checkpoint",
    "param_groups",
    "restore_objects",
]
