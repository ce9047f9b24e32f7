"""Statistics of an experiment over seeds: mean ± sample std, and the TPP gain with a paired bootstrap interval.

The gain of one seed is TPP minus random initialisation on that seed (same dataset, method, label fraction), with
the sign flipped for metrics where lower is better (HD95), so a positive gain always means TPP did better. Its 95 %
confidence interval is the percentile interval of a paired bootstrap: the seed pairs are resampled with replacement
(``scipy.stats.bootstrap(paired=True, method="percentile")``), ``BOOTSTRAP_RESAMPLES`` times, from
``numpy.random.default_rng(BOOTSTRAP_SEED)``. SciPy draws the resampled indices as
``rng.integers(0, n, size=(BOOTSTRAP_RESAMPLES, n))`` and takes the linear-interpolated quantiles, so the interval is
reproducible from these two constants alone.

With few seeds the percentile interval cannot reach beyond the observed per-seed gains (with 2 or 3 seeds it is
their range), so it understates the uncertainty: :func:`verdict` gives no interval for a single seed and says so
when the interval is just the range of 2-3 per-seed gains.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import bootstrap

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95
MIN_SEEDS_FOR_INTERVAL = 2
STD_KIND = "sample standard deviation over seeds (ddof=1)"


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof=1); the std is None for a single value."""
    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        raise ValueError("mean_std needs at least one value")
    return float(arr.mean()), (float(arr.std(ddof=1)) if arr.size > 1 else None)


def paired_gains(tpp: Sequence[float], random: Sequence[float], higher_is_better: bool = True) -> np.ndarray:
    """Per-seed gains (TPP minus random; random minus TPP when lower is better): positive = TPP better."""
    t, r = np.asarray(tpp, dtype=float), np.asarray(random, dtype=float)
    if t.shape != r.shape:
        raise ValueError(f"paired values need equal lengths, got {t.size} TPP and {r.size} random")
    return t - r if higher_is_better else r - t


def paired_bootstrap_ci(
    tpp: Sequence[float],
    random: Sequence[float],
    higher_is_better: bool = True,
    n_resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    confidence: float = CONFIDENCE,
) -> tuple[float, float] | None:
    """Percentile interval of the mean gain over seed pairs resampled with replacement; None below 2 pairs."""
    t, r = np.asarray(tpp, dtype=float), np.asarray(random, dtype=float)
    paired_gains(t, r)  # validates the lengths
    if t.size < MIN_SEEDS_FOR_INTERVAL:
        return None
    sign = 1.0 if higher_is_better else -1.0

    def mean_gain(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
        return sign * np.mean(a - b, axis=axis)

    result = bootstrap(
        (t, r),
        mean_gain,
        paired=True,
        vectorized=True,
        n_resamples=n_resamples,
        confidence_level=confidence,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    low, high = result.confidence_interval
    return float(low), float(high)


@dataclass
class GainSummary:
    """The TPP gain of one (dataset, method, label fraction, TPP initialisation, metric) over its paired seeds."""

    metric: str
    higher_is_better: bool
    seeds: list
    random: list[float]
    tpp: list[float]
    seed_gains: list[float]
    mean_random: float
    std_random: float | None
    mean_tpp: float
    std_tpp: float | None
    gain_mean: float
    ci95: tuple[float, float] | None
    n_seeds: int
    wins: int
    ties: int
    verdict: str

    def as_dict(self) -> dict:
        out = asdict(self)
        out["ci95"] = list(self.ci95) if self.ci95 is not None else None
        return out


METRIC_NAMES = {
    "acc": "ACC",
    "auc": "AUC",
    "f1": "F1",
    "dice": "Dice",
    "hd95": "HD95",
    "ratio": "Ratio",
    "mean_dice": "mean Dice",
    "organ_dice": "organ Dice",
    "tumour_dice": "tumour Dice",
}


def metric_name(metric: str) -> str:
    return METRIC_NAMES.get(metric, metric)


def verdict(
    metric: str,
    gain_mean: float,
    ci95: tuple[float, float] | None,
    n_seeds: int,
    wins: int,
    higher_is_better: bool = True,
    gains: Sequence[float] | None = None,
) -> str:
    """One sentence: the gain, its interval, the seeds and wins, and whether it is distinguishable from zero (and,
    given the per-seed ``gains``, when the interval is no more than their range)."""
    if higher_is_better:
        head = f"TPP gain {gain_mean:+.2f} {metric_name(metric)} points"
    else:  # a distance: the gain is random minus TPP
        head = f"TPP gain {gain_mean:+.2f} px {metric_name(metric)} (random minus TPP: lower is better)"
    seeds = f"over {n_seeds} seed{'s' if n_seeds != 1 else ''} ({wins}/{n_seeds} wins)"
    if ci95 is None:
        return f"{head} {seeds}: too few seeds for an interval"
    low, high = ci95
    interval = f"[95 % CI {low:+.2f}, {high:+.2f}]"
    if low <= 0.0 <= high:
        words = "not distinguishable from zero: the interval contains 0"
    elif low > 0:
        words = "TPP better: the interval excludes 0"
    else:
        words = "TPP worse: the interval excludes 0"
    if gains is not None and n_seeds <= 3 and np.allclose(ci95, (min(gains), max(gains))):
        words += f"; with {n_seeds} seeds the interval is just the range of the per-seed gains"
    return f"{head} {interval} {seeds}: {words}"


def summarise_gain(
    metric: str, seeds: Sequence, tpp: Sequence[float], random: Sequence[float], higher_is_better: bool = True
) -> GainSummary:
    """Everything the report says about one paired comparison (values in seed order)."""
    gains = paired_gains(tpp, random, higher_is_better)
    if gains.size == 0:
        raise ValueError(f"{metric}: no seed has both a TPP and a random run")
    ci = paired_bootstrap_ci(tpp, random, higher_is_better)
    mean_r, std_r = mean_std(random)
    mean_t, std_t = mean_std(tpp)
    gain_mean = float(gains.mean())
    wins, ties = int((gains > 0).sum()), int((gains == 0).sum())
    return GainSummary(
        metric=metric,
        higher_is_better=higher_is_better,
        seeds=list(seeds),
        random=[float(v) for v in random],
        tpp=[float(v) for v in tpp],
        seed_gains=[float(g) for g in gains],
        mean_random=mean_r,
        std_random=std_r,
        mean_tpp=mean_t,
        std_tpp=std_t,
        gain_mean=gain_mean,
        ci95=ci,
        n_seeds=int(gains.size),
        wins=wins,
        ties=ties,
        verdict=verdict(metric, gain_mean, ci, int(gains.size), wins, higher_is_better, gains.tolist()),
    )
