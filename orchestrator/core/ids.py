"""Warm-runner keys share the task ids' places (store keys, container labels, endpoint
directories); a runner's key is told apart by its prefix."""

from __future__ import annotations

MEMBER_PREFIX = "pool-"


def is_member(key: str) -> bool:
    """Whether `key` names a warm-pool runner rather than a task."""
    return key.startswith(MEMBER_PREFIX)
