"""The recipes the bench measures, read from the bundle configs themselves (their ``pretrain_tpp.json`` and
``finetune.json`` resolved by MONAI's ``ConfigParser``), so the benchmark cannot drift from what the bundles train."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tpp_monai.bundlegen import BUNDLES_DIR, workflow_config_files
from tpp_monai.errors import ConfigError


@dataclass(frozen=True)
class OptimRecipe:
    """What a measured step needs of a recipe: AdamW's learning rate, weight decay and betas, gradient clipping."""

    lr: float
    weight_decay: float
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 0.0


def bundle_settings(bundle: str, workflow: str, keys: tuple[str, ...], bundles: Path = BUNDLES_DIR,
                    **overrides: object) -> dict:  # fmt: skip
    """The resolved values of ``keys`` of one bundle workflow with ``overrides`` (no network, no data: settings)."""
    from monai.bundle import ConfigParser

    folder = Path(bundles) / bundle
    files = workflow_config_files(folder, workflow)
    if not all(Path(f).is_file() for f in files):
        raise ConfigError(f"no {workflow} config in {folder}; the bench reads its recipes from the bundles")
    parser = ConfigParser()
    parser.read_config(files)
    parser["bundle_root"] = str(folder)
    parser.update(dict(overrides))
    return {k: parser.get_parsed_content(k) for k in keys}


def tpp_recipe(bundle: str, pretext: str, batch_size: int, bundles: Path = BUNDLES_DIR) -> OptimRecipe:
    """The TPP stage's optimizer for ``pretext`` at ``batch_size`` (DINO's rate scales with the batch)."""
    from tpp_monai.pretext import DINO_DEFAULTS

    s = bundle_settings(bundle, "pretrain_tpp", ("lr", "weight_decay", "optimizer#betas", "dino"), bundles,
                        pretext=pretext, batch_size=int(batch_size))  # fmt: skip
    clip = {**DINO_DEFAULTS, **dict(s["dino"] or {})}["clip_grad"] if pretext == "dino" else 0.0
    return OptimRecipe(float(s["lr"]), float(s["weight_decay"]), tuple(s["optimizer#betas"]), float(clip or 0.0))


def finetune_recipe(bundle: str, bundles: Path = BUNDLES_DIR) -> OptimRecipe:
    """Fine-tuning's optimizer (learning rate, weight decay, clipping) of ``bundle``."""
    s = bundle_settings(bundle, "finetune", ("lr", "weight_decay", "grad_clip"), bundles)
    return OptimRecipe(float(s["lr"]), float(s["weight_decay"]), grad_clip=float(s["grad_clip"]))
