"""``experiment report``: an experiment folder -> the paper's table layout, the TPP gain with its interval, plots.

Reads ``<exp_dir>/plan.json`` and every ``runs/<stage>/<run_key>/run.json`` (the layout of
``experiments-contract.md``; :mod:`~tpp_monai.report.experiment_folder`). Evaluated runs (status ``done`` with a
readable ``metrics.json``) are grouped by (dataset, method, init, label fraction); each group gives mean ± sample
std over its seeds. Every non-random initialisation is paired with ``random`` on the same (dataset, method, label
fraction, seed) and summarised by :mod:`tpp_monai.experiments.stats` (gain, paired bootstrap 95 % interval, wins, a
verdict in words; :mod:`~tpp_monai.report.gains`). When the plan's ``paper`` field names a transcribed table, the
paper's numbers stand under ours. Runs that are missing, unfinished, failed or unreadable are listed, never fatal.
Text: :mod:`~tpp_monai.report.markdown`; plots: :mod:`~tpp_monai.report.experiment_plots`.

Writes ``<exp_dir>/report/`` (or ``out_dir``): ``report.md``, ``report.json``, ``gain_<method>.png``,
``fractions_<dataset>_<method>.png`` when several label fractions exist, and ``tpp_loss.png`` from the TPP stage's
``history.csv``.
"""

from __future__ import annotations

import json
from pathlib import Path

from tpp_monai.experiments import paper, stats
from tpp_monai.report.experiment_folder import collect, not_started, read_plan
from tpp_monai.report.experiment_plots import PLOT_PATTERNS, plot_convergence, plot_fractions, plot_gains, plot_tpp_loss
from tpp_monai.report.gains import FinetuneRuns, group_runs, group_stats, metric_columns, paired_gains
from tpp_monai.report.markdown import report_markdown


def write_report(exp_dir: str | Path, out_dir: str | Path | None = None) -> dict:
    """Write ``report.md``, ``report.json`` and the plots of an experiment folder; returns what report.json holds
    plus the written paths (``markdown``, ``json``, ``plots``)."""
    import matplotlib

    matplotlib.use("Agg")
    exp_dir = Path(exp_dir)
    plan = read_plan(exp_dir)
    notes = [] if (exp_dir / "plan.json").is_file() else [f"{exp_dir} has no plan.json: no paper table, no run order"]
    out = Path(out_dir) if out_dir is not None else exp_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    for pattern in PLOT_PATTERNS:  # plots of an earlier report whose runs may be gone
        for stale in out.glob(pattern):
            stale.unlink()
    refs = paper.paper_refs(plan.get("paper"))
    tables = paper.load_paper()["tables"]
    notes += [f"{r} is not in the transcription of the paper (paper_results.json)" for r in refs if r not in tables]
    notes += [f"{r}: {tables[r]['note']}" for r in refs if r in tables and tables[r].get("note")]
    if [r for r in refs if r in tables and tables[r]["rows"]]:
        notes.append("paper numbers (rows marked ↳ paper) are shown for label fraction 1.0, as the paper reports them")

    runs, tpp_runs, finetunes, problems = collect(exp_dir)
    unstarted = not_started(plan, exp_dir)
    if unstarted is None:
        notes.append("plan.json lists no graph, so runs that never started are not listed")
    problems += unstarted or []
    columns = metric_columns(runs, plan, notes)
    groups = group_runs(runs)
    records = group_stats(groups, columns, refs)
    finetuned = FinetuneRuns(exp_dir, finetunes)
    gains = paired_gains(groups, columns, plan, finetuned, refs)
    tpp_loss, loss_plot = plot_tpp_loss(tpp_runs, out)
    plots = plot_gains(gains, out) + plot_convergence(gains, finetuned, out) + plot_fractions(records, gains, out)
    plots += [loss_plot] if loss_plot else []

    result = {
        "experiment": plan.get("name", exp_dir.name),
        "paper": plan.get("paper"),
        "paper_tables": refs,
        "notes": notes,
        "exp_dir": str(exp_dir),
        "std": stats.STD_KIND,
        "bootstrap": {
            "method": "percentile, paired over seeds (scipy.stats.bootstrap, paired=True)",
            "n_resamples": stats.BOOTSTRAP_RESAMPLES,
            "rng_seed": stats.BOOTSTRAP_SEED,
            "confidence": stats.CONFIDENCE,
        },
        "gain_definition": "the initialisation's value minus random's on the same seed; random minus the "
        "initialisation's for HD95 (positive = the initialisation did better)",
        "columns": [list(c) for c in columns],
        "groups": records,
        "gain": gains,
        "tpp_loss_curves": tpp_loss,
        "missing": problems,
        "plots": [str(p) for p in plots],
    }
    (out / "report.md").write_text(report_markdown(result, columns, plan))
    (out / "report.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    return {**result, "markdown": str(out / "report.md"), "json": str(out / "report.json")}
