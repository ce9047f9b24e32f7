"""The bench's sections: steps, engine (the bundle's own trainer), data (the bundle's loader), scaling."""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

from tpp_monai.errors import ConfigError
from tpp_monai_bench.pairs import (
    CONFIDENCE,
    IDEAL_LIMIT,
    MIN_QUIET_PAIRS,
    SPREAD_LIMIT,
    Pair,
    run_pairs,
)
from tpp_monai_bench.timing import (
    MIB,
    PRESSURE,
    QUIET_STALL,
    Device,
    RoundTimer,
    count_flops,
    count_host_syncs,
    measure_peak_memory,
    median,
    overhead,
    ratio,
    scheduled_rounds,
    unique_bytes,
)
from tpp_monai_bench.workloads import (
    Workload,
    _family,
    _quiet_logs,
    _random_images,
    gemm_workload,
    make_adamw,
    stunet_dino_workload,
    stunet_step_workloads,
    train_workload,
    vit_workloads,
)


def run_rounds(
    workloads: Sequence[Workload], device: Device, warmup: int, steps: int, log: Callable,
    max_rounds: int | None = None, budget_s: float | None = None, wait_s: float = 0.0,
) -> None:  # fmt: skip
    """Warm-up rounds, then timed rounds (one step of every workload still short of samples, in turn) until each
    workload has ``steps`` quiet samples, ``max_rounds`` rounds ran or ``budget_s`` seconds passed.

    On a dedicated machine (or without PSI) every sample is quiet and this is exactly ``steps`` rounds.
    """
    timer = RoundTimer(device)
    for w in workloads:
        w.min_quiet = min(steps, 3)
    for r in range(warmup):
        t0 = time.perf_counter()
        for w in workloads:
            w.run()
        timer.flush()
        log(f"warm-up round {r + 1}/{warmup}: {time.perf_counter() - t0:.1f} s")
    for r, need in scheduled_rounds(workloads, steps, max_rounds, budget_s, lambda w: w.quiet_count < steps):
        t0, waited = time.perf_counter(), 0.0
        for w in need:
            waited += PRESSURE.wait_quiet(wait_s)
            timer.time(w.run, w.samples)
        timer.flush()
        quiet = min(w.quiet_count for w in workloads)
        log(f"round {r + 1}: {len(need)} steps, {time.perf_counter() - t0:.1f} s (waited {waited:.1f} s for a "
            f"quiet machine); fewest quiet samples {quiet}/{steps}")  # fmt: skip


def account(workloads: Sequence[Workload], device: Device, log: Callable) -> None:
    """Peak memory (one instrumented step) and FLOPs (one counted step) of every workload."""
    for w in workloads:
        if w.key == "matmul":
            w.peak_bytes = w.persistent_bytes = unique_bytes(w.persistent())
            continue
        w.prepare()
        flops: list[int] = []
        # One step for both: FlopCounterMode only counts, it allocates no tensors of its own.
        w.persistent_bytes, w.peak_bytes = measure_peak_memory(
            device, lambda w=w, flops=flops: flops.append(count_flops(w.step)), w.persistent
        )
        w.flops = w.flops if w.flops is not None else flops[0]
        w.prepare()
        w.host_syncs = count_host_syncs(device, w.step)
        log(f"accounted {w.key}: {w.peak_bytes / MIB:.0f} MiB, {w.flops / 1e9:.1f} GFLOP")


