"""How the benchmark times a call, one rule for JAX and the PyTorch peer alike.

Calls run back to back in rounds, with one wait at the end of each round, so the host's dispatch of call
i + 1 overlaps the device's work on call i, as in a training loop, and launch overheads (which differ
between frameworks: a torch.compile'd function checks its guards on every call) are not counted as
kernel time unless the device waits for them. A round holds enough calls to last about ROUND_SECONDS;
the result is the median over rounds of the round's time per call.

To compare implementations within one process, `interleaved_ms` times them in alternating rounds, so that a
drift in the device's speed during the run falls on all of them alike, and `ratio_interval` gives the median
of their round-by-round time ratios with a distribution-free confidence interval.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable

ROUND_SECONDS = 0.025
# Long cases stop after this much timed time (at least MIN_ROUNDS rounds), so 128k fits in a session.
TIMED_SECONDS_CAP = 4.0
MIN_ROUNDS = 5


def median_ms(call: Callable[[], object], wait: Callable[[object], None], runs: int, warmup: int) -> float:
    """Median milliseconds per call over rounds of back-to-back calls; at most `runs` timed calls (or
    MIN_ROUNDS rounds of one call, whichever is more), after `warmup` calls each waited for."""
    per_round = min(runs, _round_size(call, wait, warmup))
    per_call, budget_end = [], time.perf_counter() + TIMED_SECONDS_CAP
    for index in range(max(MIN_ROUNDS, runs // per_round)):
        per_call.append(_round_ms(call, wait, per_round))
        if index + 1 >= MIN_ROUNDS and time.perf_counter() > budget_end:
            break
    return statistics.median(per_call)


def interleaved_ms(calls: dict[str, Callable[[], object]], wait: Callable[[object], None], rounds: int,
                   warmup: int) -> dict[str, list[float]]:
    """Milliseconds per call of every function in `calls`, one value per round, their rounds interleaved: round
    r of each (in order) before round r + 1 of any. A function's rounds are sized as `median_ms` sizes them;
    `rounds` rounds (at least MIN_ROUNDS), fewer once TIMED_SECONDS_CAP per function has passed."""
    per_round = {name: _round_size(call, wait, warmup) for name, call in calls.items()}
    samples = {name: [] for name in calls}
    budget_end = time.perf_counter() + TIMED_SECONDS_CAP * len(calls)
    for index in range(max(MIN_ROUNDS, rounds)):
        for name, call in calls.items():
            samples[name].append(_round_ms(call, wait, per_round[name]))
        if index + 1 >= MIN_ROUNDS and time.perf_counter() > budget_end:
            break
    return samples


def _round_size(call: Callable[[], object], wait: Callable[[object], None], warmup: int) -> int:
    """Calls per round: enough to last ROUND_SECONDS by one waited call, timed after `warmup` waited calls."""
    for _ in range(warmup):
        wait(call())
    start = time.perf_counter()
    wait(call())
    return max(1, math.ceil(ROUND_SECONDS / max(time.perf_counter() - start, 1e-9)))


def _round_ms(call: Callable[[], object], wait: Callable[[object], None], calls: int) -> float:
    """Milliseconds per call of `calls` back-to-back calls with one wait at the end."""
    start = time.perf_counter()
    for _ in range(calls - 1):
        call()
    wait(call())
    return 1e3 * (time.perf_counter() - start) / calls


def ratio_interval(numerator: list[float], denominator: list[float], confidence: float = 0.95
                   ) -> tuple[float, float, float]:
    """(median, low, high) of the round-by-round ratios numerator[r] / denominator[r] (`interleaved_ms`
    samples of two functions): the interval is the order-statistic confidence interval of the median, exact
    for any distribution of independent ratios (the sign test's: the j-th smallest and j-th largest ratio,
    with j the largest count such that a Binomial(n, 1/2) falls below j with probability at most
    (1 - confidence) / 2). With fewer than 6 rounds no such j exists at 95 %; the interval is then the
    smallest and largest ratio, whose coverage is lower."""
    if len(numerator) != len(denominator) or not numerator:
        raise ValueError(f"ratio_interval needs two equally long, non-empty sample lists; got {len(numerator)} "
                         f"and {len(denominator)}")
    ratios = sorted(a / b for a, b in zip(numerator, denominator))
    n, tail = len(ratios), (1 - confidence) / 2
    below, j = 0.0, 0
    while j < n and below + math.comb(n, j) / 2 ** n <= tail:
        below += math.comb(n, j) / 2 ** n
        j += 1
    j = max(j, 1)
    return statistics.median(ratios), ratios[j - 1], ratios[n - j]
