"""Helpers the bundle configs call (``"$import tpp_monai.workflows as tpp"``): locating the bundle, reading the
datalist, schedules, and clear messages for errors a user can cause inside ``python -m monai.bundle run``."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from types import TracebackType

import numpy as np
from monai.data import load_decathlon_datalist

from tpp_monai.backbones import get_backbone_spec
from tpp_monai.data import check_datalist, get_dataset, subsample_labels
from tpp_monai.errors import ConfigError, UserError
from tpp_monai.handlers import RandomStates, cosine_schedule, param_groups

__all__ = ["RandomStates", "param_groups"]  # re-exported for the configs

logger = logging.getLogger(__name__)
REPO_BUNDLES = Path(__file__).resolve().parents[1] / "bundles"


def user_error_in(exc: BaseException | None) -> UserError | None:
    """The :class:`UserError` behind ``exc`` (MONAI wraps errors raised while it evaluates a config), if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, UserError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _log_user_errors_without_traceback() -> None:
    """Log records about a :class:`UserError` keep their message but lose the traceback: MONAI's ``StatsHandler``
    logs every exception an engine raises with ``logger.exception`` (on loggers made later, with handlers of their
    own), before the error reaches the excepthook. Set once, on the record factory every logger uses."""
    make_record = logging.getLogRecordFactory()
    if getattr(make_record, "_tpp_monai", False):
        return

    def factory(*args: object, **kwargs: object) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        if record.exc_info and user_error_in(record.exc_info[1]) is not None:
            record.exc_info = None
        return record

    factory._tpp_monai = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


def install_excepthook() -> None:
    """Print errors a user can cause (a :class:`UserError` anywhere in the chain) as one message, no traceback.

    MONAI wraps exceptions raised while it evaluates a config item in ``RuntimeError("Failed to evaluate ...")``;
    the hook finds the user error behind it. Other exceptions keep Python's normal traceback. Log records
    carry the user errors without their traceback too.
    """
    _log_user_errors_without_traceback()
    previous = sys.excepthook
    if getattr(previous, "_tpp_monai", False):
        return

    def hook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        err = user_error_in(value)
        if err is None:
            previous(kind, value, tb)
            return
        print(f"error: {err}", file=sys.stderr)

    hook._tpp_monai = True  # type: ignore[attr-defined]
    sys.excepthook = hook


def check_settings(
    dataset: str, method: str, backbone: str, pretext: str | None = None, datalist: str | None = None,
    dataset_dir: str | None = None, keys: tuple[str, ...] = ("training",), tpp_ckpt: str | None = None,
    image_size: list | None = None, num_classes: int | None = None,
) -> None:  # fmt: skip
    """Fail fast, before any data is cached or a network is built, on unknown names and missing inputs.

    ``pretext`` given means the TPP stage, which needs a method with target parameters to pre-train; ``tpp_ckpt``
    (fine-tuning) must exist unless it is ``none``; ``image_size`` must be a multiple of the ViT patch size;
    ``num_classes`` must match the dataset's classes and the datalist's labels.
    """
    from tpp_monai.network import is_none
    from tpp_monai.peft import get_method
    from tpp_monai.pretext import check_pretext

    get_dataset(dataset, "dataset_name")
    spec = get_method(method, "method")
    get_backbone_spec(backbone, "backbone")
    if pretext is not None:
        check_pretext(pretext)
        if not spec.pretrainable:
            raise ConfigError(
                f"pretrain_tpp does not apply to {method!r}: {spec.summary}; it adds no target parameters to "
                "pre-train, so fine-tune it directly (finetune)"
            )
    info = get_dataset(dataset)
    spec_backbone = get_backbone_spec(backbone)
    if image_size is not None and spec_backbone.family != "stunet":
        patch = int(spec_backbone.kwargs.get("patch_size", 16))
        if any(int(s) % patch for s in image_size):
            raise ConfigError(
                f"image_size {list(image_size)} (from image_size) is not a multiple of the {backbone} patch size "
                f"{patch}; use e.g. {[max(patch, round(int(s) / patch) * patch) for s in image_size]}"
            )
    if datalist is not None:
        listed = check_datalist(datalist, dataset_dir, keys=keys)
        if num_classes is not None and info.task == "cls":
            if int(num_classes) != len(info.classes):
                raise ConfigError(
                    f"num_classes {num_classes} (from num_classes) does not match {info.title}'s "
                    f"{len(info.classes)} classes {list(info.classes)}"
                )
            labels = {r.get("label") for k in keys for r in listed.get(k, [])}
            bad = sorted(str(v) for v in labels if not (isinstance(v, int) and 0 <= v < int(num_classes)))
            if bad:
                raise ConfigError(
                    f"{datalist} has labels {bad[:5]} outside 0..{int(num_classes) - 1} for {num_classes} classes; "
                    "rebuild it with `python -m tpp_monai datalist`"
                )
    if not is_none(tpp_ckpt) and not Path(str(tpp_ckpt)).is_file():
        raise ConfigError(
            f"tpp_ckpt {tpp_ckpt} not found: run pretrain_tpp first (it writes runs/pretrain_tpp/tpp_target.pt), "
            "pass the target-parameter file of another run with --tpp_ckpt, or fine-tune from randomly initialised "
            "target parameters (the paper's PEFT baseline) with --tpp_ckpt none"
        )