def section_steps(args: argparse.Namespace, device: Device, log: Callable) -> dict:
    family = _family(args.backbone)
    if family == "stunet":
        which = ["full_ft", "peft_ft", "tpp_dino", "inference"]
        workloads = stunet_step_workloads(
            args.backbone, args.method, device, args.batch_size, args.patch_size, which, tpp_method=args.tpp_method
        )
        info: dict = {}
    else:
        workloads, info = vit_workloads(args, device)
    gemm = gemm_workload(device)
    workloads = [gemm, *workloads]
    log(f"steps: {', '.join(w.key for w in workloads)}")
    run_rounds(workloads, device, args.warmup, args.steps, log, args.max_rounds, args.budget, args.wait_quiet)
    account(workloads, device, log)
    rate = gemm.flops / gemm.seconds
    by_key = {w.key: w for w in workloads}
    configs = {w.key: w.summary(rate) for w in workloads if w.key != "matmul"}
    full = by_key["full_ft"]

    def step_ratio(key: str) -> float | None:
        return ratio(by_key[key].seconds, full.seconds) if key in by_key else None

    def mem_ratio(key: str) -> float | None:
        return ratio(by_key[key].peak_bytes, full.peak_bytes) if key in by_key else None

    result = {
        "matmul": {"label": gemm.label, "gflop_per_s": rate / 1e9, **gemm.summary(None)},
        "configs": configs,
        "ratios": {
            "peft_step_ratio": step_ratio("peft_ft"),
            "peft_memory_ratio": mem_ratio("peft_ft"),
            "tpp_mae_step_ratio": step_ratio("tpp_mae_frozen"),
            "tpp_mae_memory_ratio": mem_ratio("tpp_mae_frozen"),
            "tpp_mae_trainable_step_ratio": step_ratio("tpp_mae_trainable"),
            "tpp_mae_trainable_memory_ratio": mem_ratio("tpp_mae_trainable"),
            "tpp_dino_step_ratio": step_ratio("tpp_dino"),
            "tpp_dino_memory_ratio": mem_ratio("tpp_dino"),
            "forward_matmul_fraction": configs["inference"]["matmul_fraction"] if "inference" in configs else None,
        },
        "checkpointing": {},
        "info": info,
    }
    for base, ck in (("full_ft", "full_ft_ckpt"), ("tpp_mae_frozen", "tpp_mae_frozen_ckpt")):
        if ck in by_key:
            result["checkpointing"][base] = {
                "step_ratio": ratio(by_key[ck].seconds, by_key[base].seconds),
                "memory_ratio": ratio(by_key[ck].peak_bytes, by_key[base].peak_bytes),
                "vs_full_ft_step": step_ratio(ck),
                "vs_full_ft_memory": mem_ratio(ck),
            }
    if "analytic_forward_flops" in info and "inference" in by_key:
        info["counted_forward_flops"] = by_key["inference"].flops
    return result


def _bundle_for(args: argparse.Namespace) -> Path:
    from tpp_monai.bundlegen import BUNDLES_DIR as REPO_BUNDLES

    dataset = "lits" if _family(args.backbone) == "stunet" else "mhist"
    method = args.tpp_method
    path = REPO_BUNDLES / f"{dataset}_{method}" / "configs" / "pretrain_tpp.json"
    if not path.is_file():
        raise ConfigError(f"no bundle config {path} to measure the engine with; pass --method with a TPP bundle")
    return path


