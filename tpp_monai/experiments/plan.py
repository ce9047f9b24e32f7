"""Experiment plans: a preset name or a YAML/JSON file with the axes of a grid of bundle runs, checked on load.

A plan lists datasets, methods, initialisations, label fractions and seeds (the grid is their product), the bundle
overrides for every run, per dataset and per stage, and the executor's resources. ``grids`` (optional) is a list of
sub-grids: each entry replaces some axes (and may add ``overrides``/``stage_overrides`` and a ``variant`` name), and
the plan's runs are the union of its sub-grids; that expresses tables such as "every method without TPP, and Adapter
with TPP". Every unknown key or value is refused with one message that names it and the valid choices.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tpp_monai.errors import ConfigError, unknown_choice

PRESETS_DIR = Path(__file__).resolve().parent / "presets"
BUNDLES_DIR = Path(__file__).resolve().parents[2] / "bundles"
STAGES = ("pretrain_tpp", "finetune", "evaluate")
PRETEXTS = ("mae", "dino")
EXECUTORS = ("local", "slurm")
AXES = ("datasets", "methods", "init", "label_fractions", "seeds")
GRID_KEYS = (*AXES, "backbone", "variant", "overrides", "stage_overrides")
SLURM_KEYS = {"partition": None, "cpus_per_task": 2, "mem_gb": 8, "timeout_min": 60, "gpus_per_node": None,
              "additional": {}}  # fmt: skip
EXECUTOR_KEYS = {"kind": "local", "gpus_per_run": 1, "slurm": SLURM_KEYS}


#: huggingface peft's data-driven LoRA initialisations (``init_lora_weights``), the ``peft-<name>`` inits: a finetune
#: that starts from them, no TPP stage (its cost: the finetune's ``init_cost.json``, tpp_monai.workflows.costs)
PEFT_INITS = ("eva", "pissa", "olora", "corda")
#: the methods whose peft config takes ``init_lora_weights`` and that a ``peft-*`` init was tested with
PEFT_INIT_METHODS = ("peft.lora",)
#: the built-in method whose bundle hosts a ``peft.*`` method without a bundle of its own (run with ``method`` set)
HOST_METHODS = ("lora", "swinunetr_lora")


@dataclass(frozen=True)
class Init:
    """One initialisation of the target parameters: ``random``, ``tpp-<pretext>`` (TPP on the dataset's own training
    images), ``transfer:<source>:<pretext>`` (TPP on another dataset's training images), ``upstream`` (target
    parameters from a given file, the dataset's ``tpp_ckpt`` in ``dataset_overrides``; no TPP stage) or
    ``peft-<eva|pissa|olora|corda>`` (peft's LoRA ``init_lora_weights``, computed at the start of fine-tuning; no TPP
    stage)."""

    kind: str  # random | tpp | transfer | upstream | peft
    pretext: str | None = None  # tpp, transfer: the pretext; peft: the init_lora_weights value
    source: str | None = None

    @property
    def label(self) -> str:
        """The name used in settings and run keys (``tpp-mae``, ``transfer:glas:mae``, ``peft-eva``...)."""
        if self.kind == "transfer":
            return f"transfer:{self.source}:{self.pretext}"
        if self.kind == "peft":
            return f"peft-{self.pretext}"
        return f"tpp-{self.pretext}" if self.kind == "tpp" else self.kind

    @property
    def needs_tpp(self) -> bool:
        return self.kind in ("tpp", "transfer")


def parse_init(text: str, where: str = "init") -> Init:
    """Parse one entry of the ``init`` axis."""
    from tpp_monai.data.info import DATASETS

    value = str(text).strip()
    if value in ("random", "upstream"):
        return Init(value)
    match = re.fullmatch(r"tpp-(\w+)", value)
    if match and match.group(1) in PRETEXTS:
        return Init("tpp", match.group(1))
    match = re.fullmatch(r"peft-(\w+)", value)
    if match and match.group(1) in PEFT_INITS:
        return Init("peft", match.group(1))
    match = re.fullmatch(r"transfer:(\w+):(\w+)", value)
    if match and match.group(1) in DATASETS and match.group(2) in PRETEXTS:
        return Init("transfer", match.group(2), match.group(1))
    raise ConfigError(
        f"unknown initialisation {value!r} (from {where}); valid: random, tpp-mae, tpp-dino, upstream, "
        f"{', '.join(f'peft-{i}' for i in PEFT_INITS)}, transfer:<dataset>:<mae|dino> with a dataset of "
        f"{', '.join(DATASETS)}"
    )


@dataclass
class Plan:
    """A resolved plan (the contract's plan file, with defaults filled in)."""

    name: str
    paper: str | None = None
    description: str = ""
    datasets: list[str] = field(default_factory=list)
    methods: list[str] = field(default_factory=list)
    init: list[str] = field(default_factory=lambda: ["random", "tpp-mae"])
    label_fractions: list[float] = field(default_factory=lambda: [1.0])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    backbone: str | None = None
    overlays: list[str] = field(default_factory=list)
    overrides: dict[str, Any] = field(default_factory=dict)
    dataset_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    stage_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    executor: dict[str, Any] = field(default_factory=lambda: copy.deepcopy(EXECUTOR_KEYS))
    metrics: list[str] = field(default_factory=list)
    grids: list[dict[str, Any]] = field(default_factory=list)
    source: str | None = None  # where the plan was read from

    def to_dict(self) -> dict:
        return asdict(self)

    def subgrids(self) -> list[dict[str, Any]]:
        """The sub-grids with every axis filled in from the plan (one sub-grid, the plan's axes, without ``grids``)."""
        base = {"datasets": self.datasets, "methods": self.methods, "init": self.init,
                "label_fractions": self.label_fractions, "seeds": self.seeds, "backbone": self.backbone,
                "variant": None, "overrides": {}, "stage_overrides": {}}  # fmt: skip
        return [{**base, **grid} for grid in self.grids] or [base]


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")) + sorted(p.stem for p in PRESETS_DIR.glob("*.json"))


def _read(path: Path) -> dict:
    text = path.read_text()
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as err:  # json/yaml syntax errors: one message naming the file
        raise ConfigError(f"plan file {path} cannot be parsed: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"plan file {path} must hold a mapping of plan keys, not {type(data).__name__}")
    return data


def find_plan_file(name_or_path: str | Path) -> Path:
    """A preset's file or the given path."""
    path = Path(name_or_path)
    if path.suffix.lower() in (".yaml", ".yml", ".json") or path.is_file():
        if not path.is_file():
            raise ConfigError(f"plan file {path} not found")
        return path
    for suffix in (".yaml", ".json"):
        preset = PRESETS_DIR / f"{name_or_path}{suffix}"
        if preset.is_file():
            return preset
    raise unknown_choice("plan preset", str(name_or_path), preset_names(), "PLAN; or give a .yaml/.json file")


def load_plan(name_or_path: str | Path | dict, **cli_overrides: Any) -> Plan:
    """Read a preset (by name) or plan file, apply ``cli_overrides`` (plan keys, e.g. ``seeds=[0]``), check it."""
    if isinstance(name_or_path, dict):
        data, source = copy.deepcopy(name_or_path), None
    else:
        path = find_plan_file(name_or_path)
        data, source = _read(path), str(path.resolve())
    data.update({k: v for k, v in cli_overrides.items() if v is not None})
    return check_plan(data, source)


def _as_list(data: dict, key: str, where: str) -> list:
    value = data[key]
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"{key} (from {where}) must be a non-empty list, got {value!r}")
    return list(value)


def _check_mapping(value: object, key: str, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{key} (from {where}) must be a mapping of bundle keys to values, got {value!r}")
    return dict(value)


def bundle_dir(dataset: str, method: str) -> Path:
    """The bundle that runs ``method`` on ``dataset``: its own (``glas_adapter``, ``glas_peft_dora``), else for a
    ``peft.*`` method the dataset's LoRA bundle, run with ``method`` overridden (:func:`hosted`)."""
    own = BUNDLES_DIR / f"{dataset}_{method.replace('.', '_')}"
    if own.is_dir() or not method.startswith("peft."):
        return own
    hosts = [BUNDLES_DIR / f"{dataset}_{host}" for host in HOST_METHODS]
    return next((h for h in hosts if h.is_dir()), own)


def hosted(dataset: str, method: str) -> bool:
    """Whether ``method`` runs on another method's bundle (so its runs set ``method``)."""
    return bundle_dir(dataset, method).name != f"{dataset}_{method.replace('.', '_')}"


def has_tpp(dataset: str, method: str) -> bool:
    """Whether the bundle has a TPP stage (the baselines without target parameters have none)."""
    return (bundle_dir(dataset, method) / "configs" / "pretrain_tpp.json").is_file()


def _check_axes(grid: dict, where: str, plan: dict) -> None:
    from tpp_monai.data.info import DATASETS

    for dataset in grid["datasets"]:
        if dataset not in DATASETS:
            raise unknown_choice("dataset", dataset, DATASETS, f"{where} datasets")
    methods = {p.name[len(d) + 1 :] for d in DATASETS for p in BUNDLES_DIR.glob(f"{d}_*")}
    for method in grid["methods"]:
        if method.startswith("peft."):
            _check_peft_method(method, grid, where)
        elif method not in methods:
            raise unknown_choice("method", method, methods, f"{where} methods")
        for dataset in grid["datasets"]:
            if not bundle_dir(dataset, method).is_dir():
                valid = sorted(p.name for p in BUNDLES_DIR.glob(f"{dataset}_*"))
                raise ConfigError(
                    f"no bundle {dataset}_{method} for dataset {dataset!r} and method {method!r} (from {where}); "
                    f"bundles of {dataset}: {', '.join(valid)}"
                )
            for overlay in plan["overlays"]:
                if not (bundle_dir(dataset, method) / "configs" / f"{overlay}.json").is_file():
                    raise ConfigError(
                        f"overlay {overlay!r} (from overlays) is not a config of bundle {dataset}_{method}; "
                        f"it needs configs/{overlay}.json"
                    )
    inits = [parse_init(i, f"{where} init") for i in grid["init"]]
    for init in inits:
        if init.kind == "upstream":
            missing = [d for d in grid["datasets"] if "tpp_ckpt" not in plan["dataset_overrides"].get(d, {})]
            if missing:
                raise ConfigError(
                    f"init 'upstream' (from {where}) fine-tunes from given target parameters: set "
                    f"dataset_overrides: {{{missing[0]}: {{tpp_ckpt: /path/to/target_parameters.pt}}}}"
                )
        if init.kind == "peft":
            wrong = [m for m in grid["methods"] if m not in PEFT_INIT_METHODS]
            if wrong:
                raise ConfigError(
                    f"init {init.label!r} (from {where}) is peft's LoRA init_lora_weights={init.pretext!r}: it "
                    f"applies to {', '.join(PEFT_INIT_METHODS)}, not {wrong[0]!r}; put it in a sub-grid (grids) "
                    "with those methods"
                )
    for fraction in grid["label_fractions"]:
        if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0 < fraction <= 1:
            raise ConfigError(f"label fraction {fraction!r} (from {where} label_fractions) must be in (0, 1]")
    for seed in grid["seeds"]:
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ConfigError(f"seed {seed!r} (from {where} seeds) must be a non-negative integer")
    if grid.get("backbone") is not None:
        from tpp_monai.backbones import BACKBONES  # imports torch: only for plans that name a backbone

        if grid["backbone"] not in BACKBONES:
            raise unknown_choice("backbone", grid["backbone"], BACKBONES, f"{where} backbone")
    for stage in _check_mapping(grid.get("stage_overrides"), "stage_overrides", where):
        if stage not in STAGES:
            raise unknown_choice("stage", stage, STAGES, f"{where} stage_overrides")


def _check_peft_method(method: str, grid: dict, where: str) -> None:
    """A ``peft.*`` method must name a tuner of the installed peft and have a bundle to run on. Whether the tuner
    wraps the backbone is checked by each run before it builds anything (probing all of peft's tuners here takes
    about a minute on 2 CPU cores)."""
    from tpp_monai.peft import method_names

    if method not in method_names(True):
        raise unknown_choice("method", method, method_names(True), f"{where} methods")
    for dataset in grid["datasets"]:
        if not bundle_dir(dataset, method).is_dir():
            raise ConfigError(f"no bundle runs {method!r} on {dataset!r} (from {where}): it needs "
                              f"bundles/{dataset}_{HOST_METHODS[0]} (or its own bundle) to host it")  # fmt: skip


def _check_executor(value: object) -> dict:
    executor = copy.deepcopy(EXECUTOR_KEYS)
    given = _check_mapping(value, "executor", "executor")
    for key, item in given.items():
        if key not in EXECUTOR_KEYS:
            raise unknown_choice("executor key", key, EXECUTOR_KEYS, "executor")
        if key == "slurm":
            for skey, sval in _check_mapping(item, "executor.slurm", "executor").items():
                if skey not in SLURM_KEYS:
                    raise unknown_choice("executor.slurm key", skey, SLURM_KEYS, "executor.slurm")
                executor["slurm"][skey] = sval
        else:
            executor[key] = item
    if executor["kind"] not in EXECUTORS:
        raise unknown_choice("executor", executor["kind"], EXECUTORS, "executor.kind")
    gpus = executor["gpus_per_run"]
    if not isinstance(gpus, int) or isinstance(gpus, bool) or gpus < 0:
        raise ConfigError(f"executor.gpus_per_run must be a non-negative integer, got {gpus!r}")
    if not isinstance(executor["slurm"]["additional"], dict):
        raise ConfigError("executor.slurm.additional must map sbatch option names to values, e.g. {account: abc}")
    return executor


def check_plan(data: dict, source: str | None = None) -> Plan:
    """Validate a plan mapping; returns the :class:`Plan` with defaults filled in."""
    known = {f for f in Plan.__dataclass_fields__ if f != "source"}
    for key in data:
        if key not in known:
            raise unknown_choice("plan key", key, known, source or "plan")
    if not data.get("name") or not re.fullmatch(r"[\w.-]+", str(data["name"])):
        raise ConfigError(f"plan name {data.get('name')!r} (from {source or 'plan'}) must be a non-empty word "
                          "(letters, digits, '_', '-', '.'): it names the experiment folder")  # fmt: skip
    plan = Plan(name=str(data["name"]), source=source)
    for key in known - {"name"}:
        if key in data and data[key] is not None:
            setattr(plan, key, copy.deepcopy(data[key]))
    full = plan.to_dict()
    for key in ("datasets", "methods", "init", "label_fractions", "seeds"):
        setattr(plan, key, _as_list(full, key, "plan"))
    plan.overlays = list(plan.overlays or [])
    plan.metrics = list(plan.metrics or [])
    plan.overrides = _check_mapping(plan.overrides, "overrides", "plan")
    per_dataset = _check_mapping(plan.dataset_overrides, "dataset_overrides", "plan")
    plan.dataset_overrides = {d: _check_mapping(v, f"dataset_overrides.{d}", "plan") for d, v in per_dataset.items()}
    per_stage = _check_mapping(plan.stage_overrides, "stage_overrides", "plan")
    plan.stage_overrides = {s: _check_mapping(v, f"stage_overrides.{s}", "plan") for s, v in per_stage.items()}
    plan.executor = _check_executor(plan.executor)
    if not isinstance(plan.grids, list):
        raise ConfigError("grids (from plan) must be a list of sub-grids (mappings of axes to values)")
    full = plan.to_dict()
    for index, grid in enumerate(plan.grids):
        where = f"grids[{index}]"
        for key in _check_mapping(grid, where, "plan"):
            if key not in GRID_KEYS:
                raise unknown_choice("sub-grid key", key, GRID_KEYS, where)
        for key in AXES:
            if key in grid:
                grid[key] = _as_list(grid, key, where)
    for index, grid in enumerate(plan.subgrids()):
        _check_axes(grid, f"grids[{index}]" if plan.grids else "plan", full)
    for dataset in plan.dataset_overrides:
        _check_axes({"datasets": [dataset], "methods": [], "init": [], "label_fractions": [], "seeds": []},
                    "dataset_overrides", full)  # fmt: skip
    for stage in plan.stage_overrides:
        if stage not in STAGES:
            raise unknown_choice("stage", stage, STAGES, "stage_overrides")
    return plan
