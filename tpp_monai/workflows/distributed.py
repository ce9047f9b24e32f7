"""Distributed data parallel (torchrun) set-up, sharding and tear-down for ``multi_gpu.json``."""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)


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


def init_distributed(enabled: bool = True) -> None:
    """Join the torchrun process group (NCCL on GPUs, gloo on CPUs) and pin this rank's GPU.

    ignite computes its rank lazily with collective calls the first time it is asked; asking here, on every rank at
    the same point, keeps a rank-0-only code path from blocking the others later.
    """
    import ignite.distributed as idist
    import torch
    import torch.distributed as dist

    if not enabled:
        return
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    idist.get_rank()
    quiet_other_ranks()


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


def local_device() -> object:
    """This rank's device under torchrun: ``cuda:<LOCAL_RANK>``, or the CPU without GPUs."""
    import torch

    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device(f"cuda:{os.environ.get('LOCAL_RANK', '0')}")


def ddp_device_ids(device: object) -> list | None:
    """``device_ids`` of ``DistributedDataParallel``: this rank's GPU, or ``None`` on CPUs."""
    return [device] if getattr(device, "type", "cpu") == "cuda" else None