def section_engine(args: argparse.Namespace, device: Device, log: Callable) -> dict:
    """The bundle's TPP-stage trainer (its handlers: schedules, pretext handlers, target-state and checkpoint
    savers, progress bar, stats) against a bare loop over the same network, optimizer, loss and batches."""
    from monai.bundle import ConfigParser
    from monai.data import DataLoader
    from monai.engines.utils import IterationEvents  # noqa: F401  (registers MONAI's events with ignite)

    if _family(args.backbone) == "stunet":
        return {"skipped": "engine overhead is measured on the 2D TPP-MAE bundle"}
    from ignite.engine import Events

    from tpp_monai.pretext import PretextBatch

    path = _bundle_for(args)
    b, s, n = args.batch_size, args.image_size, args.engine_iters
    gen = torch.Generator().manual_seed(0)
    samples = [{"image": torch.rand(3, s, s, generator=gen)} for _ in range(b * n)]
    loader = DataLoader(samples, batch_size=b, shuffle=False, num_workers=0)
    with tempfile.TemporaryDirectory(prefix="tpp_bench_") as tmp, _quiet_logs():
        parser = ConfigParser()
        parser.read_config(str(path))
        parser.update(
            {
                "bundle_root": tmp, "dataset_dir": tmp, "output_dir": f"{tmp}/out", "runs_dir": f"{tmp}/runs",
                "backbone": args.backbone, "backbone_ckpt": "none", "device": f"$torch.device('{device.torch}')",
                "amp": device.cuda, "num_workers": 0, "epochs": 1, "batch_size": b, "pretext": "mae",
                "pretext_size": s, "image_size": [s, s], "mae_decoder": "random",
            }
        )  # fmt: skip
        parser["train#dataloader"] = loader
        net = parser.get_parsed_content("pretext_net")
        net.decoder.requires_grad_(False)  # the frozen-decoder setting, as the steps section
        trainer = parser.get_parsed_content("train#trainer")
        network, loss_fn = parser.get_parsed_content("network"), parser.get_parsed_content("loss")
        optimizer = parser.get_parsed_content("optimizer")
        prepare = PretextBatch("mae")

        def bare_batches() -> Iterable:
            while True:
                yield from loader

        bare_feed = bare_batches()

        def bare_step() -> None:
            images, target = prepare(next(bare_feed), device.torch)
            optimizer.zero_grad(set_to_none=True)
            with device.autocast():
                loss = loss_fn(network(images), target)
            loss.backward()
            optimizer.step()

        # One bare step right after every engine iteration (on the loader's next batch): the two alternate within
        # a second, so other load on the machine hits both sides of each pair alike, and the median over the pairs'
        # ratios is robust where medians over separate epochs are not (a burst lasts several seconds).
        pairs: list[tuple[float, float]] = []  # (engine iteration, bare step) seconds
        clock = [0.0]

        def start(_: object = None) -> None:
            device.sync()
            clock[0] = time.perf_counter()

        def interleave(_: object = None) -> None:
            device.sync()
            t_engine = time.perf_counter() - clock[0]
            t0 = time.perf_counter()
            bare_step()
            device.sync()
            clock[0] = time.perf_counter()
            pairs.append((t_engine, clock[0] - t0))

        trainer.add_event_handler(Events.EPOCH_STARTED, start)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, interleave)  # after the bundle's own handlers

        def epoch() -> float:
            """Seconds of the epoch outside its iterations and bare steps (epoch-end handlers: checkpoint writes)."""
            done = len(pairs)
            PRESSURE.wait_quiet(args.wait_quiet)
            t0 = time.perf_counter()
            with contextlib.redirect_stderr(io.StringIO()):  # the progress bar still renders, out of sight
                trainer.run()
            device.sync()
            return time.perf_counter() - t0 - sum(e + b2 for e, b2 in pairs[done:])

        epoch()  # warm-up (first-iteration allocations, optimizer state, first checkpoint files)
        pairs.clear()
        extras = []
        for r in range(args.engine_reps):
            extras.append(epoch())
            log(f"engine epoch {r + 1}/{args.engine_reps}: {len(pairs)} engine/bare pairs")
    t_bare = median(b2 for _, b2 in pairs)
    per_pair = [e / b2 for e, b2 in pairs]
    return {
        "bundle": str(path.relative_to(path.parents[2])),
        "trainer": type(trainer).__name__,
        "handlers": [type(h).__name__ for h in parser.get_parsed_content("train#handlers")],
        "iterations_per_epoch": n,
        "pairs": len(pairs),
        "engine_iteration_s": median(e for e, _ in pairs),
        "bare_iteration_s": t_bare,
        "pair_ratio_quartiles": [round(x, 4) for x in statistics.quantiles(per_pair, n=4)],
        "engine_epoch_extra_s": median(extras),
        "engine_overhead": overhead(median(per_pair), median(extras) / t_bare, n, 1.0),
    }


