"""The text of an experiment report: ``report.md`` (results in the paper's layout, gains with verdicts, convergence,
plots, the TPP stage's loss, missing runs) and the lines a command prints (:func:`summary_text`)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

from tpp_monai.experiments import convergence, stats
from tpp_monai.report.experiment_folder import fraction_order
from tpp_monai.report.gains import COST_FILE, comparison_name, ordered, row_label
from tpp_monai.report.runs import markdown_table

MAX_LISTED = 40  # report.md lists this many missing runs; report.json lists all


def arm_text(mean: float, std: float | None, n: int) -> str:
    return f"{mean:.2f}" + (f" ± {std:.2f}" if std is not None else "") + f" (n={n})"


def _results_tables(records: list[dict], columns: list[tuple[str, str]], plan: dict) -> list[str]:
    lines = []
    header = ["method", "init", *[f"{d} {stats.metric_name(m)}" for d, m in columns]]
    fractions = sorted({r["label_fraction"] for r in records}, key=fraction_order)
    for fraction in fractions:
        at = [r for r in records if r["label_fraction"] == fraction]
        cells = {(r["method"], r["init"], tuple(r["variant"].items()), r["dataset"], r["metric"]): r for r in at}
        rows_keys = ordered(((r["method"], r["init"], tuple(r["variant"].items())) for r in at), None)
        method_order, init_order = plan.get("methods") or [], plan.get("init") or []
        rows_keys.sort(
            key=lambda k: (
                method_order.index(k[0]) if k[0] in method_order else len(method_order),
                k[0],
                init_order.index(k[1]) if k[1] in init_order else len(init_order),
                k[1],
                k[2],
            )
        )
        rows = []
        for method, init, variant in rows_keys:
            got = [cells.get((method, init, variant, d, m)) for d, m in columns]
            rows.append(
                [
                    method,
                    row_label(init, dict(variant)),
                    *[arm_text(c["mean"], c["std"], c["n"]) if c else "-" for c in got],
                ]
            )
            papers = [c["paper"] if c else None for c in got]
            if any(papers):
                tables = ", ".join(dict.fromkeys(p["table"] for p in papers if p))
                labels = " / ".join(dict.fromkeys(p["label"] for p in papers if p))
                rows.append([f"↳ paper, {tables}", labels, *[f"{p['value']:.2f}" if p else "-" for p in papers]])
        lines += [f"### Label fraction {fraction}", "", markdown_table(header, rows), ""]
    return lines


def _interval_text(g: dict) -> str:
    ci = g["ci95"]
    return f"{g['gain_mean']:+.2f}" + (f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else " (1 seed)")


def _paper_text(g: dict) -> str:
    if g["paper_gain"] is None:
        return "-"
    return f"{g['paper_gain']:+.2f} ({g['paper_gain_source']['table']})"


def cost_text(cost: dict) -> str:
    """``12.3 s, peak 456 MiB (process_max_rss, cpu)``, ``0 s (random)`` or ``not recorded``."""
    if cost["seconds"] is None:
        return "not recorded"
    if not cost["kinds"]:
        return "0 s (random)"
    peak = f", peak {cost['peak_memory_mib']:.0f} MiB" if cost["peak_memory_mib"] is not None else ""
    where = ", ".join(str(x) for x in [*cost["memory_kind"], *cost["device"]] if x)
    part = f", {cost['recorded']}/{cost['runs']} seeds recorded" if cost["recorded"] < cost["runs"] else ""
    return f"{cost['seconds']:.1f} s{peak} ({where}{part})"


def _gain_section(gains: list[dict]) -> list[str]:
    lines = [
        "## Gain of each initialisation over random (paired over seeds)",
        "",
        f"Gain per seed = the initialisation's value minus random's on the same seed (random minus the "
        f"initialisation's for HD95), so positive means the initialisation did better. 95 % interval: paired "
        f"bootstrap over seeds, {stats.BOOTSTRAP_RESAMPLES} resamples, percentile method, RNG seed "
        f"{stats.BOOTSTRAP_SEED} (scipy.stats.bootstrap); with few seeds it cannot extend beyond the observed "
        f"per-seed gains. Paper's gain: the paper's row with the initialisation minus its row without (all at full "
        f"labels). Detectable effect: {stats.DETECTABLE_EFFECT}. Seeds needed: the smallest n whose detectable "
        f"effect at the observed spread is at most the paper's gain. Cost: the initialisation's wall seconds and "
        f"peak memory (mean over seeds) from `{COST_FILE}` in the run folder that paid it.",
        "",
        "Verdict cases: " + "; ".join(f"`{k}`: {v}" for k, v in stats.VERDICT_CASES.items()) + ".",
        "",
    ]
    if not gains:
        return [*lines, "No pair of runs of a non-random initialisation and random on the same seed yet.", ""]
    header = ["dataset", "method", "init", "label fraction", "metric", "random", "init value", "gain [95 % CI]",
              "paper's gain", "detectable effect", "seeds needed", "verdict", "init cost"]  # fmt: skip
    rows = [
        [g["dataset"], g["method"], row_label(g["init"], g["variant"]), str(g["label_fraction"]),
         stats.metric_name(g["metric"]), arm_text(g["mean_random"], g["std_random"], g["n_seeds"]),
         arm_text(g["mean_tpp"], g["std_tpp"], g["n_seeds"]), _interval_text(g), _paper_text(g),
         "-" if g["detectable_effect"] is None else f"{g['detectable_effect']:.2f}",
         "-" if g["seeds_needed"] is None else str(g["seeds_needed"]), g["verdict"]["case"],
         cost_text(g["cost"][g["init"]])]
        for g in gains
    ]  # fmt: skip
    lines += [markdown_table(header, rows), "", "Verdicts:", ""]
    lines += [f"- {comparison_name(g)}, {stats.metric_name(g['metric'])}: {g['verdict']['text']}" for g in gains]
    return [*lines, ""]


def _convergence_section(gains: list[dict]) -> list[str]:
    lines = ["## Convergence: iterations to the target", ""]
    lines += [f"Target: {100 * convergence.TARGET_SHARE:g} % of the random arm's mean best validation value (the "
              "mean best divided by the share for a distance), read from each fine-tuning run's `history.csv`; "
              "iterations (and `elapsed_s` seconds) at the first validation at or beyond it, null where a run never "
              "got there (never dropped). Ratio: geometric mean over the seeds where both arms reached it of "
              "init / random iterations, with a percentile bootstrap 95 % interval; below 1 the initialisation got "
              "there sooner. Where validation computes only the model-selection metric, that column is used.",
              ""]  # fmt: skip
    shown = {}
    for g in gains:  # metrics validated on the same column share one convergence entry
        conv = g["convergence"]
        key = (comparison_name(g), conv["metric"] if conv else g["metric"])
        shown.setdefault(key, g)
    if not shown:
        return [*lines, "No comparison yet.", ""]
    rows = []
    for (where, column), g in shown.items():
        conv = g["convergence"]
        if conv is None:
            rows.append([where, column, "-", "no fine-tuning history.csv", "", "", "", "", ""])
            continue
        s = conv["summary"]
        ci = conv["ratio_ci"]
        ratio = "-" if conv["ratio"] is None else f"{conv['ratio']:.2f}"
        ratio += f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci and conv["ratio"] is not None else ""
        arms = [convergence.mean_text(s[a]["iterations"]) for a in ("random", g["init"])]
        secs = [convergence.mean_text(s[a]["seconds"], " s", 1) if conv["seconds_recorded"] else "-"
                for a in ("random", g["init"])]  # fmt: skip
        rows.append([where, convergence.column_name(column), f"{conv['target']:.2f}", *arms, ratio, *secs,
                     ", ".join(map(str, conv["missing_history"])) or "-"])  # fmt: skip
    header = ["comparison", "validation metric", "target", "iterations, random", "iterations, init",
              "ratio init/random [95 % CI]", "seconds, random", "seconds, init", "seeds without history"]  # fmt: skip
    return [*lines, markdown_table(header, rows), ""]


def report_markdown(result: dict, columns: list[tuple[str, str]], plan: dict) -> str:
    lines = [f"# Experiment `{result['experiment']}`", ""]
    if result["paper"]:
        lines += [f"Reproduces: {result['paper']}.", ""]
    lines += [f"Test-set metrics in percent (HD95 in pixels): mean ± {stats.STD_KIND}, n = number of seeds.", ""]
    for note in result["notes"]:
        lines += [f"- {note}"]
    lines += ["", "## Results (the paper's layout: rows = method x initialisation, columns = dataset x metric)", ""]
    if result["groups"]:
        lines += _results_tables(result["groups"], columns, plan)
    else:
        lines += ["No evaluated run yet.", ""]
    lines += _gain_section(result["gain"])
    lines += _convergence_section(result["gain"])
    plots = result["plots"]
    for title, prefix in (("Gain plots", "gain_"), ("Convergence plots", "convergence_"),
                          ("Label-fraction curves", "fractions_")):  # fmt: skip
        mine = [p for p in plots if Path(p).name.startswith(prefix)]
        if mine:
            lines += [f"## {title}", ""] + [f"![{Path(p).stem}]({quote(Path(p).name)})" for p in mine] + [""]
    lines += ["## TPP stage: pretext loss", ""]
    if result["tpp_loss_curves"]:
        rows = [
            [
                c["run_key"],
                str(c["epochs"]),
                f"{c['first']:.4f}",
                f"{c['last']:.4f}",
                f"{c['min']:.4f}",
                "falls" if c["falls"] else "does not fall",
            ]
            for c in result["tpp_loss_curves"]
        ]
        lines += [
            markdown_table(["TPP run", "epochs", "first", "last", "min", "last vs first"], rows),
            "",
            "![tpp_loss](tpp_loss.png)",
            "",
        ]
    else:
        lines += ["No TPP stage history.csv found.", ""]
    lines += ["## Missing, unfinished or failed runs", ""]
    if result["missing"]:
        shown = result["missing"][:MAX_LISTED]
        lines += [
            f"- {p['stage']} `{p['run_key']}`: {p['status']}: {p['reason']}"
            + (f" (log: {p['log']})" if p["log"] else "")
            for p in shown
        ]
        if len(result["missing"]) > len(shown):
            lines.append(f"- ... and {len(result['missing']) - len(shown)} more (report.json lists every one)")
    else:
        lines += ["None: every run of the plan finished."]
    return "\n".join(lines) + "\n"


def summary_text(result: dict) -> str:
    """The lines a command prints after :func:`write_report`: per metric each arm's mean ± std, the gain's verdict
    (with the paper's gain) and the iterations to the convergence target with their ratio."""
    lines, described = [], set()
    for g in result["gain"]:
        where = f"{g['dataset']} {g['method']} (label fraction {g['label_fraction']})"
        random_arm = arm_text(g["mean_random"], g["std_random"], g["n_seeds"])
        init_arm = arm_text(g["mean_tpp"], g["std_tpp"], g["n_seeds"])
        arms = f"random {random_arm}, {row_label(g['init'], g['variant'])} {init_arm}"
        lines.append(f"{where} {stats.metric_name(g['metric'])}: {arms}\n    {g['verdict']['text']}")
        conv = g.get("convergence")
        if conv is None:
            lines.append("    convergence: no fine-tuning history.csv in both arms")
        elif (where, row_label(g["init"], g["variant"]), conv["metric"]) in described:
            lines.append(f"    convergence: measured on validation {convergence.column_name(conv['metric'])}, as above")
        else:
            described.add((where, row_label(g["init"], g["variant"]), conv["metric"]))
            lines.append(f"    convergence: {convergence.describe(conv, g['init'])}")
    if not lines:
        lines.append("no pair of TPP and random runs on the same seed yet")
    if result["missing"]:
        lines.append(f"{len(result['missing'])} run(s) missing, unfinished or failed: see {result['markdown']}")
    lines.append(f"report: {result['markdown']}")
    return "\n".join(lines)
