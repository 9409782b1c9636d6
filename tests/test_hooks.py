"""The task runner's hooks: every hook sees every phase begin and end, in order, with the
facts the executor wrote, whether the phase ended well or not."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from orchestrator.task.hooks import Hooks, Phase


class Recorder:
    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log

    @contextlib.contextmanager
    def phase(self, phase: Phase) -> Iterator[None]:
        self.log.append(f"{self.name} begin {phase.name} {sorted(phase.facts)}")
        try:
            yield
        finally:
            self.log.append(f"{self.name} end {phase.name} {sorted(phase.facts)} {phase.failure}")


def test_hooks_nest_in_order_and_see_the_facts() -> None:
    log: list[str] = []
    hooks = Hooks([Recorder("a", log), Recorder("b", log)])
    with hooks.task("t1", "00-" + "1" * 32 + "-" + "2" * 16 + "-01") as task:
        with hooks.phase("admit", "t1", image="img") as admit:
            admit.facts["decision"] = "admit"
        task.failure = "exit code 3"
    assert log == [
        "a begin task ['task_id']",
        "b begin task ['task_id']",
        "a begin admit ['image']",
        "b begin admit ['image']",
        "b end admit ['decision', 'image'] None",
        "a end admit ['decision', 'image'] None",
        "b end task ['task_id'] exit code 3",
        "a end task ['task_id'] exit code 3",
    ]


def test_a_failing_phase_still_ends_every_hook() -> None:
    log: list[str] = []
    hooks = Hooks([Recorder("a", log), Recorder("b", log)])
    with pytest.raises(RuntimeError), hooks.phase("provision", "t1"):
        raise RuntimeError("engine refused")
    assert [line.split()[:3] for line in log[-2:]] == [
        ["b", "end", "provision"],
        ["a", "end", "provision"],
    ]
