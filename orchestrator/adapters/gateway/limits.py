"""One task's budget at the gateway, so that no task can slow another: requests per second
(a token bucket), requests in all, open tunnels, bytes relayed, and how many denials are
written to the audit one by one (the rest are counted into one summary record, so a flood
of refused requests cannot flood the audit either)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class TaskLimits:
    rate: int = 200  # requests per second, sustained; bursts of twice that
    max_requests: int = 100_000
    max_tunnels: int = 16
    max_bytes: int = 4 << 30
    denials_logged_per_s: int = 20


class Budget:
    def __init__(self, limits: TaskLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits, self.clock = limits, clock
        self._lock = threading.Lock()
        self._tokens = float(2 * limits.rate)
        self._filled = clock()
        self._requests = self._tunnels = self._bytes = 0
        self._window, self._logged, self._suppressed = 0, 0, 0

    def request(self) -> str | None:
        """Count one request; why it may not go on, if it may not."""
        limits = self.limits
        with self._lock:
            self._refill()
            self._requests += 1
            if self._requests > limits.max_requests:
                return f"more than {limits.max_requests} requests for this task"
            if self._bytes >= limits.max_bytes:
                return f"more than {limits.max_bytes} bytes relayed for this task"
            if self._tokens < 1:
                return f"more than {limits.rate} requests per second for this task"
            self._tokens -= 1
        return None

    def spent(self) -> bool:
        """Whether the next request would be refused for its rate (a cheap look, counting
        nothing): a flooding task's connections can then be cut before any parsing."""
        with self._lock:
            self._refill()
            return self._tokens < 1

    def _refill(self) -> None:
        """Top the bucket up for the time since it was last looked at (lock held)."""
        now = self.clock()
        rate = self.limits.rate
        self._tokens = min(2 * rate, self._tokens + (now - self._filled) * rate)
        self._filled = now

    def tunnel(self, delta: int) -> str | None:
        """Open (+1) or close (-1) a tunnel; why one may not be opened, if it may not."""
        with self._lock:
            if delta > 0 and self._tunnels >= self.limits.max_tunnels:
                return f"more than {self.limits.max_tunnels} open tunnels for this task"
            self._tunnels += delta
        return None

    def relayed(self, count: int) -> str | None:
        """Count bytes relayed; why no more may be, once the task is over its budget."""
        with self._lock:
            self._bytes += count
            over = self._bytes > self.limits.max_bytes
        return f"more than {self.limits.max_bytes} bytes relayed for this task" if over else None

    def denial(self) -> tuple[bool, int]:
        """Whether to audit this denial on its own, and how many earlier ones went unlogged
        (to be written as one summary record now)."""
        with self._lock:
            window = int(self.clock())
            flush = 0
            if window != self._window:
                flush, self._suppressed = self._suppressed, 0
                self._window, self._logged = window, 0
            if self._logged < self.limits.denials_logged_per_s:
                self._logged += 1
                return True, flush
            self._suppressed += 1
            return False, flush

    def unlogged(self) -> int:
        """Denials not yet written (at the end of the task)."""
        with self._lock:
            left, self._suppressed = self._suppressed, 0
        return left