def section_data(args: argparse.Namespace, device: Device, log: Callable) -> dict:
    """Images/s of the bundle's TPP-stage loader (CacheDataset of the deterministic transforms, random views in
    DataLoader workers set from the CPU count) on the demo dataset, timed alone after a warm-up epoch."""
    from monai.data import CacheDataset, DataLoader

    from tpp_monai.pretext import pretext_transforms
    from tpp_monai.workflows import cpu_workers, demo_dataset, images_of

    if _family(args.backbone) == "stunet":
        return {"skipped": "the 3D data pipeline is not part of this bench"}
    dataset, s, b = args.dataset, args.image_size, args.batch_size
    workers = cpu_workers()
    with tempfile.TemporaryDirectory(prefix="tpp_bench_data_") as tmp, _quiet_logs():
        root = Path(demo_dataset(dataset, tmp))
        records = images_of(str(root / "datalist.json"), str(root), "training")
        transform = pretext_transforms("mae", dataset, s, [s, s])
        t0 = time.perf_counter()
        ds = CacheDataset(records, transform, cache_rate=1.0, num_workers=workers, progress=False)
        cache_s = time.perf_counter() - t0
        loader = DataLoader(
            ds, batch_size=b, shuffle=True, drop_last=len(ds) > b, num_workers=workers,
            persistent_workers=workers > 0, pin_memory=device.cuda,
        )  # fmt: skip
        for _ in loader:  # warm-up epoch: starts the workers
            pass
        images, t0 = 0, time.perf_counter()
        while images < args.data_images or time.perf_counter() - t0 < args.data_seconds:
            for batch in loader:
                images += int(batch["image"].shape[0])
        elapsed = time.perf_counter() - t0
        del loader
    log(f"data: {images} images in {elapsed:.1f} s")
    return {
        "dataset": f"{dataset} (demo, {len(records)} training images)",
        "transforms": f"pretext_transforms('mae', {dataset!r}, {s})",
        "workers": workers,
        "cache_s": cache_s,
        "images": images,
        "seconds": elapsed,
        "images_per_s": images / elapsed,
    }


def section_scaling(args: argparse.Namespace, device: Device, log: Callable, steps_result: dict | None) -> dict:
    """TPP-MAE (trainable decoder, the GlaS setting) at the bench size and ``--scaling-size``; STU-Net's TPP step
    at two patch sizes."""
    from tpp_monai.backbones import get_backbone_spec
    from tpp_monai.handlers import param_groups
    from tpp_monai.network import build_network
    from tpp_monai.pretext import build_pretext, pretext_loss

    out: dict = {"tpp_mae": {}, "stunet": {}}
    if _family(args.backbone) != "stunet":
        geometry = dict(get_backbone_spec(args.backbone).mae_decoder)
        for size in (args.image_size, args.scaling_size):
            with _quiet_logs():
                enc = build_network(args.backbone, "features", args.tpp_method, backbone_ckpt="none", stage="tpp")
                net = build_pretext("mae", enc, size, mae_decoder="random", decoder=geometry)
                net = net.to(device.torch).train()
            loss = pretext_loss("mae", net)
            x = _random_images(device, args.batch_size, 3, (size, size))
            opt = make_adamw(param_groups(net, 1.5e-2), device, lr=1.5e-3, betas=(0.9, 0.95))
            w = train_workload(
                f"mae_{size}", f"TPP-MAE {size}", device, net, lambda net=net, loss=loss, x=x: loss(net(x), x), opt,
                args.batch_size, [x],
            )  # fmt: skip
            run_rounds([w], device, 1, args.scaling_steps, log, 2 * args.scaling_steps, None, args.wait_quiet)
            out["tpp_mae"][str(size)] = {
                "step_s": w.seconds, "images_per_s": args.batch_size / w.seconds, "quiet_steps": w.quiet_count,
                "step_s_all": [round(x.wall, 4) for x in w.samples],
            }  # fmt: skip
            log(f"scaling: TPP-MAE {size}: {w.seconds:.2f} s")
            del w, net, enc, opt
    backbone = args.backbone if _family(args.backbone) == "stunet" else args.stunet_backbone
    method = args.tpp_method if _family(args.backbone) == "stunet" else "conv_adapter"
    for patch in args.scaling_patches:
        w = stunet_dino_workload(backbone, method, device, 1, patch, suffix=f"_{patch}")
        run_rounds([w], device, 1, args.scaling_steps, log, 2 * args.scaling_steps, None, args.wait_quiet)
        out["stunet"][str(patch)] = {
            "backbone": backbone, "label": w.label, "step_s": w.seconds, "quiet_steps": w.quiet_count,
            "step_s_all": [round(x.wall, 4) for x in w.samples],
        }  # fmt: skip
        log(f"scaling: {backbone} {w.label}: {w.seconds:.2f} s")
        del w
    return out


