"""Statistics of an experiment over seeds: mean ± sample std, and the TPP gain with a paired bootstrap interval.

The gain of one seed is TPP minus random initialisation on that seed (same dataset, method, label fraction), with
the sign flipped for metrics where lower is better (HD95), so a positive gain always means TPP did better. Its 95 %
confidence interval is the percentile interval of a paired bootstrap: the seed pairs are resampled with replacement
(``scipy.stats.bootstrap(paired=True, method="percentile")``), ``BOOTSTRAP_RESAMPLES`` times, from
``numpy.random.default_rng(BOOTSTRAP_SEED)``. SciPy draws the resampled indices as
``rng.integers(0, n, size=(BOOTSTRAP_RESAMPLES, n))`` and takes the linear-interpolated quantiles, so the interval is
reproducible from these two constants alone.

With few seeds the percentile interval cannot reach beyond the observed per-seed gains (with 2 or 3 seeds it is
their range), so it understates the uncertainty. Each gain therefore also gets the smallest effect the design could
detect (:func:`detectable_effect`, a paired t-test's minimum detectable effect), the number of seeds that would
detect the paper's gain at the observed spread (:func:`seeds_needed`), and a verdict that tells a negligible gain
from one of the paper's order (:func:`verdict`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import bootstrap
from scipy.stats import t as student_t

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95
MIN_SEEDS_FOR_INTERVAL = 2
STD_KIND = "sample standard deviation over seeds (ddof=1)"
POWER = 0.80  # of the detectable effect
ALPHA = 0.05  # two-sided
NEGLIGIBLE_SHARE = 0.1  # a gain under this share of the paper's is negligible
FEW_SEEDS = 5  # below this the interval is (nearly) the seeds' range, and the verdict says so
MAX_SEEDS_NEEDED = 10_000
DETECTABLE_EFFECT = (f"MDE = (t_(1-alpha/2, n-1) + t_(power, n-1)) * s_d / sqrt(n): the smallest mean gain a paired "
                     f"t-test over n seeds detects with power {POWER:g} at two-sided alpha {ALPHA:g}, s_d the sample "
                     "standard deviation (ddof=1) of the per-seed gains")  # fmt: skip
VERDICT_CASES = {
    "too_few_seeds": "one seed: no interval, no verdict",
    "no_effect": "the 95 % interval contains 0",
    "negligible": "the interval excludes 0, but the gain is under a tenth of the paper's gain or under the smallest "
    "effect the seeds can detect",
    "paper_order": "the interval excludes 0 and the gain has the paper's sign, is at least a tenth of the paper's "
    "gain and at least the detectable effect",
    "better": "the interval excludes 0 above it and the gain is at least the detectable effect, but the paper has no "
    "gain for this cell (or one of the other sign)",
    "worse": "the interval excludes 0 below it and the loss is at least the detectable effect, but the paper has no "
    "gain for this cell (or one of the other sign)",
}


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


def _mde_factor(n: int, power: float = POWER, alpha: float = ALPHA) -> float:
    """(t_{1-alpha/2, n-1} + t_{power, n-1}) / sqrt(n): the detectable effect in units of the per-seed spread."""
    return float((student_t.ppf(1 - alpha / 2, n - 1) + student_t.ppf(power, n - 1)) / np.sqrt(n))


def detectable_effect(gains: Sequence[float], power: float = POWER, alpha: float = ALPHA) -> float | None:
    """The smallest mean gain a paired design of these seeds detects with ``power`` at two-sided level ``alpha``:

        MDE = (t_{1-alpha/2, n-1} + t_{power, n-1}) * s_d / sqrt(n)

    with n the number of seed pairs and s_d the sample standard deviation (ddof=1) of their per-seed gains (the
    usual normal-approximation power formula with t quantiles). With 3 seeds MDE = 3.1 s_d, with 5 seeds 1.7 s_d.
    None below 2 seeds; 0 when every seed gained the same."""
    arr = np.asarray(gains, dtype=float)
    if arr.size < 2:
        return None
    return _mde_factor(arr.size, power, alpha) * float(arr.std(ddof=1))


def seeds_needed(effect: float | None, spread: float | None, power: float = POWER, alpha: float = ALPHA
                 ) -> int | None:  # fmt: skip
    """The smallest number of seeds n >= 2 whose detectable effect (:func:`detectable_effect` with per-seed
    spread ``spread``) is at most ``|effect|``; None without an effect or spread, for a zero effect, or beyond
    :data:`MAX_SEEDS_NEEDED`."""
    if effect is None or spread is None or effect == 0:
        return None
    n = 2
    while _mde_factor(n, power, alpha) * spread > abs(effect):
        n += 1
        if n > MAX_SEEDS_NEEDED:
            return None
    return n


def ratio_summary(
    numerator: Sequence[float], denominator: Sequence[float], n_resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED, confidence: float = CONFIDENCE,
) -> tuple[float, list[float] | None]:  # fmt: skip
    """Geometric mean of the per-seed ratios ``numerator / denominator`` and its percentile bootstrap interval
    (the mean log ratio over seeds resampled with replacement, the same constants as the gain's); the interval is
    None below 2 seeds."""
    logs = np.log(np.asarray(numerator, dtype=float)) - np.log(np.asarray(denominator, dtype=float))
    if logs.size == 0:
        raise ValueError("ratio_summary needs at least one pair")
    ratio = float(np.exp(logs.mean()))
    if logs.size < MIN_SEEDS_FOR_INTERVAL:
        return ratio, None
    if np.allclose(logs, logs[0]):
        return ratio, [ratio, ratio]
    result = bootstrap((logs,), np.mean, n_resamples=n_resamples, confidence_level=confidence, method="percentile",
                       rng=np.random.default_rng(seed))  # fmt: skip
    low, high = result.confidence_interval
    return ratio, [float(np.exp(low)), float(np.exp(high))]


@dataclass
class GainSummary:
    """The gain of one non-random initialisation (``tpp``: its values; the name is historical, any init arm) over
    ``random`` for one (dataset, method, label fraction, metric), over its paired seeds, with the paper's gain
    for the same cell (``paper_gain``, None where the paper has none), the design's detectable effect, the seeds
    that would detect the paper's gain, and the verdict ``{"case", "text"}`` (cases: :data:`VERDICT_CASES`)."""

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
    paper_gain: float | None
    paper_gain_source: dict | None
    detectable_effect: float | None
    seeds_needed: int | None
    verdict: dict

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


def _gain_text(metric: str, value: float, higher_is_better: bool) -> str:
    unit = f"{metric_name(metric)} points" if higher_is_better else f"px {metric_name(metric)}"
    return f"{value:+.2f} {unit}"


def verdict(
    metric: str,
    gain_mean: float,
    ci95: tuple[float, float] | None,
    n_seeds: int,
    wins: int,
    higher_is_better: bool = True,
    gains: Sequence[float] | None = None,
    arm: str = "TPP",
    paper_gain: float | None = None,
    paper_where: str = "",
    detectable: float | None = None,
    needed: int | None = None,
) -> dict:
    """``{"case", "text"}``: the gain with its interval and wins, the paper's gain beside it, and which case of
    :data:`VERDICT_CASES` holds. A gain whose interval excludes 0 is negligible when it is under a tenth of the
    paper's gain (in size) or under the detectable effect; of the paper's order when it has the paper's sign and
    neither; ``better``/``worse`` when it is not negligible and the paper gives no gain of its sign. With fewer
    than :data:`FEW_SEEDS` seeds the text says that the interval is (nearly) the seeds' range and how many seeds
    would detect the paper's gain at this spread (``needed``)."""
    lower = "" if higher_is_better else f" (random minus {arm}: lower is better)"
    head = f"{arm} gain {_gain_text(metric, gain_mean, higher_is_better)}{lower}"
    seeds = f"over {n_seeds} seed{'s' if n_seeds != 1 else ''} ({wins}/{n_seeds} wins)"
    paper = (f"paper {paper_gain:+.2f}{f' ({paper_where})' if paper_where else ''}" if paper_gain is not None
             else "the paper has no gain for this cell")  # fmt: skip
    if ci95 is None:
        return {"case": "too_few_seeds", "text": f"{head} {seeds}; {paper}: too few seeds for an interval"}
    low, high = ci95
    interval = f"[95 % CI {low:+.2f}, {high:+.2f}]"
    mde = f"±{detectable:.2f}" if detectable is not None else "unknown"
    size = abs(gain_mean)
    if low <= 0.0 <= high:
        case, words = "no_effect", "no effect distinguishable from zero: the interval contains 0"
    else:
        small = []
        if paper_gain is not None and paper_gain != 0 and size < NEGLIGIBLE_SHARE * abs(paper_gain):
            small.append("a tenth of the paper's gain")
        if detectable is not None and size < detectable:
            small.append(f"the smallest effect these seeds can detect ({mde})")
        same_sign = paper_gain is not None and paper_gain * gain_mean > 0
        if small:
            case = "negligible"
            words = f"negligible: the interval excludes 0, but the gain is under {' and under '.join(small)}"
        elif same_sign:
            case = "paper_order"
            kind = "gain" if gain_mean > 0 else "loss"
            words = (f"a {kind} of the paper's order: the interval excludes 0, and the {kind} is at least a tenth of "
                     f"the paper's and at least the detectable effect ({mde})")  # fmt: skip
        else:
            case = "better" if low > 0 else "worse"
            why = "the paper has no gain for this cell" if paper_gain is None else "the paper's gain has the other sign"
            words = (f"{arm} {case}: the interval excludes 0 and the {'gain' if low > 0 else 'loss'} is at least the "
                     f"detectable effect ({mde}); {why}")  # fmt: skip
    if n_seeds < FEW_SEEDS:
        exact = gains is not None and n_seeds <= 3 and np.allclose(ci95, (min(gains), max(gains)))
        words += f"; with {n_seeds} seeds the interval is {'just' if exact else 'nearly'} the seeds' range"
        if paper_gain is not None:
            words += (f", and {needed} seeds would detect the paper's gain at this spread (80 % power, alpha 0.05)"
                      if needed is not None else f", and more than {MAX_SEEDS_NEEDED} seeds would be needed to detect "
                      "the paper's gain at this spread")  # fmt: skip
    return {"case": case, "text": f"{head} {interval} {seeds}; {paper}: {words}"}


def _paper_where(source: dict | None) -> str:
    """Where the paper's gain comes from, in a few words (``Table 4: Adapter w/ TPP 93.04 - Adapter 92.61, full
    labels``)."""
    if not source:
        return ""
    if source.get("init_label") is None or source.get("init_value") is None:
        return ", ".join(str(source[k]) for k in ("table", "labels") if source.get(k))
    first = (source["init_label"], source["init_value"]), (source["random_label"], source["random_value"])
    if source.get("higher_is_better") is False:
        first = first[::-1]
    (a, va), (b, vb) = first
    labels = f", {source['labels']}" if source.get("labels") else ""
    return f"{source['table']}: {a} {va:.2f} - {b} {vb:.2f}{labels}"


def summarise_gain(
    metric: str,
    seeds: Sequence,
    tpp: Sequence[float],
    random: Sequence[float],
    higher_is_better: bool = True,
    arm: str = "TPP",
    paper_gain: float | None = None,
    paper_gain_source: dict | None = None,
) -> GainSummary:
    """Everything the report says about one paired comparison (values in seed order); ``tpp`` holds the values of
    the non-random arm ``arm``; ``paper_gain`` (with its ``paper_gain_source``) is the paper's for the same cell."""
    gains = paired_gains(tpp, random, higher_is_better)
    if gains.size == 0:
        raise ValueError(f"{metric}: no seed has both a TPP and a random run")
    ci = paired_bootstrap_ci(tpp, random, higher_is_better)
    mean_r, std_r = mean_std(random)
    mean_t, std_t = mean_std(tpp)
    gain_mean = float(gains.mean())
    wins, ties = int((gains > 0).sum()), int((gains == 0).sum())
    detectable = detectable_effect(gains)
    spread = float(gains.std(ddof=1)) if gains.size > 1 else None
    needed = seeds_needed(paper_gain, spread)
    text = verdict(metric, gain_mean, ci, int(gains.size), wins, higher_is_better, gains.tolist(), arm, paper_gain,
                   _paper_where(paper_gain_source), detectable, needed)  # fmt: skip
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
        paper_gain=paper_gain,
        paper_gain_source=paper_gain_source,
        detectable_effect=detectable,
        seeds_needed=needed,
        verdict=text,
    )
