"""Deciding admission with the policy bundle in force.

Edits are picked up on the next admission without a restart: the new bundle must load,
compile and pass its own table tests, or it is refused and the last good bundle stays in
force. With no good bundle at all, every task is refused.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from orchestrator.core.spec import TaskSpec
from orchestrator.errors import PolicyError
from orchestrator.policy.bundle import (
    Bundle,
    CallerDecision,
    Decision,
    Deployment,
    compile_bundle,
    fingerprint,
)
from orchestrator.policy.testing import run_policy_tests

log = logging.getLogger(__name__)


def load_bundle(policy_dir: Path, agents_dir: Path, callers: Path | None = None) -> Bundle:
    """Load, compile and self-test a bundle. Raises PolicyError listing what is wrong."""
    bundle = compile_bundle(policy_dir, agents_dir, callers)
    failures = [r for r in run_policy_tests(bundle, policy_dir / "tests") if not r.passed]
    if failures:
        raise PolicyError([f"policy test {r.name!r} failed: {r.detail}" for r in failures])
    return bundle


class PolicyEngine:
    """The bundle in force, reloaded when its files change; decisions fail closed."""

    def __init__(
        self,
        policy_dir: Path,
        agents_dir: Path,
        deployment: Callable[[], Deployment],
        callers: Path | None = None,
        recheck_s: float = 0.0,
    ) -> None:
        """`recheck_s`: how long a bundle is used before its files are looked at again (0:
        on every decision; the front door, deciding thousands a second, waits a second)."""
        self.policy_dir = policy_dir
        self.agents_dir = agents_dir
        self.callers = callers
        self._deployment = deployment
        self._bundle: Bundle | None = None
        self._refused: tuple[tuple[str, int, int], ...] | None = None
        self.last_error: str | None = None
        self._lock = threading.Lock()
        self.recheck_s = recheck_s
        self._checked = -recheck_s

    def bundle(self) -> Bundle:
        """The bundle in force. Raises PolicyError if no valid bundle was ever loaded."""
        current = self.current()
        if current is not None:
            return current
        self._checked = time.monotonic()
        stamp = fingerprint(self.policy_dir, self.agents_dir, self.callers)
        with self._lock:
            current = self._bundle
            if (current is None or stamp != current.fingerprint) and stamp != self._refused:
                self._reload(stamp)
            if self._bundle is None:
                raise PolicyError([f"no valid policy bundle: {self.last_error}"])
            return self._bundle

    def current(self) -> Bundle | None:
        """The bundle in force if its files need no look now (within `recheck_s` of the
        last), else None: then `bundle()`, which may reload, is the caller's to call."""
        current = self._bundle
        if current is not None and time.monotonic() - self._checked < self.recheck_s:
            return current
        return None

    def _reload(self, stamp: tuple[tuple[str, int, int], ...]) -> None:
        try:
            bundle = load_bundle(self.policy_dir, self.agents_dir, self.callers)
        except PolicyError as exc:
            self._refused = stamp
            self.last_error = "; ".join(exc.problems)
            kept = f"keeping {self._bundle.version}" if self._bundle else "refusing every task"
            log.error("policy reload refused (%s): %s", kept, self.last_error)
            return
        if self._bundle is not None:
            log.warning("policy reloaded: %s -> %s", self._bundle.version, bundle.version)
        self._bundle, self._refused, self.last_error = bundle, None, None

    def admit(self, spec: TaskSpec) -> Decision:
        """Decide one task. Raises PolicyError when no decision can be made (fail closed)."""
        return self.bundle().decide(spec, self._deployment())

    def admit_caller(self, caller: dict[str, str], agent: str, user: str | None) -> CallerDecision:
        """The front door's decision on one submission. Raises PolicyError (fail closed)."""
        return self.bundle().decide_caller(caller, agent, user)