def pair_batch(bundle_batch: int, max_batch: int | None) -> int:
    """The batch a pair runs at: the bundle's own, or ``max_batch`` where that is smaller (this machine's limit)."""
    return bundle_batch if not max_batch else min(bundle_batch, max_batch)


def peft_available() -> str | None:
    """``None`` when Hugging Face peft imports, else why not (the LoRA peer pair needs it)."""
    try:
        import peft  # noqa: F401
    except Exception as err:  # any import failure means the peer cannot be measured here
        return f"Hugging Face peft not importable ({type(err).__name__}: {err})"
    return None


def build_pairs(args: argparse.Namespace, device: Device, log: Callable) -> tuple[list[Pair], dict]:
    """The comparisons of the 2D ViT at the mhist bundles' batch sizes (fine-tuning's and the TPP stage's), capped
    by ``--max-batch``: each training configuration against full fine-tuning at the same batch, and the project's
    LoRA against peft's LoRA on the same timm-layout ViT-B/16 (``vit_b16``)."""
    from tpp_monai_bench.recipes import bundle_settings
    from tpp_monai_bench.workloads import VitCase, finetune_workload, tpp_dino_workload, tpp_mae_workload

    case = VitCase(args.backbone, args.image_size, "cls", "mhist", args.image_size)
    ft_batch = int(bundle_settings(case.bundle("full_finetune"), "finetune", ("batch_size",))["batch_size"])
    tpp_batch = int(bundle_settings(case.bundle(args.tpp_method), "pretrain_tpp", ("batch_size",))["batch_size"])
    if getattr(args, "pairs_batch", None):
        ft_batch = tpp_batch = args.pairs_batch
    bases: dict[int, Workload] = {}
    skipped: dict[str, str] = {}

    def base(batch: int) -> Workload:
        if batch not in bases:
            bases[batch] = finetune_workload(case, "full_finetune", batch, device, f"full_ft_b{batch}",
                                             f"full fine-tuning (batch {batch})")[0]  # fmt: skip
        return bases[batch]

    pairs: list[Pair] = []
    torch.manual_seed(0)
    with _quiet_logs():
        b = pair_batch(ft_batch, args.max_batch)
        for method in dict.fromkeys([args.method, "lora"]):
            if method == "full_finetune":
                continue
            w, _ = finetune_workload(case, method, b, device, f"{method}_ft", f"PEFT fine-tuning ({method})")
            pairs.append(Pair(f"{method}_ft", w.label, base(b), w, b, ft_batch))
        bt = pair_batch(tpp_batch, args.max_batch)
        mae, _ = tpp_mae_workload(case, args.tpp_method, bt, device, "tpp_mae_frozen", "TPP-MAE, frozen decoder")
        pairs.append(Pair("tpp_mae_frozen", mae.label, base(bt), mae, bt, tpp_batch))
        mae_u, _ = tpp_mae_workload(case, args.tpp_method, bt, device, "tpp_mae_trainable",
                                    "TPP-MAE, trainable decoder", trainable_decoder=True)  # fmt: skip
        pairs.append(Pair("tpp_mae_trainable", mae_u.label, base(bt), mae_u, bt, tpp_batch))
        if not args.no_dino:
            dino = tpp_dino_workload(case, args.tpp_method, bt, device)
            pairs.append(Pair("tpp_dino", dino.label, base(bt), dino, bt, tpp_batch))
        why_not = peft_available()
        if why_not:
            skipped["lora_vs_peft"] = why_not
        else:
            # the timm-layout twin of the backbone (its qkv an nn.Linear peft can wrap): medcoss_vit_b16 -> vit_b16
            vit = args.backbone.removeprefix("medcoss_")
            peer, _ = finetune_workload(case, "lora", b, device, "peft_lora", f"peft's LoRA ({vit}, attn.qkv)",
                                        backbone=vit, peer_lora=True)  # fmt: skip
            ours, _ = finetune_workload(case, "lora", b, device, "lora_same_vit", f"tpp_monai LoRA ({vit}, q+v)",
                                        backbone=vit)  # fmt: skip
            pairs.append(Pair("lora_vs_peft", ours.label, peer, ours, b, ft_batch, kind="peer"))
    log(f"pairs: {', '.join(f'{p.key} @ batch {p.batch}' for p in pairs)}")
    return pairs, skipped


