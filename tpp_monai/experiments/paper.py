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