def run_info(**settings: object) -> dict:
    """What a fine-tuned model records about how it was made; the TPP file's own record is added when given."""
    from tpp_monai.io import load_verified
    from tpp_monai.network import is_none

    info = dict(settings)
    tpp_ckpt = settings.get("tpp_ckpt")
    info["tpp"] = not is_none(tpp_ckpt)
    if info["tpp"]:
        record = load_verified(str(tpp_ckpt))
        info["tpp_ckpt"] = str(tpp_ckpt)
        info["tpp_pretext"] = record.get("pretext")
        info["tpp_epochs"] = record.get("epoch")
    else:
        info["tpp_ckpt"] = None
    return info


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".nii", ".nii.gz", ".dcm")


def image_files(folder: str) -> list[dict]:
    """``[{"image": path}]`` for every image file in ``folder`` (sorted), for the inference workflow."""
    path = Path(folder)
    if not path.is_dir():
        raise ConfigError(f"input folder {folder} not found; pass --input_dir with a folder of images")
    files = sorted(p for p in path.iterdir() if p.name.lower().endswith(IMAGE_SUFFIXES) and not p.name.startswith("."))
    if not files:
        raise ConfigError(f"no images in {folder}; expected files ending in {', '.join(IMAGE_SUFFIXES)}")
    return [{"image": str(p)} for p in files]


def bundle_root(name: str) -> str:
    """The folder of bundle ``name``: the current folder when run from inside it, else ``bundles/<name>`` of the
    current folder or of this repository (so ``monai.bundle run`` works from the repo root or the bundle folder)."""
    cwd = Path.cwd()
    for candidate in (cwd, cwd / "bundles" / name, REPO_BUNDLES / name):
        if (candidate / "configs" / "metadata.json").is_file() and candidate.name == name:
            return str(candidate)
    return str(REPO_BUNDLES / name)


def images_of(datalist: str, dataset_dir: str, key: str = "training") -> list[dict]:
    """The image paths of one split (labels dropped: the pretext stages use the training images only)."""
    return [{"image": r["image"]} for r in records_of(datalist, dataset_dir, key)]


def records_of(
    datalist: str, dataset_dir: str, key: str = "training", label_fraction: float | None = None, seed: int = 0,
    dataset: str | None = None,
) -> list[dict]:  # fmt: skip
    """Records of one split with absolute paths, after checking that every file exists.

    ``label_fraction`` keeps a seeded, per-class stratified fraction of the records (paper Figure 4); only the
    training split may be subsampled.
    """
    check_datalist(datalist, dataset_dir, keys=(key,))
    segmentation = dataset is None or get_dataset(dataset).task != "cls"
    records = load_decathlon_datalist(datalist, is_segmentation=segmentation, data_list_key=key, base_dir=dataset_dir)
    if label_fraction is not None and float(label_fraction) < 1.0:
        if key != "training":
            raise ConfigError(f"label_fraction applies to the training split only, not {key!r}")
        before = len(records)
        records = subsample_labels(records, float(label_fraction), seed)
        logger.info("label_fraction %s: %d of %d training records kept", label_fraction, len(records), before)
    if not records:
        raise ConfigError(f"the {key!r} split of {datalist} is empty")
    return records


def mae_decoder_geometry(backbone: str) -> dict:
    """Width, depth and heads of the MAE decoder paired with ``backbone`` (MedCoSS: 512, 8, 16)."""
    return dict(get_backbone_spec(backbone, "backbone").mae_decoder)


def gpu_settings() -> bool:
    """On a GPU: TF32 for the fp32 matmuls and convolutions that bf16 autocast leaves in fp32 (fp32 accumulation,
    safe for training) and ``cudnn.benchmark`` (images, patches and ROIs have fixed sizes, so autotuned kernels are
    reused every step). Nothing on the CPU. Returns whether a GPU is used."""
    import torch

    cuda = torch.cuda.is_available()
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    return cuda


