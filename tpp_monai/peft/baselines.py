"""The paper's baselines: full fine-tuning (every backbone tensor is trained) and linear probing (none is).

Neither has new parameters to pre-train, so TPP does not apply to them (their bundles ship ``finetune`` only).
"""

from __future__ import annotations

from tpp_monai.contract import is_peft_parameter
from tpp_monai.peft.registry import MethodSpec, NoOptions, register

FULL = register(
    MethodSpec(
        name="full_finetune",
        config=NoOptions,
        inject=lambda m, cfg: cfg,
        target=lambda m, n: not is_peft_parameter(n),
        attach="select",
        requires=lambda cfg: frozenset(),
        identity_at_init=True,
        pretrainable=False,
        summary="full fine-tuning: every backbone tensor is trained",
    )
)
LINEAR = register(
    MethodSpec(
        name="linear_probe",
        config=NoOptions,
        inject=lambda m, cfg: cfg,
        target=lambda m, n: False,
        attach="select",
        requires=lambda cfg: frozenset(),
        identity_at_init=True,
        pretrainable=False,
        summary="linear probe: only the task head (classifier or decoder) is trained",
    )
)
