"""The paired comparisons' statistics, load rule and verdicts on synthetic samples, and the A,B / B,A interleaving of
real (toy) steps. No timing is asserted: the samples' times are given, or only their order and count are checked."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from tpp_monai_bench.pairs import (
    IDEAL_LIMIT,
    NOT_MEASURABLE,
    SPREAD_LIMIT,
    Pair,
    median_interval,
    relative_spread,
    run_pairs,
)
from tpp_monai_bench.timing import QUIET_STALL, Device, Sample
from tpp_monai_bench.workloads import Workload


@pytest.mark.parametrize("n", [1, 3, 5, 9, 20])
def test_median_interval_is_the_binomial_order_statistic_interval(n: int) -> None:
    values = list(np.random.default_rng(n).normal(1.0, 0.1, n))
    low, high, coverage = median_interval(values, 0.9)
    xs = sorted(values)
    # independent: the largest k with P(x_(k) <= median <= x_(n+1-k)) = 1 - 2 F_binom(k - 1) >= 0.9, else k = 1
    ks = [k for k in range(1, (n + 1) // 2 + 1) if 1 - 2 * stats.binom.cdf(k - 1, n, 0.5) >= 0.9] or [1]
    k = max(ks)
    assert (low, high) == (xs[k - 1], xs[n - k])
    assert coverage == pytest.approx(1 - 2 * stats.binom.cdf(k - 1, n, 0.5))
    assert median_interval([]) is None


def test_relative_spread() -> None:
    xs = [0.9, 1.0, 1.1, 1.2, 1.5]
    q1, q3 = np.percentile(xs, [25, 75])  # numpy's linear interpolation = statistics' "inclusive" method
    assert relative_spread(xs) == pytest.approx((q3 - q1) / np.median(xs))
    assert relative_spread([1.0, 1.2]) == pytest.approx(0.2 / 1.1)
    assert relative_spread([1.0]) is None


def _workload(key: str, flops: int | None) -> Workload:
    w = Workload(key, f"config {key}", lambda: None, 1)
    w.flops = flops
    return w


def _pair(a_times: list[float], b_times: list[float], stalls: list[float] | None = None, kind: str = "ideal",
          flops: tuple[int, int] = (100, 40)) -> Pair:  # fmt: skip
    stalls = stalls or [0.0] * len(a_times)
    p = Pair("x", "config x", _workload("a", flops[0]), _workload("b", flops[1]), 4, 64, kind=kind)
    p.a = [Sample(t, t, s * t) for t, s in zip(a_times, stalls, strict=True)]
    p.b = [Sample(t, t, s * t) for t, s in zip(b_times, stalls, strict=True)]
    return p


def test_quiet_pairs_give_the_median_paired_ratio_and_a_verdict_against_the_flop_ratio() -> None:
    # the base drifts (load that hits both halves of a pair); the paired ratio stays at 0.42
    a = [1.0, 2.0, 1.5, 3.0, 1.2]
    p = _pair(a, [0.42 * t for t in a])
    s = p.summary()
    assert s["measurable"] and s["quiet_pairs"] == 5
    assert s["step_ratio"] == pytest.approx(0.42)
    assert s["flop_ratio"] == pytest.approx(0.4)
    assert s["vs_ideal"] == pytest.approx(0.42 / 0.4)
    assert IDEAL_LIMIT >= 0.42 / 0.4 and s["verdict"] == f"within {IDEAL_LIMIT:g} of the ideal"
    slow = _pair(a, [0.6 * t for t in a]).summary()
    assert slow["measurable"] and "beyond" in slow["verdict"] and slow["vs_ideal"] == pytest.approx(1.5)


def test_a_loaded_machine_gets_no_verdict() -> None:
    a = [1.0, 1.1, 1.0, 1.05, 1.0]
    stalled = _pair(a, [0.4 * t for t in a], stalls=[2 * QUIET_STALL] * 5).summary()
    assert not stalled["measurable"] and stalled["verdict"].startswith(NOT_MEASURABLE)
    assert stalled["step_ratio"] is None
    # quiet by PSI, but the paired ratios scatter beyond the spread limit
    ratios = [0.3, 0.5, 0.4, 0.7, 0.35]
    scattered = _pair(a, [r * t for r, t in zip(ratios, a, strict=True)]).summary()
    assert relative_spread(ratios) > SPREAD_LIMIT
    assert not scattered["measurable"] and scattered["verdict"].startswith(NOT_MEASURABLE)


def test_peer_verdict() -> None:
    a = [1.0, 1.0, 1.0, 1.0]
    assert _pair(a, [0.98] * 4, kind="peer").summary()["verdict"].startswith("no slower")
    assert _pair(a, [1.05] * 4, kind="peer").summary()["verdict"].startswith("slower")


def test_rounds_alternate_the_order_of_each_pair() -> None:
    order: list[str] = []
    base = Workload("a", "A", lambda: order.append("a"), 1)
    other = Workload("b", "B", lambda: order.append("b"), 1)
    p = Pair("b", "B", base, other, 1, 1)
    run_pairs([p], Device("cpu"), warmup=1, rounds=4, log=lambda msg: None)
    assert order[:2] == ["a", "b"]  # warm-up: every distinct workload once
    timed = order[2:]
    assert timed[:8] == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert len(p.a) == len(p.b) == len(timed) // 2


def test_report_takes_step_ratios_from_measurable_pairs_only() -> None:
    import tpp_monai_bench as bench
    from tpp_monai_bench.report import format_report

    a = [1.0, 1.2, 1.1, 1.0]
    quiet = _pair(a, [0.45 * t for t in a], flops=(100, 42))  # 0.45 / 0.42 = 1.07 x the ideal
    loaded = _pair(a, [0.7 * t for t in a], stalls=[1.0] * 4)
    section = {"rule": {"min_quiet_pairs": 3, "spread_limit": SPREAD_LIMIT, "quiet_stall": QUIET_STALL,
                        "ideal_limit": IDEAL_LIMIT, "interval_confidence": 0.9},
               "max_batch": 4, "pairs": {"tpp_mae_frozen": quiet.summary(), "adapter_ft": loaded.summary()},
               "skipped": {"lora_vs_peft": "peft not importable"}}  # fmt: skip
    result = {"config": {"backbone": "b", "family": "medcoss", "method": "adapter", "image_size": 224,
                         "patch_size": 64, "batch_size": 2, "steps": 4, "warmup": 0, "sections": ["pairs"]},
              "machine": {"cpu": "x", "cores": 2, "device": "cpu", "threads": 2, "torch": "t"},
              "pairs": section, "wall_s": 1.0}  # fmt: skip
    ratios = bench.collect_ratios(result)
    assert ratios["tpp_mae_step_ratio"] == pytest.approx(0.45)
    assert ratios["peft_step_ratio"] is None  # not measurable: no value, no verdict
    result["targets"] = bench.evaluate_targets(ratios, bench.explain(result))
    assert NOT_MEASURABLE in result["targets"]["peft_step_ratio"]["why"]
    text = format_report(result)
    assert "within 1.1 of the ideal" in text and NOT_MEASURABLE in text and "peft not importable" in text
    assert "0.450" in text  # the measurable pair's ratio is printed
    assert "0.700" not in text  # the loaded pair's is not