def activation_checkpointing(model: object, enabled: bool) -> int:
    """``--activation_checkpointing true``: recompute each transformer block (encoder, MAE decoder) in the backward
    pass instead of keeping its activations; ``python -m tpp_monai bench`` prints what it saves and costs."""
    from tpp_monai.backbones.vit import set_activation_checkpointing

    count = set_activation_checkpointing(model, enabled)
    if enabled and not count:
        raise ConfigError(
            f"activation checkpointing is available for the ViT backbones, not {type(model).__name__}; "
            "leave --activation_checkpointing False"
        )
    return count


def cpu_workers(cap: int = 8) -> int:
    """Data-loading workers from the CPU count (leaving one core for the training loop)."""
    return max(0, min(cap, (os.cpu_count() or 1) - 1))


def lr_schedule(base: float, epochs: int, iters_per_epoch: int, warmup_epochs: float, final: float = 0.0):
    """Linear warm-up then cosine decay, per iteration (the paper's TPP schedule)."""
    return cosine_schedule(base, final, int(epochs), int(iters_per_epoch), warmup_epochs)


def wd_schedule(start: float, end: float, epochs: int, iters_per_epoch: int) -> np.ndarray:
    """Cosine weight-decay schedule from ``start`` to ``end`` (DINO: 0.04 -> 0.4; constant when equal)."""
    return cosine_schedule(start, end, int(epochs), int(iters_per_epoch))


def poly_schedule(base: float, epochs: int, iters_per_epoch: int, power: float = 0.9) -> np.ndarray:
    """MedCoSS's per-epoch polynomial decay ``base * (1 - epoch / epochs) ** power``, expanded per iteration."""
    per_epoch = [base * (1 - e / max(1, epochs)) ** power for e in range(max(1, int(epochs)))]
    return np.repeat(np.asarray(per_epoch), max(1, int(iters_per_epoch)))


def epochs_for(iterations: int, iters_per_epoch: int) -> int:
    """Epochs that cover ``iterations`` optimizer steps (the paper gives fine-tuning lengths in iterations)."""
    return max(1, math.ceil(int(iterations) / max(1, int(iters_per_epoch))))


def demo_dataset(dataset: str, folder: str) -> str:
    """The demo dataset of ``dataset`` under ``folder`` with its ``datalist.json``, made on first use; returns the
    dataset root (the ``dataset_dir`` of the demo overlay)."""
    from tpp_monai.data import build_datalist, make_demo_dataset, write_datalist
    from tpp_monai.data.demo import MARKER

    folder_path = Path(folder)

    def existing() -> str | None:
        for marker in folder_path.glob(f"*/{MARKER}"):
            if json.loads(marker.read_text()).get("dataset") == dataset:
                roots = [p.parent for p in marker.parent.rglob("datalist.json")]
                if roots:
                    return str(roots[0])
        return None

    found = existing()
    if found:
        return found
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun rank 0 writes the data; the others wait for it
        deadline = time.time() + 600
        while time.time() < deadline:
            time.sleep(0.5)
            found = existing()
            if found:
                return found
        raise ConfigError(f"rank {os.environ['RANK']}: the demo dataset under {folder} did not appear within 600 s")
    root = make_demo_dataset(dataset, folder_path)
    write_datalist(build_datalist(dataset, root), root / "datalist.json")
    return str(root)


def trainable_state(model: object) -> object:
    """A checkpointable view of the parameters being trained (target parameters + head): what a resume needs."""
    from tpp_monai.pretext import PartialState

    return PartialState(model, [n for n, p in model.named_parameters() if p.requires_grad])


def mask_saver(output_dir: str, key: str = "pred") -> object:
    """``SaveImaged`` writing binary masks as 8-bit PNGs ``<name>_mask.png`` in the input's own orientation.

    The 2D chains read images as ``(C, H, W)`` arrays without MONAI's default axis swap (``reverse_indexing=False``,
    see :mod:`tpp_monai.data.transforms`), so the PNG writer must not swap them back either.
    """
    import numpy
    from monai.transforms import SaveImaged

    saver = SaveImaged(keys=key, output_dir=output_dir, output_postfix="mask", output_ext=".png",
                       separate_folder=False, resample=False, scale=255, output_dtype=numpy.uint8,
                       writer="PILWriter", print_log=False)  # fmt: skip
    return saver.set_options(write_kwargs={"reverse_indexing": False})


def distributed_sampler(dataset: object, shuffle: bool) -> object | None:
    """MONAI's ``DistributedSampler`` over ``dataset`` when a process group is initialised (torchrun), else ``None``.

    Training shards the data evenly (every rank takes the same number of steps); evaluation keeps every sample
    once (``even_divisible=False``), and the metrics gather the shards.
    """
    import torch.distributed as dist
    from monai.data import DistributedSampler

    if not (dist.is_available() and dist.is_initialized()):
        return None
    return DistributedSampler(dataset, shuffle=shuffle, even_divisible=shuffle)


