"""Miniature synthetic datasets in each dataset's *official layout*: :func:`make_demo_dataset`.

What to write is the ``demo`` of the dataset's entry in :data:`~tpp_monai.data.info.DATASETS`
(:class:`~tpp_monai.data.info.DemoData`: folders, writer, sizes, other appearances); the writers are in
:mod:`tpp_monai.data.synthetic`. Images are small (2D 64-96 px, 3D about 48x48x24 voxels at roughly the 0.8x0.8x1.5 mm
training spacing) and the defaults give a few dozen images per dataset, enough for a non-empty train/validation/test
split after each builder's rule, so every workflow runs end to end without a download.

A hidden ``.tpp-demo.json`` marks the folder as a demo (the builders ignore hidden files); only a marked folder is
ever replaced when the command runs again.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from tpp_monai.data.info import get_dataset
from tpp_monai.errors import ConfigError, DatasetError

MARKER = ".tpp-demo.json"


def make_demo_dataset(
    dataset: str, out: str | Path, n: int | None = None, seed: int = 0, appearance: str | None = None
) -> Path:
    """Write a synthetic ``dataset`` under ``out`` in its official layout; returns the layout root.

    The returned folder is what :func:`~tpp_monai.data.build_datalist` takes as ``root`` and what the datalist's
    paths are relative to (``dataset_dir`` of the bundles).

    Args:
        dataset: a name from ``DATASETS``.
        out: parent folder; the dataset's own top folder (``mhist/``, ``Warwick_QU_Dataset/``, ``kits19/``...)
            is created in it and replaced if it holds an earlier demo.
        n: number of images (2D) or cases (3D); default the entry's ``demo.default_n``.
        seed: seed of the synthetic content (same seed, same bytes).
        appearance: a look other than the dataset's usual one, from the entry's ``demo.appearances`` (GlaS:
            ``"ihc"``, the TPP demo's target domain).
    """
    info = get_dataset(dataset)
    demo = info.demo
    if appearance is not None and appearance not in demo.appearances:
        valid = ", ".join(demo.appearances) or "none"
        raise ConfigError(f"demo {info.name}: unknown appearance {appearance!r}; valid: {valid}")
    n = demo.default_n if n is None else int(n)
    if n < demo.min_n:
        raise ConfigError(f"demo {info.name}: n must be at least {demo.min_n} (every split needs an image); got {n}")
    top = Path(out).expanduser() / demo.top
    if top.exists():
        if not (top / MARKER).is_file():
            raise DatasetError(f"{top}: exists and is not a demo dataset; expected a new folder; choose another --out")
        shutil.rmtree(top)
    root = top / demo.inner
    root.mkdir(parents=True)
    write = demo.write if appearance is None else demo.appearances[appearance]
    write(root, n, np.random.default_rng(seed), info.classes)
    (top / MARKER).write_text(json.dumps({"dataset": info.name, "n": n, "seed": seed, "appearance": appearance}) + "\n")
    return root
