"""What counts as an id. Task ids and warm-runner keys become Redis keys, container labels
and endpoint directory names, so each place that turns one into a path, key or label checks
it first: a task id is a canonical UUID (lower-case, hyphenated, as the front door makes
them), a runner's key is `pool-` and 16 hex digits. Nothing else is ever made a path.
"""

from __future__ import annotations

import re

from orchestrator.errors import InvalidId

MEMBER_PREFIX = "pool-"
_TASK_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_MEMBER = re.compile(r"pool-[0-9a-f]{16}")


def is_task_id(value: object) -> bool:
    return isinstance(value, str) and _TASK_ID.fullmatch(value) is not None


def is_member(key: str) -> bool:
    """Whether `key` names a warm-pool runner rather than a task."""
    return key.startswith(MEMBER_PREFIX)


def is_endpoint_key(value: object) -> bool:
    """A task id or a warm runner's key: the only names an endpoint directory may have."""
    return is_task_id(value) or (isinstance(value, str) and _MEMBER.fullmatch(value) is not None)


def endpoint_key(value: object) -> str:
    """`value`, checked to be a task id or a warm runner's key. Raises InvalidId."""
    if not is_endpoint_key(value):
        raise InvalidId(value)
    assert isinstance(value, str)
    return value
