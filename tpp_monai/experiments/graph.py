"""A plan as a graph of bundle workflow runs: ``pretrain_tpp`` -> ``finetune`` -> ``evaluate``.

One TPP stage per (dataset whose images it sees, method, pretext, seed, variant) is shared by every fine-tuning that
starts from it: the dataset's own ``tpp-<pretext>`` runs and other datasets' ``transfer:<dataset>:<pretext>`` runs.
Every node is one real ``python -m monai.bundle run`` of the bundle ``bundles/<dataset>_<method>``, whose outputs
(``runs_dir``, ``output_dir``, ``ckpt_dir``) all live in the node's folder ``<exp>/runs/<stage>/<run_key>/``.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tpp_monai.bundlegen import workflow_config_files
from tpp_monai.experiments.plan import STAGES, Init, Plan, bundle_dir, has_tpp, hosted, parse_init

RUN_IDS = {"pretrain_tpp": "pretrain_tpp", "finetune": "finetune", "evaluate": "evaluate"}
# what each stage leaves when it finished (checked besides the exit status): the TPP stage's target-parameter folder
# (tpp_monai.peft.files), the fine-tuned model, the test metrics
PRODUCTS = {"pretrain_tpp": "tpp_target", "finetune": "models/model.pt", "evaluate": "metrics.json"}


def product_complete(product: Path) -> bool:
    """A stage's product is complete: its file, or the target folder with its safetensors file written."""
    if product.is_dir():
        return any(not p.name.startswith(".") for p in product.glob("*.safetensors"))
    return product.is_file()


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def digest_of(data: object) -> str:
    """sha256 of the canonical JSON of ``data``."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


@dataclass
class Node:
    """One workflow run."""

    stage: str
    bundle: str
    settings: dict[str, Any]
    overrides: dict[str, Any]  # the plan's bundle overrides for this run (paths of the run folder come on top)
    folder: Path
    deps: list[str] = field(default_factory=list)  # keys of the nodes this run needs
    digest: str = ""

    @property
    def key(self) -> str:
        return f"{self.stage}/{self.folder.name}"

    @property
    def product(self) -> Path:
        return self.folder / PRODUCTS[self.stage]

    @property
    def has_product(self) -> bool:
        """The stage's product is complete (:func:`product_complete`)."""
        return product_complete(self.product)

    @property
    def run_name(self) -> str:
        """The MLflow run name: unique within the experiment."""
        return f"{self.stage}__{self.folder.name}"


@dataclass
class Graph:
    plan: Plan
    exp_dir: Path
    nodes: dict[str, Node]  # in an order where every node comes after its dependencies

    def counts(self) -> dict[str, int]:
        return {stage: sum(n.stage == stage for n in self.nodes.values()) for stage in STAGES}

    def dependents(self, key: str) -> list[str]:
        """Every node that needs ``key``, directly or not."""
        found: list[str] = []
        for other in self.nodes.values():
            if key in other.deps or any(d in found for d in other.deps):
                found.append(other.key)
        return found


def _fraction(value: float) -> str:
    return repr(float(value))


def run_key(settings: dict, stage: str) -> str:
    """A readable folder name from the settings, e.g. ``glas_adapter__tpp-mae__lf1__s0``."""
    parts = [f"{settings['dataset']}_{settings['method'].replace('.', '_')}"]
    if stage == "pretrain_tpp":
        parts.append(settings["pretext"])
    else:
        parts += [settings["init"].replace(":", "-"), f"lf{_fraction(settings['label_fraction'])}"]
    parts.append(f"s{settings['seed']}")
    if settings.get("backbone"):
        parts.append(settings["backbone"])
    if settings.get("variant"):
        parts.append(str(settings["variant"]))
    return "__".join(parts)


