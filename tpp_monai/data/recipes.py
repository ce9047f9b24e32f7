"""The training recipes a dataset's entry holds (``recipe`` of :class:`~tpp_monai.data.info.DatasetInfo`): what the
bundle generator writes into each bundle's configs and what the benchmark measures (it reads them back from those
configs). The recipes several datasets share are named here; each dataset's own numbers are in its entry.

A method without a learning rate where the dataset grid-searched it is refused by :meth:`FinetuneRecipe.lr_for` with
the name of what is missing, when the bundles are generated.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from tpp_monai.errors import ConfigError


@dataclass(frozen=True)
class TPPRecipe:
    """The TPP stage (its pretext is the backbone's default, :func:`tpp_monai.pretext.default_pretext`).

    2D (paper §4.2): MAE, AdamW lr 1.5e-3, wd 1.5e-2, batch 64, 40 warm-up epochs then cosine; 500 epochs for
    classification and 1000 for segmentation; the inherited MAE decoder frozen for classification and updated for
    segmentation (§5.5). ``--pretext dino``: DINO's weight decay 0.04 -> 0.4, 10 warm-up epochs, lr
    ``dino_base_lr * batch / 256``.

    3D (DINO on STU-Net; the paper gives no recipe, stunet.md §3.3): DINO's schedules with AdamW at DINO's base rate
    5e-4 without the linear batch scaling (it would leave 1e-5 at 3D batch sizes for freshly initialised heads and
    adapters), DeSD's 300 epochs, batch 4 volumes of 2 global and 4 local crops.
    """

    epochs: int
    batch_size: int = 64
    mae_decoder: str = "freeze"
    mae_lr: float = 1.5e-3
    dino_base_lr: float = 1e-4
    lr: float | None = None  # a fixed rate (3D), else from the pretext
    warmup_epochs: tuple[int, int] = (40, 10)  # (MAE, DINO)


@dataclass(frozen=True)
class FinetuneRecipe:
    """Fine-tuning.

    2D (paper Table 2 and §4.2, with MedCoSS's recipe: AdamW, weight decay 1e-4, per-epoch poly(0.9) decay,
    gradient-norm clipping at 12): batch size, iterations and learning rate per dataset; MHIST's learning rate was
    grid-searched per method (``lr_by_method``).

    3D, the STU-Net recipe (stunet.md §1.7: nnU-Net v1 defaults with the learning rate 10x smaller) adapted to PEFT:
    SGD with Nesterov momentum 0.99, weight decay 3e-5, poly(0.9), clipping at 12, batch 2, Dice + CE on the five
    deep-supervision outputs, nnU-Net's 1000 epochs x 250 iterations. Full fine-tuning uses STU-Net's fine-tuning
    rate 1e-3; Conv-Adapter nnU-Net's from-scratch rate 1e-2, because everything it trains (adapters and the five new
    heads) starts from random initialisation, while the 10x reduction protects pre-trained weights that are frozen.
    """

    batch_size: int
    iterations: int
    lr: float = 1e-4
    lr_by_method: Mapping[str, float] = field(default_factory=dict)
    optimizer: str = "adamw"
    weight_decay: float = 1e-4
    momentum: float = 0.99
    grad_clip: float = 12.0

    def lr_for(self, dataset: str, method: str) -> float:
        if not self.lr_by_method:
            return self.lr
        if method not in self.lr_by_method:
            raise ConfigError(
                f"no fine-tuning learning rate for method {method!r} on {dataset!r} (its rate is set per method): "
                f"add it to lr_by_method of the recipe of {dataset!r} (its entry in tpp_monai/data/info.py)"
            )
        return self.lr_by_method[method]


@dataclass(frozen=True)
class DatasetRecipe:
    """The recipes of one dataset and the methods its bundles are made for.

    Args:
        methods: ``None``: every method of the backbone family that TPP applies to, plus the two baselines.
        peft_bundles: huggingface peft tuners shipped as bundles of their own (``<dataset>_peft_<tuner>``) beside
            ``methods``; any other ``peft.*`` tuner runs on any bundle with ``--method peft.<tuner>``.
    """

    tpp: TPPRecipe
    finetune: FinetuneRecipe
    methods: tuple[str, ...] | None = None
    peft_bundles: tuple[str, ...] = ()


BASELINES = ("full_finetune", "linear_probe")
# Paper §4.2; LoRA is not in the paper's grid: 5e-4 is this project's choice (between Adapter's and SSF's). peft's
# IA3 (learned scaling vectors, like SSF's) and DoRA (LoRA with a magnitude) are not either: SSF's and LoRA's rates.
MHIST_LR = {"full_finetune": 1e-5, "linear_probe": 1e-2, "evp": 5e-5, "vpt": 1e-4, "ssf": 1e-3, "bitfit": 1e-3,
            "adapter": 1e-4, "adaptformer": 1e-3, "dtl": 5e-3, "lora": 5e-4, "peft.ia3": 1e-3,
            "peft.dora": 5e-4}  # fmt: skip
CLS_TPP, SEG_TPP = TPPRecipe(epochs=500, mae_decoder="freeze"), TPPRecipe(epochs=1000, mae_decoder="update")
TPP_3D = TPPRecipe(epochs=300, batch_size=4, lr=5e-4, warmup_epochs=(10, 10))
FT_3D = FinetuneRecipe(batch_size=2, iterations=250_000, lr_by_method={"full_finetune": 1e-3, "conv_adapter": 1e-2},
                       optimizer="sgd", weight_decay=3e-5)  # fmt: skip
