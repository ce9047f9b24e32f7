"""BitFit (Zaken et al. 2022): the backbone's bias terms are the target parameters.

The Ratio column fits *every* bias of the MedCoSS model (103,680), including the unused 3D patch-embedding bias, so
the rule is a plain name filter (``methods.md`` §2.5). In TPP these pre-trained biases are what the pretext
stage trains.
"""

from __future__ import annotations

from tpp_monai.peft.registry import MethodSpec, NoOptions, register

SPEC = register(
    MethodSpec(
        name="bitfit",
        config=NoOptions,
        inject=lambda m, cfg: cfg,
        target=lambda m, n: n.endswith("bias"),
        attach="select",
        requires=lambda cfg: frozenset(),
        identity_at_init=True,
        pretrainable=True,
        summary="BitFit: all backbone biases",
    )
)
