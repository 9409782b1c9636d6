"""Riding out a service restart: one helper for every adapter that repeats a call.

A call is repeated only when the service did nothing with it (the adapter says which errors
mean that), with capped exponential backoff and full jitter, so workers that lost the same
service at the same moment do not all come back at the same instant.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

R = TypeVar("R")


def ride_out(
    call: Callable[[], R],
    seconds: float,
    repeatable: Callable[[BaseException], bool],
    *,
    first_pause_s: float = 0.05,
    max_pause_s: float = 1.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> R:
    """`call()`, repeated while it raises an error that `repeatable` accepts and `seconds`
    have not passed; the last error is raised as it was."""
    give_up = clock() + seconds
    ceiling = first_pause_s
    while True:
        try:
            return call()
        except Exception as exc:
            left = give_up - clock()
            if left <= 0 or not repeatable(exc):
                raise
            sleep(min(random.uniform(0, ceiling), left))
            ceiling = min(ceiling * 2, max_pause_s)
