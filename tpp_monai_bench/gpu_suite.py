"""The GPU suite: ``python -m tpp_monai bench --suite gpu --device cuda`` (``--device cpu --smoke`` runs the same
code paths, minus CUDA, at tiny sizes).

Part 1, steps at the bundles' real sizes, read from the bundle configs: ViT-B/16 at 224 px (mhist: fine-tuning
batch 32; the TPP stage's batch 64) and 512 px (GlaS segmentation fine-tuning, batch 4), full fine-tuning, adapter,
LoRA, TPP-MAE (frozen and trainable decoder) and TPP-DINO; STU-Net-B with Conv-Adapters, TPP-DINO and fine-tuning at
the LiTS bundle's patch and batch. For each: step time, images (patches) per second, model FLOP utilisation
(counted FLOPs per second / the bf16 matmul rate measured in the same run), peak memory and host-device
synchronisations inside one step (CUDA's sync debug mode).

Part 2, the real bundle workflows through ``monai.bundle`` (``ConfigWorkflow``, the bundles' own configs) on
generated data at full size (GlaS images 775x522, LiTS volumes 512x512x~100) for a few iterations:
``pretrain_tpp`` and ``finetune`` of ``glas_adapter`` and ``lits_conv_adapter``, and ``lits_conv_adapter``
inference on a 512x512x100 volume; with each training loader's supply rate (the workflow's own DataLoader, timed
alone) against the consumption of the matching step of part 1.

Writes one JSON (``--out``, default ``tpp_monai_bench/results/gpu_suite_<device>.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from tpp_monai_bench.recipes import bundle_settings
from tpp_monai_bench.timing import MIB, Device, median, ratio
from tpp_monai_bench.workloads import (
    VitCase,
    Workload,
    _quiet_logs,
    finetune_workload,
    gemm_workload,
    stunet_dino_workload,
    stunet_step_workloads,
    tpp_dino_workload,
    tpp_mae_workload,
)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
GLAS_SIZE = (775, 522)  # width x height of the GlaS images
LITS_VOLUME = (512, 512, 100)  # a LiTS CT volume (in-plane 512 x 512, ~100 slices)


@dataclass
class SuiteSizes:
    """Every size the suite uses; :func:`full_sizes` reads them from the bundles, :func:`smoke_sizes` shrinks them."""

    vit: str
    stunet: str
    vit_224: VitCase
    vit_512: VitCase
    ft_batch_224: int
    ft_batch_512: int
    tpp_batch: int
    lits_patch: tuple[int, int, int]
    lits_batch: int
    lits_tpp_batch: int
    lits_dino: dict
    glas_image: tuple[int, int] | None  # generated GlaS image size (None: the demo's own)
    lits_volume: tuple[int, int, int] | None  # generated LiTS volume size (None: the demo's own)
    glas_images: int  # generated GlaS images (training split about half)
    lits_cases: int
    tpp_epochs: int
    ft_iterations: int
    overlay: tuple[str, ...] = ()  # config overlays of the workflows (the demo's for the smoke run)
    workflow_overrides: dict = field(default_factory=dict)  # per dataset ("glas", "lits"): extra overrides
    vit_dino: dict | None = None  # DINO settings over the bundle's for the 2D TPP-DINO step (None: the bundle's)
    gemm_size: int | None = None
    steps: int = 5
    warmup: int = 2


def full_sizes() -> SuiteSizes:
    """The bundles' own sizes (their configs resolved by MONAI's ConfigParser)."""

    def get(bundle: str, workflow: str, *keys: str, **over: object) -> list:
        s = bundle_settings(bundle, workflow, keys, **over)
        return [s[k] for k in keys]

    ft_224, = get("mhist_full_finetune", "finetune", "batch_size")
    ft_512, size_512 = get("glas_full_finetune", "finetune", "batch_size", "image_size")
    tpp_batch, pretext_size = get("mhist_adapter", "pretrain_tpp", "batch_size", "pretext_size")
    lits_patch, lits_batch = get("lits_conv_adapter", "finetune", "image_size", "batch_size")
    lits_tpp_batch, lits_dino = get("lits_conv_adapter", "pretrain_tpp", "batch_size", "dino")
    glas_pretext, = get("glas_adapter", "pretrain_tpp", "pretext_size")
    return SuiteSizes(
        vit="medcoss_vit_b16", stunet="stunet_b",
        vit_224=VitCase("medcoss_vit_b16", 224, "cls", "mhist", int(pretext_size)),
        vit_512=VitCase("medcoss_vit_b16", int(size_512[0]), "seg", "glas", int(glas_pretext)),
        ft_batch_224=int(ft_224), ft_batch_512=int(ft_512), tpp_batch=int(tpp_batch),
        lits_patch=tuple(int(x) for x in lits_patch), lits_batch=int(lits_batch), lits_tpp_batch=int(lits_tpp_batch),
        lits_dino=dict(lits_dino or {}), glas_image=GLAS_SIZE, lits_volume=LITS_VOLUME, glas_images=200,
        lits_cases=4, tpp_epochs=3, ft_iterations=8,
    )  # fmt: skip


def smoke_sizes() -> SuiteSizes:
    """Tiny sizes for a CPU check of every code path (tiny backbones, the bundles' demo overlay for the workflows)."""
    return SuiteSizes(
        vit="medcoss_vit_tiny", stunet="stunet_tiny",
        vit_224=VitCase("medcoss_vit_tiny", 32, "cls", "mhist", 32),
        vit_512=VitCase("medcoss_vit_tiny", 48, "seg", "glas", 32),
        ft_batch_224=2, ft_batch_512=1, tpp_batch=2, lits_patch=(16, 32, 32), lits_batch=1, lits_tpp_batch=1,
        lits_dino={"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16, "global_size": [16, 32, 32],
                   "local_size": [16, 32, 32], "num_local": 1},
        glas_image=(72, 48), lits_volume=(40, 40, 24), glas_images=8, lits_cases=3, tpp_epochs=1, ft_iterations=2,
        overlay=("demo",), workflow_overrides={"glas": {"image_size": [32, 32], "pretext_size": 32}},
        # a small DINO head and crops: the defaults' 65536 outputs would dwarf a tiny backbone
        vit_dino={"out_dim": 4096, "hidden_dim": 256, "bottleneck_dim": 64, "global_size": 32, "local_size": 16,
                  "num_local": 2},
        gemm_size=512, steps=1, warmup=0,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------- part 1: steps


def _step_groups(sz: SuiteSizes, device: Device) -> list[tuple[str, Callable[[], list[Workload]]]]:
    """(name, builder) per group of steps measured together (built lazily, freed after their group)."""

    def fine_tuning(case: VitCase, batch: int) -> list[Workload]:
        tag = f"{case.size}"
        return [
            finetune_workload(case, m, batch, device, f"{key}_{tag}", f"{label} {case.size} px ({case.task})")[0]
            for m, key, label in (("full_finetune", "full_ft", "full fine-tuning"), ("adapter", "adapter_ft",
                                  "adapter fine-tuning"), ("lora", "lora_ft", "LoRA fine-tuning"))
        ]  # fmt: skip

    def tpp(case: VitCase, batch: int) -> list[Workload]:
        tag = f"{case.pretext_size}"
        full = finetune_workload(case, "full_finetune", batch, device, f"full_ft_{tag}_b{batch}",
                                 f"full fine-tuning {tag} px, batch {batch} (TPP's)")[0]  # fmt: skip
        mae = tpp_mae_workload(case, "adapter", batch, device, f"tpp_mae_frozen_{tag}",
                               f"TPP-MAE {tag} px, frozen decoder")[0]  # fmt: skip
        mae_u = tpp_mae_workload(case, "adapter", batch, device, f"tpp_mae_trainable_{tag}",
                                 f"TPP-MAE {tag} px, trainable decoder", trainable_decoder=True)[0]  # fmt: skip
        dino = tpp_dino_workload(case, "adapter", batch, device, key=f"tpp_dino_{tag}", dino=sz.vit_dino)
        return [full, mae, mae_u, dino]

    def stunet() -> list[Workload]:
        out = stunet_step_workloads(sz.stunet, "conv_adapter", device, sz.lits_batch, sz.lits_patch,
                                    ["full_ft", "peft_ft"], suffix="_lits")  # fmt: skip
        out.append(stunet_dino_workload(sz.stunet, "conv_adapter", device, sz.lits_tpp_batch, sz.lits_patch[0],
                                        suffix="_lits", dino=sz.lits_dino))  # fmt: skip
        return out

    return [  # names: STEP_GROUPS
        ("vit_224_finetune", lambda: fine_tuning(sz.vit_224, sz.ft_batch_224)),
        ("vit_224_tpp", lambda: tpp(sz.vit_224, sz.tpp_batch)),
        ("vit_512_finetune", lambda: fine_tuning(sz.vit_512, sz.ft_batch_512)),
        ("stunet_lits", stunet),
    ]


STEP_GROUPS = ("vit_224_finetune", "vit_224_tpp", "vit_512_finetune", "stunet_lits")


def measure_steps(sz: SuiteSizes, device: Device, log: Callable, groups: tuple[str, ...] = STEP_GROUPS) -> dict:
    """Part 1: the matmul rate, then every group of steps in ``groups`` (rounds of interleaved steps, then FLOPs,
    peak memory and host syncs of one step each)."""
    from tpp_monai_bench.sections import account, run_rounds

    gemm = gemm_workload(device, sz.gemm_size)
    run_rounds([gemm], device, 1, 3, log)
    rate = gemm.flops / gemm.seconds
    out: dict = {"matmul": {"label": gemm.label, "tflop_per_s": rate / 1e12}, "groups": {}, "configs": {}}
    log(f"matmul rate {rate / 1e12:.2f} TFLOP/s ({gemm.label})")
    for name, build in _step_groups(sz, device):
        if name not in groups:
            continue
        t0 = time.perf_counter()
        try:
            torch.manual_seed(0)
            with _quiet_logs():
                workloads = build()
            run_rounds(workloads, device, sz.warmup, sz.steps, log)
            account(workloads, device, log)
            for w in workloads:
                s = w.seconds
                out["configs"][w.key] = {
                    "group": name, "label": w.label, "batch": w.images, "step_s": s,
                    "images_per_s": ratio(w.images, s), "gflop_per_step": w.flops / 1e9,
                    "mfu": ratio(w.flops / s if s else None, rate), "peak_mib": w.peak_bytes / MIB,
                    "host_syncs": w.host_syncs, "trainable": w.trainable,
                    "step_s_all": [round(x.wall, 5) for x in w.samples],
                }  # fmt: skip
            out["groups"][name] = {"seconds": time.perf_counter() - t0}
        except Exception as err:  # an out-of-memory or a failure of one group is a result, not the end of the suite
            out["groups"][name] = {"error": _root_cause(err), "trace": traceback.format_exc(limit=6)}
            log(f"{name}: FAILED {out['groups'][name]['error']}")
        finally:
            workloads = None
            _release(device)
    c = out["configs"]

    def step_ratio(key: str, base: str) -> float | None:
        return ratio((c.get(key) or {}).get("step_s"), (c.get(base) or {}).get("step_s"))

    t, b = sz.vit_224.pretext_size, sz.tpp_batch
    full_key = f"full_ft_{t}_b{b}"
    out["targets"] = {
        "tpp_mae_step_ratio": {"value": step_ratio(f"tpp_mae_frozen_{t}", full_key), "target": "<= 0.45",
                               "what": f"TPP-MAE (frozen decoder) / full fine-tuning step, {t} px batch {b}"},
        "full_ft_mfu": {"value": (c.get(f"full_ft_{sz.vit_224.size}") or {}).get("mfu"), "target": ">= 0.35",
                        "what": "model FLOP utilisation of the ViT full fine-tuning step (224 px)"},
        "stunet_ft_peak_mib": {"value": (c.get("peft_ft_lits") or {}).get("peak_mib"),
                               "target": "fits in memory",
                               "what": "STU-Net conv-adapter fine-tuning at the LiTS patch"},
    }  # fmt: skip
    for v in out["targets"].values():
        if v["target"].startswith(("<=", ">=")) and v["value"] is not None:
            limit = float(v["target"].split()[1])
            v["met"] = v["value"] <= limit if v["target"].startswith("<=") else v["value"] >= limit
    return out


def _root_cause(err: BaseException) -> str:
    """The innermost cause of ``err`` (MONAI's config errors wrap the real one), as ``Type: message``."""
    while err.__cause__ is not None or (err.__context__ is not None and not err.__suppress_context__):
        err = err.__cause__ or err.__context__
    return f"{type(err).__name__}: {err}".strip()


def _release(device: Device) -> None:
    gc.collect()
    if device.cuda:
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------ part 2: bundle workflows


def generate_glas(folder: Path, n: int, size: tuple[int, int] | None) -> Path:
    """The GlaS demo layout (:func:`tpp_monai.data.make_demo_dataset`) with every image and mask resized to ``size``
    (width, height; bilinear images, nearest masks), and its datalist."""
    from PIL import Image

    from tpp_monai.data import build_datalist, make_demo_dataset, write_datalist

    root = make_demo_dataset("glas", folder, n=n)
    if size is not None:
        for path in sorted(root.glob("*.bmp")):
            img = Image.open(path)
            mask = path.stem.endswith("_anno")
            img.resize(size, Image.NEAREST if mask else Image.BILINEAR).save(path)
    write_datalist(build_datalist("glas", root), root / "datalist.json")
    return root


def _resize_volume(path: Path, shape: tuple[int, int, int], order: int) -> None:
    import nibabel as nib
    from scipy.ndimage import zoom

    img = nib.load(path)
    data = np.asarray(img.dataobj)
    factors = [t / s for t, s in zip(shape, data.shape, strict=True)]
    out = zoom(data, factors, order=order, grid_mode=True, mode="nearest").astype(data.dtype)
    # the voxel spacing stays the demo's (LiTS-like, ~0.8 mm in-plane): a larger field of view, so the bundle's
    # resampling to its target spacing keeps the volume at full size
    nib.save(nib.Nifti1Image(out, img.affine), path)


def generate_lits(folder: Path, n: int, shape: tuple[int, int, int] | None) -> Path:
    """The LiTS demo layout with every volume resized to ``shape`` voxels (linear CT, nearest labels)."""
    from tpp_monai.data import build_datalist, make_demo_dataset, write_datalist

    root = make_demo_dataset("lits", folder, n=n)
    if shape is not None:
        for path in sorted(root.rglob("*.nii")):
            _resize_volume(path, shape, order=0 if path.name.startswith("segmentation") else 1)
    write_datalist(build_datalist("lits", root), root / "datalist.json")
    return root


class IterationClock:
    """Wall time of every iteration of an ignite engine (device-synchronised at each iteration's end)."""

    def __init__(self, device: Device) -> None:
        self.device = device
        self.times: list[float] = []
        self.items: list[int] = []
        self._t = 0.0

    def attach(self, engine: object) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._end)

    def _start(self, engine: object) -> None:
        self._t = time.perf_counter()

    def _end(self, engine: object) -> None:
        self.device.sync()
        self.times.append(time.perf_counter() - self._t)
        self.items.append(batch_items(engine.state.batch))


def batch_items(batch: object) -> int:
    """Images (patches) in a collated batch: the leading size of its ``image`` (or first) tensor; a list of
    per-sample dicts counts its length."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, dict):
        values = [batch["image"]] if "image" in batch else list(batch.values())
    elif isinstance(batch, (list, tuple)):
        if batch and all(isinstance(b, dict) for b in batch):
            return len(batch)
        values = list(batch)
    else:
        return 0
    for v in values:
        n = batch_items(v)
        if n:
            return n
    return 0


def supply_rate(loader: object, batches: int) -> dict:
    """Images (patches) per second the workflow's own training DataLoader delivers alone, after one warm batch."""
    it = iter(loader)
    next(it)
    images, t0 = 0, time.perf_counter()
    for _ in range(batches):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        images += batch_items(batch)
    elapsed = time.perf_counter() - t0
    return {"images": images, "seconds": elapsed, "images_per_s": images / elapsed}


def run_bundle(bundle: str, workflow: str, overlay: tuple[str, ...], device: Device, overrides: dict,
               supply_batches: int = 0) -> dict:  # fmt: skip
    """One bundle workflow through ``monai.bundle.ConfigWorkflow`` (initialize, run, finalize), timed per iteration;
    ``supply_batches`` > 0 also times its training loader alone."""
    from monai.bundle import ConfigWorkflow

    from tpp_monai.bundlegen import BUNDLES_DIR, workflow_config_files

    folder = BUNDLES_DIR / bundle
    run_id = "run" if workflow == "inference" else workflow
    files = workflow_config_files(folder, workflow, *overlay)
    t0 = time.perf_counter()
    wf = ConfigWorkflow(config_file=files, meta_file=str(folder / "configs" / "metadata.json"), logging_file=False,
                        run_id=run_id, workflow_type="infer" if workflow == "inference" else "train",
                        **overrides)  # fmt: skip
    wf.initialize()
    clock = IterationClock(device)
    engine = wf.parser.get_parsed_content("evaluator" if workflow == "inference" else "train#trainer")
    clock.attach(engine)
    if device.cuda:
        torch.cuda.reset_peak_memory_stats()
    t_run = time.perf_counter()
    wf.run()
    device.sync()
    run_s = time.perf_counter() - t_run
    out = {
        "bundle": bundle, "workflow": workflow, "configs": [Path(f).name for f in files],
        "iterations": len(clock.times), "items": sum(clock.items), "run_s": run_s,
        "iteration_s_median": median(clock.times), "iteration_s_all": [round(t, 4) for t in clock.times],
        "peak_mib": torch.cuda.max_memory_allocated() / MIB if device.cuda else None,
    }  # fmt: skip
    if supply_batches and workflow != "inference":
        out["supply"] = supply_rate(wf.parser.get_parsed_content("train#dataloader"), supply_batches)
    wf.finalize()
    out["wall_s"] = time.perf_counter() - t0
    del wf, engine
    return out


WORKFLOW_BUNDLES = ("glas_adapter", "lits_conv_adapter")


def measure_workflows(sz: SuiteSizes, device: Device, work: Path, log: Callable, steps: dict | None,
                      bundles: tuple[str, ...] = WORKFLOW_BUNDLES) -> dict:  # fmt: skip
    """Part 2: generate the data, run the five workflows (of ``bundles``), compare each loader's supply with its
    step's consumption."""
    glas = generate_glas(work / "glas_data", sz.glas_images, sz.glas_image) if "glas_adapter" in bundles else None
    lits = generate_lits(work / "lits_data", sz.lits_cases, sz.lits_volume) if "lits_conv_adapter" in bundles else None
    volume_dir = work / "lits_volume"
    volume_dir.mkdir(parents=True, exist_ok=True)
    if lits is not None:  # the inference input: one generated CT volume at LITS_VOLUME (the smoke run: its size)
        source = sorted(lits.rglob("volume-*.nii"))[0]
        (volume_dir / "volume-infer.nii").write_bytes(source.read_bytes())
    log(f"generated data: GlaS {sz.glas_images} images {sz.glas_image}, LiTS {sz.lits_cases} volumes {sz.lits_volume}")
    common = {"backbone_ckpt": "none", "tensorboard": False, "save_execute_config": False}
    device_override = {"device": f"$torch.device('{device.torch}')", "amp": device.cuda}
    plan = [
        ("glas_adapter", "pretrain_tpp", glas, {"tpp_epochs": sz.tpp_epochs, "mae_decoder": "random"},
         "tpp_mae_trainable"),
        ("glas_adapter", "finetune", glas, {"iterations": sz.ft_iterations, "val_interval": 1},
         f"adapter_ft_{sz.vit_512.size}"),
        ("lits_conv_adapter", "pretrain_tpp", lits, {"tpp_epochs": sz.tpp_epochs}, "tpp_dino_lits"),
        ("lits_conv_adapter", "finetune", lits, {"iterations": sz.ft_iterations, "val_interval": 1}, "peft_ft_lits"),
        ("lits_conv_adapter", "inference", lits, {"input_dir": str(volume_dir)}, None),
    ]  # fmt: skip
    out: dict = {}
    for bundle, workflow, data, extra, step_key in plan:
        if bundle not in bundles:
            continue
        name = f"{bundle}/{workflow}"
        runs = work / f"runs_{bundle}"
        over = {**common, **device_override, "dataset_dir": str(data), "runs_dir": str(runs),
                "ckpt_dir": str(runs / "models"), **sz.workflow_overrides.get(bundle.split("_")[0], {}),
                **extra}  # fmt: skip
        if workflow == "inference":
            over["output_dir"] = str(work / "inference_out")
        log(f"workflow {name} ...")
        try:
            with _quiet_logs(), contextlib.redirect_stderr(io.StringIO()):
                r = run_bundle(bundle, workflow, sz.overlay, device, over, supply_batches=4 if step_key else 0)
        except Exception as err:  # a failing workflow is a result of the suite
            out[name] = {"error": _root_cause(err), "trace": traceback.format_exc(limit=8)}
            log(f"workflow {name}: FAILED {out[name]['error']}")
            _release(device)
            continue
        if workflow == "inference":
            written = sorted((work / "inference_out").rglob("*.nii*"))
            r["outputs"] = [p.name for p in written]
        consume = None
        if step_key and steps:
            match = next((c for k, c in steps["configs"].items() if k.startswith(step_key)), None)
            consume = match and match["images_per_s"]
            r["step_compared"] = match and match["label"]
        if "supply" in r:
            r["consumption_images_per_s"] = consume
            r["supply_ratio"] = ratio(r["supply"]["images_per_s"], consume)
        out[name] = r
        log(f"workflow {name}: {r['iterations']} iterations in {r['run_s']:.1f} s")
        _release(device)
    return out


# -------------------------------------------------------------------------------------------------------- the run


def run_suite(args: argparse.Namespace, device: Device, log: Callable) -> dict:
    import tempfile

    sz = smoke_sizes() if args.smoke else full_sizes()
    result: dict = {
        "suite": "gpu", "smoke": bool(args.smoke), "machine": device.describe(),
        "command": "python -m tpp_monai bench --suite gpu --device " + device.torch.type
        + (" --smoke" if args.smoke else ""),
        "sizes": {k: (asdict(v) if isinstance(v, VitCase) else v) for k, v in vars(sz).items()},
    }  # fmt: skip
    t0 = time.perf_counter()
    if "steps" in args.suite_parts:
        result["steps"] = measure_steps(sz, device, log, tuple(args.suite_groups))
    if "workflows" in args.suite_parts:
        with tempfile.TemporaryDirectory(prefix="tpp_gpu_suite_") as tmp:
            result["workflows"] = measure_workflows(sz, device, Path(tmp), log, result.get("steps"))
    result["wall_s"] = time.perf_counter() - t0
    out = Path(args.out) if args.out else RESULTS_DIR / f"gpu_suite_{device.torch.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=float) + "\n")
    result["json"] = str(out)
    log(f"wrote {out}")
    return result


def format_suite(result: dict) -> str:
    """The suite's table (the JSON holds everything)."""
    hw = result["machine"].get("gpu") or result["machine"]["cpu"]
    lines = [f"GPU suite ({'smoke, ' if result['smoke'] else ''}{hw})"]
    steps = result.get("steps")
    if steps:
        lines.append(f"matmul rate: {steps['matmul']['tflop_per_s']:.2f} TFLOP/s ({steps['matmul']['label']})")
        head = f"{'configuration':<52} {'batch':>5} {'step ms':>9} {'img/s':>8} {'MFU':>6} {'peak MiB':>9} {'syncs':>5}"
        lines += [head, "-" * len(head)]
        for c in steps["configs"].values():
            lines.append(
                f"{c['label']:<52.52} {c['batch']:>5} {c['step_s'] * 1e3:>9.1f} {c['images_per_s']:>8.1f} "
                f"{100 * (c['mfu'] or 0):>5.1f}% {c['peak_mib']:>9.0f} "
                f"{'-' if c['host_syncs'] is None else c['host_syncs']:>5}"
            )
        for name, g in steps["groups"].items():
            if "error" in g:
                lines.append(f"{name}: FAILED {g['error']}")
        for key, t in steps["targets"].items():
            value = "-" if t["value"] is None else f"{t['value']:.3f}"
            lines.append(f"target {key}: {value} ({t['target']}; {t['what']})" + (
                "" if "met" not in t else (" met" if t["met"] else " MISSED")))
    for name, w in (result.get("workflows") or {}).items():
        if "error" in w:
            lines.append(f"workflow {name}: FAILED {w['error']}")
            continue
        supply = ""
        if "supply" in w:
            consume = w["consumption_images_per_s"]
            supply = f"; loader {w['supply']['images_per_s']:.1f} images/s vs step " + (
                "-" if consume is None else f"{consume:.1f} (x{w['supply_ratio']:.2f})"
            )
        lines.append(f"workflow {name}: {w['iterations']} iterations, median {w['iteration_s_median'] or 0:.3f} s, "
                     f"run {w['run_s']:.1f} s{supply}")  # fmt: skip
    lines.append(f"JSON: {result.get('json')}")
    return "\n".join(lines)
