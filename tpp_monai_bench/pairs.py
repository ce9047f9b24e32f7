"""Paired, interleaved step ratios: what the bench's verdicts rest on.

Every comparison is a pair of workloads (a base A, e.g. full fine-tuning, and a configuration B) at the same batch.
A round times A and B back to back (A,B in even rounds, B,A in odd ones, so neither always runs second), and each
round gives one ratio ``t_B / t_A``. Other load on the machine hits both halves of a pair alike, so the median of the
paired ratios is robust where a ratio of separate medians is not.

The load rule (documented in the README):

* a pair is **quiet** when neither of its two steps saw machine-wide CPU stall (Linux PSI, other processes keeping
  runnable tasks waiting) above :data:`~tpp_monai_bench.timing.QUIET_STALL` of its wall time; without PSI every
  pair counts as quiet and the spread rule alone decides;
* a comparison is **measurable** when at least :data:`MIN_QUIET_PAIRS` pairs are quiet and the relative spread of
  their ratios (interquartile range / median; range / median under 4 pairs) is at most :data:`SPREAD_LIMIT`.

A measurable comparison gets a verdict: its step ratio against its FLOP ratio (``(t_B / t_A) / (F_B / F_A)``,
"within 1.1 of the ideal" at most :data:`IDEAL_LIMIT`), or for a peer pair whether B is no slower than A. Otherwise
the verdict is "not measurable under this load", with the reason.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tpp_monai_bench.timing import (
    PRESSURE,
    Device,
    RoundTimer,
    Sample,
    count_flops,
    median,
    ratio,
    scheduled_rounds,
)
from tpp_monai_bench.workloads import Workload

MIN_QUIET_PAIRS = 3
SPREAD_LIMIT = 0.10
IDEAL_LIMIT = 1.1
CONFIDENCE = 0.90
NOT_MEASURABLE = "not measurable under this load"


def median_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float, float] | None:
    """Distribution-free interval for the median: the order statistics ``x_(k) .. x_(n+1-k)`` with the largest
    ``k`` whose coverage ``1 - 2 P(Binomial(n, 1/2) < k)`` is at least ``confidence`` (min..max when ``n`` is too
    small for it); returns ``(low, high, coverage)``."""
    xs = sorted(values)
    n = len(xs)
    if n == 0:
        return None

    def coverage(k: int) -> float:
        return 1.0 - 2.0 * sum(math.comb(n, i) for i in range(k)) / 2**n

    k = 1
    while k + 1 <= (n + 1) // 2 and coverage(k + 1) >= confidence:
        k += 1
    return xs[k - 1], xs[n - k], coverage(k)


def relative_spread(values: Sequence[float]) -> float | None:
    """Interquartile range / median (4 values or more), range / median (2-3 values); ``None`` under 2."""
    xs = sorted(values)
    if len(xs) < 2 or statistics.median(xs) <= 0:
        return None
    mid = statistics.median(xs)
    if len(xs) < 4:
        return (xs[-1] - xs[0]) / mid
    q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return (q3 - q1) / mid


@dataclass
class Pair:
    """One comparison: ``other`` against ``base`` at ``batch`` (the bundle trains ``other`` at ``bundle_batch``).

    ``kind``: ``"ideal"`` (verdict: step ratio against FLOP ratio) or ``"peer"`` (verdict: ``other`` no slower).
    """

    key: str
    label: str
    base: Workload
    other: Workload
    batch: int
    bundle_batch: int
    kind: str = "ideal"
    a: list[Sample] = field(default_factory=list)
    b: list[Sample] = field(default_factory=list)

    def pair_quiet(self) -> list[bool]:
        return [x.quiet and y.quiet for x, y in zip(self.a, self.b, strict=True)]

    def ratios(self, quiet_only: bool = True) -> list[float]:
        return [y.wall / x.wall for x, y, q in zip(self.a, self.b, self.pair_quiet(), strict=True)
                if (q or not quiet_only) and x.wall > 0]  # fmt: skip

    @property
    def quiet_pairs(self) -> int:
        return sum(self.pair_quiet())

    def summary(self) -> dict:
        quiet = self.ratios()
        spread = relative_spread(quiet)
        step = median(quiet)
        interval = median_interval(quiet)
        flop_ratio = ratio(self.other.flops, self.base.flops)
        vs_ideal = ratio(step, flop_ratio)
        reasons = []
        if len(quiet) < MIN_QUIET_PAIRS:
            reasons.append(f"{len(quiet)} of {len(self.a)} pairs quiet, {MIN_QUIET_PAIRS} needed")
        elif spread is None or spread > SPREAD_LIMIT:
            reasons.append(f"paired ratios spread {spread:.2f} > {SPREAD_LIMIT:g} (IQR / median)")
        measurable = not reasons
        if not measurable:
            verdict = f"{NOT_MEASURABLE} ({'; '.join(reasons)})"
        elif self.kind == "peer":
            verdict = (
                f"no slower than {self.base.label}" if step <= 1.0
                else f"not distinguishable from {self.base.label} (interval includes 1)" if interval[0] <= 1.0
                else f"slower than {self.base.label} (x{step:.2f})"
            )  # fmt: skip
        elif vs_ideal is None:
            verdict = "no FLOP ratio to compare with"
        elif vs_ideal <= IDEAL_LIMIT:
            verdict = f"within {IDEAL_LIMIT:g} of the ideal"
        else:
            verdict = f"{vs_ideal:.2f} x the ideal (beyond {IDEAL_LIMIT:g})"
        return {
            "label": self.label,
            "base": self.base.label,
            "kind": self.kind,
            "batch": self.batch,
            "bundle_batch": self.bundle_batch,
            "pairs": len(self.a),
            "quiet_pairs": len(quiet),
            "step_ratio": step,
            "interval": None if interval is None else [interval[0], interval[1]],
            "interval_coverage": None if interval is None else interval[2],
            "spread": spread,
            "pair_ratios_all": [round(r, 4) for r in self.ratios(quiet_only=False)],
            "base_step_s": median(x.wall for x in self.a),
            "step_s": median(x.wall for x in self.b),
            "base_gflop": None if self.base.flops is None else self.base.flops / 1e9,
            "gflop": None if self.other.flops is None else self.other.flops / 1e9,
            "flop_ratio": flop_ratio,
            "base_trainable": self.base.trainable,
            "trainable": self.other.trainable,
            "vs_ideal": vs_ideal,
            "measurable": measurable,
            "verdict": verdict,
        }


def count_pair_flops(pairs: Sequence[Pair], log: Callable) -> None:
    """FLOPs of one step of every distinct workload (FlopCounterMode on the real step)."""
    for w in {id(w): w for p in pairs for w in (p.base, p.other)}.values():
        if w.flops is None:
            w.prepare()
            w.flops = count_flops(w.step)
            log(f"counted {w.key}: {w.flops / 1e9:.1f} GFLOP")


def run_pairs(
    pairs: Sequence[Pair], device: Device, warmup: int, rounds: int, log: Callable,
    max_rounds: int | None = None, budget_s: float | None = None, wait_s: float = 0.0,
) -> None:  # fmt: skip
    """Warm-up steps of every distinct workload (the first one counting its FLOPs, so counting costs no extra
    step), then ``rounds`` rounds of back-to-back pairs (order alternating by round); then further rounds, for the
    pairs with fewer than :data:`MIN_QUIET_PAIRS` quiet pairs only, up to ``max_rounds`` rounds or ``budget_s``
    seconds of extra rounds. Without warm-up the FLOPs are counted on an extra step (:func:`count_pair_flops`)."""
    timer = RoundTimer(device)
    distinct = list({id(w): w for p in pairs for w in (p.base, p.other)}.values())
    if not warmup:
        count_pair_flops(pairs, log)
    for r in range(warmup):
        t0 = time.perf_counter()
        for w in distinct:
            if w.flops is None:
                w.prepare()
                w.flops = count_flops(w.step)
            else:
                w.run()
        timer.flush()
        log(f"warm-up round {r + 1}/{warmup}: {time.perf_counter() - t0:.1f} s")
    for r, need in scheduled_rounds(pairs, rounds, max_rounds, budget_s, lambda p: p.quiet_pairs < MIN_QUIET_PAIRS):
        t0, waited = time.perf_counter(), 0.0
        for p in need:
            waited += PRESSURE.wait_quiet(wait_s)
            order = [(p.base, p.a), (p.other, p.b)]
            for w, into in order if r % 2 == 0 else order[::-1]:
                timer.time(w.run, into)
            timer.flush()
        log(f"pair round {r + 1}: {len(need)} pairs, {time.perf_counter() - t0:.1f} s (waited {waited:.1f} s for a "
            f"quiet machine); fewest quiet pairs {min(p.quiet_pairs for p in pairs)}")  # fmt: skip