def _stage_overrides(plan: Plan, grid: dict, dataset: str, stage: str, method: str, init: Init | None = None) -> dict:
    """The plan's overrides of one stage; a ``peft.*`` method on a host bundle sets ``method``, and a ``peft-*`` init
    sets peft's ``init_lora_weights`` in ``method_options`` (finetune and evaluate build the same network)."""
    merged = {**plan.overrides, **plan.dataset_overrides.get(dataset, {}), **grid["overrides"]}
    merged.update(plan.stage_overrides.get(stage, {}))
    merged.update(grid["stage_overrides"].get(stage, {}))
    if grid["backbone"]:
        merged["backbone"] = grid["backbone"]
    if hosted(dataset, method):
        merged["method"] = method
    if init is not None and init.kind == "peft":
        options = {**dict(merged.get("method_options") or {}), "init_lora_weights": init.pretext}
        if init.pretext == "eva":
            # EVA keeps every layer at rank r (rho 1, no redistribution): evaluate and inference build the network
            # from method_options, and the fine-tuned model.pt must fit those shapes
            options["eva_config"] = {"rho": 1.0, **dict(options.get("eva_config") or {})}
        merged["method_options"] = options
    return merged


def build_graph(plan: Plan, out_dir: str | Path) -> Graph:
    """The nodes of ``plan`` with their folders under ``<out_dir>/<plan name>/runs``; nothing is run or written."""
    exp_dir = Path(out_dir).resolve() / plan.name
    nodes: dict[str, Node] = {}

    def add(node: Node) -> Node:
        node.digest = digest_of({"settings": node.settings, "overrides": node.overrides,
                                 "needs": [nodes[d].digest for d in node.deps]})  # fmt: skip
        if node.key in nodes and nodes[node.key].digest != node.digest:
            from tpp_monai.errors import ConfigError

            raise ConfigError(f"two runs of the plan share the folder {node.key} with different settings or "
                              "overrides; give the sub-grids different 'variant' names")  # fmt: skip
        return nodes.setdefault(node.key, node)

    for grid in plan.subgrids():
        for dataset in grid["datasets"]:
            for method in grid["methods"]:
                for init_text in grid["init"]:
                    init = parse_init(init_text)
                    if init.needs_tpp and not has_tpp(init.source or dataset, method):
                        continue  # the baselines (full fine-tuning, linear probe) have no target parameters
                    for seed in grid["seeds"]:
                        for fraction in grid["label_fractions"]:
                            _add_chain(add, plan, grid, exp_dir, dataset, method, init, float(fraction), seed)
    return Graph(plan, exp_dir, nodes)


def _add_chain(add, plan: Plan, grid: dict, exp_dir: Path, dataset: str, method: str, init: Init,
               fraction: float, seed: int) -> None:  # fmt: skip
    runs = exp_dir / "runs"
    common = {"method": method, "seed": seed, "backbone": grid["backbone"], "variant": grid["variant"]}
    deps = []
    if init.needs_tpp:
        images = init.source or dataset
        tpp_settings = {"dataset": images, "init": f"tpp-{init.pretext}", "pretext": init.pretext, "source": None,
                        "label_fraction": None, **common}  # fmt: skip
        overrides = _stage_overrides(plan, grid, images, "pretrain_tpp", method)
        overrides["pretext"] = init.pretext
        tpp = add(Node("pretrain_tpp", bundle_dir(images, method).name, tpp_settings, overrides,
                       runs / "pretrain_tpp" / run_key(tpp_settings, "pretrain_tpp")))  # fmt: skip
        deps = [tpp.key]
    init_label = init.label if not (init.kind == "transfer" and init.source == dataset) else f"tpp-{init.pretext}"
    settings = {"dataset": dataset, "init": init_label, "pretext": init.pretext,
                "source": init.source if init.kind == "transfer" and init.source != dataset else None,
                "label_fraction": fraction, **common}  # fmt: skip
    bundle = bundle_dir(dataset, method).name
    finetune = add(Node("finetune", bundle, settings, _stage_overrides(plan, grid, dataset, "finetune", method, init),
                        runs / "finetune" / run_key(settings, "finetune"), deps))  # fmt: skip
    add(Node("evaluate", bundle, settings, _stage_overrides(plan, grid, dataset, "evaluate", method, init),
             runs / "evaluate" / run_key(settings, "evaluate"), [finetune.key]))  # fmt: skip


