"""ride_out: a call is repeated only for the errors its adapter calls repeatable, with
jittered backoff, and never past its time."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from orchestrator.adapters.retry import ride_out


class Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.pauses: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.pauses.append(seconds)
        self.now += seconds


def failing(times: int, error: Exception) -> tuple[list[int], Callable[[], str]]:
    calls: list[int] = []

    def call() -> str:
        calls.append(1)
        if len(calls) <= times:
            raise error
        return "answer"

    return calls, call


def test_repeats_until_the_service_is_back() -> None:
    clock = Clock()
    calls, call = failing(5, ConnectionRefusedError())
    result = ride_out(
        call, 10, lambda e: isinstance(e, ConnectionRefusedError), clock=clock, sleep=clock.sleep
    )
    assert result == "answer" and len(calls) == 6
    # full jitter under a doubling ceiling: 0.05, 0.1, 0.2, 0.4, 0.8
    for pause, ceiling in zip(clock.pauses, [0.05, 0.1, 0.2, 0.4, 0.8], strict=True):
        assert 0 <= pause <= ceiling


def test_an_error_the_service_may_have_acted_on_is_never_repeated() -> None:
    clock = Clock()
    calls, call = failing(1, TimeoutError())
    with pytest.raises(TimeoutError):
        ride_out(
            call,
            10,
            lambda e: isinstance(e, ConnectionRefusedError),
            clock=clock,
            sleep=clock.sleep,
        )
    assert len(calls) == 1 and clock.pauses == []


def test_gives_up_when_its_time_is_over() -> None:
    clock = Clock()
    calls, call = failing(10**6, ConnectionRefusedError())
    with pytest.raises(ConnectionRefusedError):
        ride_out(call, 3, lambda e: True, clock=clock, sleep=clock.sleep)
    assert clock.now <= 3 and len(calls) > 3
    assert all(pause <= 1.0 for pause in clock.pauses)  # capped


def test_no_time_means_no_repeat() -> None:
    clock = Clock()
    calls, call = failing(1, ConnectionRefusedError())
    with pytest.raises(ConnectionRefusedError):
        ride_out(call, 0, lambda e: True, clock=clock, sleep=clock.sleep)
    assert len(calls) == 1
