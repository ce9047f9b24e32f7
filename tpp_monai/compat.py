"""Import torchvision, and the libraries that import it (timm; peft through transformers), on a CPU-only torch.

MONAI Label imports ``torchvision.utils`` (``make_grid``/``save_image``: pure Python) at module level, timm imports
``torchvision.ops.misc`` and transformers (which peft imports) ``torchvision.transforms``. PyPI has
torchvision for torch 2.13 only as a CUDA build; on the CPU build of torch its C++ extension cannot load (it links
``libtorch_cuda.so``), which torchvision tolerates, except that ``torchvision/_meta_registrations.py`` registers fake
kernels for ``torchvision::nms``/``qnms`` without checking that the extension loaded, so ``import torchvision``
fails with ``RuntimeError: operator torchvision::nms does not exist``. Declaring those two operator schemas (no
kernels) lets the import finish; calling a torchvision C++ op still fails with torchvision's own "Couldn't load
custom C++ ops" error. Nothing changes where torchvision's extension loads (a CUDA torch, or a matching build).
"""

from __future__ import annotations

import contextlib
import re
import sys
from types import ModuleType

# Schemas as torchvision's C++ extension declares them (torchvision/csrc/ops/nms.cpp, quantized/cpu/qnms_kernel.cpp).
_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_MISSING = re.compile(r"operator torchvision::(\w+) does not exist")
_keep_alive: list[object] = []  # a torch.library.Library drops its definitions when garbage-collected


def import_torchvision() -> ModuleType:
    """``import torchvision``, declaring the operator schemas its import needs when the C++ extension is missing."""
    import torch

    for _ in range(len(_SCHEMAS) + 1):
        try:
            import torchvision

            return torchvision
        except RuntimeError as err:
            match = _MISSING.search(str(err))
            if match is None or match.group(1) not in _SCHEMAS:
                raise
            if not _keep_alive:
                _keep_alive.append(torch.library.Library("torchvision", "FRAGMENT"))
            _keep_alive[0].define(_SCHEMAS[match.group(1)])  # type: ignore[attr-defined]
            sys.modules.pop("torchvision", None)
    raise RuntimeError("torchvision could not be imported")  # pragma: no cover - every schema is declared by then


def import_peft() -> ModuleType:
    """``import peft`` (transformers imports torchvision when it is installed: declare what that import needs)."""
    with contextlib.suppress(ModuleNotFoundError):  # no torchvision: transformers then does not import it
        import_torchvision()
    import peft

    return peft


def import_timm() -> ModuleType:
    """``import timm`` (timm imports torchvision at import time)."""
    import_torchvision()
    import timm

    return timm