def bundle_overrides(node: Node, graph: Graph, resume: bool = False, tracking: dict | None = None) -> dict:
    """Every override of the node's run: the plan's, then the run folder's paths and the graph's inputs."""
    values = dict(node.overrides)
    if node.stage != "finetune":
        values.pop("tpp_ckpt", None)  # an "upstream" dataset's target-parameter file is for its fine-tuning only
    values.update(runs_dir=str(node.folder), output_dir=str(node.folder), seed=node.settings["seed"])
    if node.stage == "pretrain_tpp":
        values["ckpt_dir"] = str(node.folder / "models")
    elif node.stage == "finetune":
        values["ckpt_dir"] = str(node.folder / "models")
        values["label_fraction"] = node.settings["label_fraction"]
        if node.deps:
            values["tpp_ckpt"] = str(graph.nodes[node.deps[0]].product)
        elif node.settings["init"] != "upstream":
            values["tpp_ckpt"] = "none"
    else:  # evaluate reads the fine-tuned model
        values["ckpt_dir"] = str(graph.nodes[node.deps[0]].folder / "models")
    if resume and node.stage != "evaluate":
        values["resume"] = True
    if tracking:
        values.update(tracking)
    return values


def command(node: Node, graph: Graph, resume: bool = False, tracking: dict | None = None, nproc: int = 1,
            python: str = sys.executable) -> tuple[list[str], dict]:  # fmt: skip
    """The command line of the node's run and the overrides it passes in its args file (``<folder>/args.json``).

    Overrides go through MONAI's ``--args_file`` (a JSON file, so values keep their types; a command-line flag
    would go through fire's literal parsing); several GPUs run it under ``torchrun`` with the bundle's
    ``multi_gpu.json`` overlay.
    """
    folder = bundle_dir(node.settings["dataset"], node.settings["method"])
    configs = folder / "configs"
    overlays = [*graph.plan.overlays, *(["multi_gpu"] if nproc > 1 else [])]
    files = workflow_config_files(folder, node.stage, *overlays)
    launcher = [python, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [python]  # fmt: skip
    argv = [*launcher, "-m", "monai.bundle", "run", RUN_IDS[node.stage], "--config_file", json.dumps(files),
            "--meta_file", str(configs / "metadata.json"), "--logging_file", str(configs / "logging.conf"),
            "--args_file", str(node.folder / "args.json")]  # fmt: skip
    return argv, bundle_overrides(node, graph, resume, tracking)


def describe(graph: Graph, folders: bool = True) -> str:
    """The text of ``experiment plan``: counts per stage, shared TPP stages, folders."""
    plan = graph.plan
    counts = graph.counts()
    lines = [f"experiment {plan.name}: {plan.paper or 'user plan'}", f"  {plan.description}".rstrip(),
             f"  folder: {graph.exp_dir}", "  runs per stage: " + ", ".join(f"{s} {n}" for s, n in counts.items()),
             f"  total runs: {sum(counts.values())}"]  # fmt: skip
    users = {k: sum(k in n.deps for n in graph.nodes.values()) for k, n in graph.nodes.items()
             if n.stage == "pretrain_tpp"}  # fmt: skip
    if users:
        lines.append(f"  each TPP stage is shared by {min(users.values())}-{max(users.values())} fine-tuning runs")
    for stage in STAGES if folders else ():
        names = [n.folder.name for n in graph.nodes.values() if n.stage == stage]
        if names:
            lines.append(f"  {graph.exp_dir / 'runs' / stage}/")
            lines += [f"    {name}" for name in names]
    return "\n".join(lines)