def build_stunet_pairs(args: argparse.Namespace, device: Device, log: Callable) -> tuple[list[Pair], dict]:
    """STU-Net (``--backbone stunet_*``): PEFT fine-tuning and TPP-DINO against full fine-tuning at the LiTS bundle's
    batch sizes (capped by ``--max-batch``), at ``--patch-size``^3."""
    from tpp_monai_bench.recipes import bundle_settings

    bundle = f"lits_{args.tpp_method}"
    ft_batch = int(bundle_settings(bundle, "finetune", ("batch_size",))["batch_size"])
    tpp_batch = int(bundle_settings(bundle, "pretrain_tpp", ("batch_size",))["batch_size"])
    if getattr(args, "pairs_batch", None):
        ft_batch = tpp_batch = args.pairs_batch
    pairs: list[Pair] = []
    torch.manual_seed(0)
    b, bt = pair_batch(ft_batch, args.max_batch), pair_batch(tpp_batch, args.max_batch)
    full, peft = stunet_step_workloads(args.backbone, args.method, device, b, args.patch_size, ["full_ft", "peft_ft"])
    pairs.append(Pair("peft_ft", peft.label, full, peft, b, ft_batch))
    if not args.no_dino:
        base = full if bt == b else stunet_step_workloads(args.backbone, args.method, device, bt, args.patch_size,
                                                          ["full_ft"], suffix=f"_b{bt}")[0]  # fmt: skip
        dino = stunet_dino_workload(args.backbone, args.tpp_method, device, bt, args.patch_size)
        pairs.append(Pair("tpp_dino", dino.label, base, dino, bt, tpp_batch))
    log(f"pairs: {', '.join(f'{p.key} @ batch {p.batch}' for p in pairs)}")
    return pairs, {}


def build_swinunetr_pairs(args: argparse.Namespace, device: Device, log: Callable) -> tuple[list[Pair], dict]:
    """SwinUNETR (``--backbone swinunetr*``): its TPP-DINO step (peft's LoRA, the ``lits_swinunetr_lora`` bundle's
    stage) against its full fine-tuning step, at one batch (the TPP bundle's, capped by ``--max-batch``) and
    ``--patch-size``^3 (a multiple of 32)."""
    from tpp_monai_bench.recipes import bundle_settings
    from tpp_monai_bench.workloads import swinunetr_full_ft_workload

    bundle = "lits_swinunetr_lora"
    tpp_batch = int(bundle_settings(bundle, "pretrain_tpp", ("batch_size",))["batch_size"])
    bt = pair_batch(getattr(args, "pairs_batch", None) or tpp_batch, args.max_batch)
    torch.manual_seed(0)
    full = swinunetr_full_ft_workload(args.backbone, device, bt, args.patch_size)
    dino = stunet_dino_workload(args.backbone, "peft.lora", device, bt, args.patch_size, bundle=bundle)
    pairs = [Pair("tpp_dino", dino.label, full, dino, bt, tpp_batch)]
    log(f"pairs: {', '.join(f'{p.key} @ batch {p.batch}' for p in pairs)}")
    return pairs, {}


def section_pairs(args: argparse.Namespace, device: Device, log: Callable) -> dict:
    """Paired, interleaved step ratios with FLOP ratios and verdicts (:mod:`tpp_monai_bench.pairs`)."""
    build = {"stunet": build_stunet_pairs, "swinunetr": build_swinunetr_pairs}.get(_family(args.backbone), build_pairs)
    pairs, skipped = build(args, device, log)
    run_pairs(pairs, device, args.warmup, args.steps, log, args.max_rounds, args.budget, args.wait_quiet)
    out = {p.key: p.summary() for p in pairs}
    return {
        "rule": {
            "min_quiet_pairs": MIN_QUIET_PAIRS,
            "spread_limit": SPREAD_LIMIT,
            "quiet_stall": QUIET_STALL,
            "ideal_limit": IDEAL_LIMIT,
            "interval_confidence": CONFIDENCE,
        },
        "max_batch": args.max_batch,
        "pairs": out,
        "skipped": skipped,
    }