def init_distributed() -> None:
    """Join the torchrun process group (NCCL on GPUs, gloo on CPUs) and pin this rank's GPU.

    ignite computes its rank lazily with collective calls the first time it is asked; asking here, on every rank at
    the same point, keeps a rank-0-only code path from blocking the others later.
    """
    import ignite.distributed as idist
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    idist.get_rank()
    quiet_other_ranks()


def progress_bars() -> bool:
    """Whether to draw progress bars: on a terminal, on rank 0 (a log file would collect every carriage return)."""
    return sys.stderr.isatty() and int(os.environ.get("RANK", "0")) == 0


def quiet_other_ranks() -> None:
    """Under torchrun only rank 0 logs below WARNING (every rank runs the same steps, so its INFO lines would
    repeat rank 0's); the warnings and errors of the other ranks name their rank."""
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", "0"))
    if rank == 0:
        return
    logging.disable(logging.INFO)
    make_record = logging.getLogRecordFactory()
    if getattr(make_record, "_tpp_rank", False):
        return

    def factory(*args: object, **kwargs: object) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        record.msg = f"[rank {rank}] {record.msg}"
        return record

    factory._tpp_rank = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


def has_unused_trainable(model: object) -> bool:
    """Whether a trainable tensor of ``model`` is never used by its forward pass (the backbones name theirs, e.g.
    MedCoSS's 3D patch embedding, trained by BitFit and full fine-tuning): DDP must then search for unused
    parameters every step (``find_unused_parameters``), and otherwise it only warns that the search found none."""
    unused = set()
    for prefix, module in model.named_modules():
        names = getattr(module, "unused_parameter_names", None)
        if callable(names):
            unused |= {f"{prefix}.{n}" if prefix else n for n in names()}
    return any(p.requires_grad for n, p in model.named_parameters() if n in unused)


def assert_replicas_agree(model: object, names: list[str] | None = None) -> None:
    """After distributed training, check that every rank holds the same trainable tensors (a broken all-reduce or
    an EMA that drifted would show here); logs the verdict, raises if they differ."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    params = dict(model.named_parameters())
    names = names or [n for n, p in params.items() if p.requires_grad]
    flat = torch.cat([params[n].detach().float().reshape(-1).cpu() for n in names]) if names else torch.zeros(1)
    if dist.get_backend() == "nccl":
        flat = flat.cuda()
    lowest, highest = flat.clone(), flat.clone()
    dist.all_reduce(lowest, op=dist.ReduceOp.MIN)
    dist.all_reduce(highest, op=dist.ReduceOp.MAX)
    spread = float((highest - lowest).abs().max())
    if spread > 0:
        raise RuntimeError(f"trainable tensors differ across the {dist.get_world_size()} ranks (max spread {spread})")
    logger.info("trainable tensors identical on %d ranks (%d tensors)", dist.get_world_size(), len(names))


def finish_distributed() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def check_output(output_dir: str, resume: bool, ckpt_dir: str | None = None) -> None:
    """Refuse to overwrite an earlier run silently: its checkpoints (and, for fine-tuning, its best model) stay
    unless the run is resumed; a resume without checkpoints starts from the beginning. The folders are locked for
    this run first (:func:`tpp_monai.run_folder.claim_folders`)."""
    from tpp_monai.run_folder import claim_folders

    claim_folders(output_dir, ckpt_dir)
    if resume:
        return
    earlier = sorted((Path(output_dir) / "checkpoints").glob("*.pt"))
    if ckpt_dir is not None and (Path(ckpt_dir) / "model.pt").is_file():
        earlier.append(Path(ckpt_dir) / "model.pt")
    if earlier:
        raise ConfigError(
            f"{earlier[0]} is from an earlier run; pass --resume true to continue that run, or choose another "
            "--output_dir / --ckpt_dir (or delete them) to start a new one"
        )


def record_settings(output_dir: str, settings: dict) -> None:
    """Write the run's resolved settings (seed included) to ``<output_dir>/settings.json`` (rank 0); a resumed run
    must match the recorded ones first (:func:`tpp_monai.run_folder.check_resume_settings`)."""
    from tpp_monai.handlers import is_rank0
    from tpp_monai.run_folder import check_resume_settings

    if not is_rank0():
        return
    check_resume_settings(output_dir, settings, settings.get("resume"))
    path = Path(output_dir)
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / f".settings.json.tmp{os.getpid()}"  # renamed into place: a kill never leaves half a record
    tmp.write_text(json.dumps(settings, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path / "settings.json")
