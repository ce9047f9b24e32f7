"""The paper's published numbers (``paper_results.json``) and how a run group finds its paper cell.

Each table has ``columns`` ([dataset, metric] pairs) and ``rows`` (paper label, PEFT method, initialisation as in a
plan's ``init`` axis, optional ``variant`` such as ``{"mae_decoder": "freeze"}``, and ``values`` aligned with the
columns; null where the paper has none). Values are percent; HD95 in pixels.
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path

PAPER_RESULTS = Path(__file__).with_name("paper_results.json")


@cache
def load_paper() -> dict:
    """The whole transcription: ``{"paper", "source", "units", "tables": {"Table 3": {...}, ...}}``."""
    return json.loads(PAPER_RESULTS.read_text())


def paper_refs(text: str | None) -> list[str]:
    """Tables and figures a plan's ``paper`` field names: "Tables 3 and 4 (...)" -> ["Table 3", "Table 4"]."""
    refs: list[str] = []
    for kind, numbers in re.findall(r"\b(Tables?|Figures?|Figs?\.)\s*(\d+(?:\s*(?:,|and|&|-|–)\s*\d+)*)", text or ""):
        name = "Table" if kind.startswith("Table") else "Figure"
        for first, last in re.findall(r"(\d+)(?:\s*[-–]\s*(\d+))?", numbers):
            for n in range(int(first), int(last or first) + 1):
                if f"{name} {n}" not in refs:
                    refs.append(f"{name} {n}")
    return refs


def canonical_init(init: str, dataset: str) -> str:
    """``transfer:<dataset>:<pretext>`` on its own dataset is plain TPP (``tpp-<pretext>``); others are unchanged."""
    parts = init.split(":")
    if len(parts) == 3 and parts[0] == "transfer" and parts[1] == dataset:
        return f"tpp-{parts[2]}"
    return init


def paper_cell(
    table_names: list[str], dataset: str, metric: str, method: str, init: str, variant: dict | None = None
) -> dict | None:
    """``{"table", "label", "value"}`` of the first named table with a number for this cell, else None."""
    tables = load_paper()["tables"]
    want = canonical_init(init, dataset)
    for name in table_names:
        table = tables.get(name)
        if not table or [dataset, metric] not in table["columns"]:
            continue
        col = table["columns"].index([dataset, metric])
        for row in table["rows"]:
            row_init = row.get("init_by_dataset", {}).get(dataset, row["init"])
            if (
                row["method"] == method
                and canonical_init(row_init, dataset) == want
                and _variant_matches(row.get("variant", {}), variant or {})
                and row["values"][col] is not None
            ):
                return {"table": name, "label": row["label"], "value": row["values"][col]}
    return None


def _variant_matches(row_variant: dict, variant: dict) -> bool:
    """A row without a variant stands for the paper's default; a row with one needs the run's value of every key."""
    return all(variant.get(k) == v for k, v in row_variant.items())


def variant_keys() -> set[str]:
    """Settings that tell rows of one paper table apart beyond method and initialisation (e.g. ``mae_decoder``)."""
    return {k for t in load_paper()["tables"].values() for r in t["rows"] for k in r.get("variant", {})}


def backbone_kind(name: str | None) -> str | None:
    """What a backbone name has in common with a paper table's ``backbone``: ``medcoss_vit_tiny`` and
    ``medcoss_vit_b16`` are both ``medcoss``, ``path_dino_vit_s16`` is ``path_dino``, ``stunet_b`` is ``stunet``."""
    if not name:
        return None
    return "stunet" if name.startswith("stunet") else name.split("_vit")[0]


def _row_value(table: dict, dataset: str, metric: str, method: str, init: str, variant: dict | None,
               explicit: bool) -> tuple[dict, float] | None:  # fmt: skip
    """The first row of ``table`` for the cell with a number: with ``explicit``, only rows whose own variant the
    run's ``variant`` matches (Table 11's decoder rows); otherwise only rows without a variant (the default)."""
    if [dataset, metric] not in table["columns"]:
        return None
    col = table["columns"].index([dataset, metric])
    want = canonical_init(init, dataset)
    for row in table["rows"]:
        row_init = row.get("init_by_dataset", {}).get(dataset, row["init"])
        if row["method"] != method or canonical_init(row_init, dataset) != want or row["values"][col] is None:
            continue
        row_variant = row.get("variant", {})
        if (bool(row_variant) == explicit) and _variant_matches(row_variant, variant or {}):
            return row, row["values"][col]
    return None


def paper_gain(
    dataset: str, metric: str, method: str, init: str, variant: dict | None = None, higher_is_better: bool = True,
    preferred: list[str] | None = None, backbone: str | None = None,
) -> dict | None:  # fmt: skip
    """The paper's gain of ``init`` over random initialisation for one (dataset, method, metric): the init's row
    minus the random row (random minus init where lower is better, as the report's gains).

    Tables named in ``preferred`` (the plan's) come first, then the others in the paper's order; a table on another
    kind of backbone than ``backbone`` (when given, see :func:`backbone_kind`) is skipped unless preferred. A run
    with a variant (``{"mae_decoder": "freeze"}``) takes the row of that variant where a table has one, else the
    default row. The random row comes from the init row's table, else from the first table with one (Table 11 has
    no random row). None where the paper has no such pair. Returns ``{"value", "table", "random_table",
    "init_label", "random_label", "init_value", "random_value", "backbone", "higher_is_better", "labels"}``; the
    paper's tables are all at full labels."""
    tables = load_paper()["tables"]
    if canonical_init(init, dataset) == "random":
        return None
    preferred = [t for t in (preferred or []) if t in tables]
    kind = backbone_kind(backbone)
    same_kind = [t for t in tables if kind is None or backbone_kind(tables[t].get("backbone")) == kind]
    order = preferred + [t for t in same_kind if t not in preferred]

    def first(names: list[str], cell_init: str, cell_variant: dict | None, explicit: bool) -> tuple | None:
        for name in names:
            hit = _row_value(tables[name], dataset, metric, method, cell_init, cell_variant, explicit)
            if hit is not None:
                return (name, *hit)
        return None

    found = (variant and first(order, init, variant, True)) or first(order, init, variant, False)
    if not found:
        return None
    name, row, value = found
    base = first([name] + [t for t in order if t != name], "random", None, False)
    if base is None:
        return None
    base_name, base_row, base_value = base
    gain = value - base_value if higher_is_better else base_value - value
    return {"value": round(gain, 6), "table": name if base_name == name else f"{name} and {base_name}",
            "random_table": base_name, "init_label": row["label"], "random_label": base_row["label"],
            "init_value": value, "random_value": base_value, "backbone": tables[name].get("backbone"),
            "higher_is_better": higher_is_better, "labels": "full labels"}  # fmt: skip
