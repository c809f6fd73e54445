"""How the benchmark times a call, one rule for JAX and the PyTorch peer alike.

Calls run back to back in rounds, with one wait at the end of each round, so the host's dispatch of call
i + 1 overlaps the device's work on call i, as in a training loop, and launch overheads (which differ
between frameworks: a torch.compile'd function checks its guards on every call) are not counted as
kernel time unless the device waits for them. A round holds enough calls to last about ROUND_SECONDS;
the result is the median over rounds of the round's time per call.
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
    for _ in range(warmup):
        wait(call())
    start = time.perf_counter()
    wait(call())
    single = time.perf_counter() - start
    per_round = max(1, min(runs, math.ceil(ROUND_SECONDS / max(single, 1e-9))))
    rounds = max(MIN_ROUNDS, runs // per_round)
    per_call, budget_end = [], time.perf_counter() + TIMED_SECONDS_CAP
    for index in range(rounds):
        start = time.perf_counter()
        for _ in range(per_round - 1):
            call()
        wait(call())
        per_call.append((time.perf_counter() - start) / per_round)
        if index + 1 >= MIN_ROUNDS and time.perf_counter() > budget_end:
            break
    return 1e3 * statistics.median(per_call)
