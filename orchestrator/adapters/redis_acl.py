"""Redis users per component: each part of Airlock gets the keys and commands it needs and
nothing else, and the password-less default user is switched off.

    api      the front door: task records it creates, callers' quotas, idempotency keys,
             spans, the queues it sends to; reads the audit
    worker   task records, events, the credential journal, the warm pool, spans, the audit
             it appends to, the queues it takes tasks from; no idempotency keys
    gateway  reads task records (is a token's task live?), appends the audit, counts
             egress decisions and alarms; writes nothing else
    ops      reads everything of the deployment, writes nothing
    admin    everything (bootstrap, migrations, the operator's direct mode, tests)

No component but admin may run administrative or dangerous commands (FLUSHALL, CONFIG,
KEYS, ACL, DEBUG, ...). A user's rules are rebuilt from scratch each time (`reset`), so
applying them twice gives the same result.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import redis

COMPONENTS = ("api", "worker", "gateway", "ops")
# What every non-admin component may run: data commands, scripts, pub/sub (Celery's
# control channel), never administration.
_COMMANDS = ["+@all", "-@dangerous", "-@admin", "+info", "+client|setname", "+client|id"]


def user_name(component: str, prefix: str = "airlock") -> str:
    return f"{prefix}-{component}"


def _queues(queues: Iterable[str]) -> list[str]:
    """A Celery (kombu) Redis broker's keys for `queues`: the lists (with their priority
    variants), bindings, and the unacknowledged-message bookkeeping."""
    keys = [f"~{q}" for q in queues] + [f"~{q}\x06*" for q in queues]
    control = ["~*.celery.pidbox*", "~*.reply.celery.pidbox*"]  # Celery's remote control
    return [*keys, *control, "~_kombu.*", "~unacked", "~unacked_index", "~unacked_mutex"]


# Each component's keys under the namespace; "r:" marks read-only access.
_RECORDS = ("task:*", "tasks", "tasks:live", "tasks:live:ready", "events", "trace:*", "caller:*")
_KEYS = {
    # The console reads the warm pool and checks the audit chains (their marks), read-only.
    "api": (*_RECORDS, "idem:*", "r:audit", "r:audit:*", "r:pool"),
    "worker": (*_RECORDS, "pool", "member:*", "credentials", "cred:*", "audit", "audit:*"),
    "gateway": (
        "r:task:*",
        "task:*:egress",
        "task:*:alarms",
        "task:*:audit",
        "audit",
        "audit:*",
        "trace:*",
    ),
}
_QUEUE_USERS = ("api", "worker")  # the queue's producer and consumer; the only pub/sub users


def _pattern(namespace: str, key: str) -> str:
    read_only = key.startswith("r:")
    return f"{'%R' if read_only else ''}~{namespace}:{key.removeprefix('r:')}"


def rules(component: str, namespace: str, queues: Iterable[str]) -> list[str]:
    """The ACL rules of one component, for a deployment's namespace and queue names."""
    ns = namespace
    queues = list(queues)
    if component in _KEYS:
        keys = [_pattern(ns, key) for key in _KEYS[component]]
        if component in _QUEUE_USERS:
            return ["&*", *keys, *_queues(queues), *_COMMANDS]
        return ["resetchannels", *keys, *_COMMANDS]
    if component == "ops":
        return [
            "resetchannels",
            f"%R~{ns}:*",
            *[f"%R{k}" for k in _queues(queues)],
            "+@read",
            "+@connection",
            "-@dangerous",
        ]
    raise ValueError(f"unknown component {component!r}")


def apply(
    admin: redis.Redis[str],
    passwords: Mapping[str, str],
    namespace: str,
    queues: Iterable[str],
    prefix: str = "airlock",
) -> list[str]:
    """Create or reset the users of `passwords` (component -> password; "admin" included
    gives the admin user); returns the user names made."""
    made = []
    queues = list(queues)
    for component, password in passwords.items():
        name = user_name(component, prefix)
        if component == "admin":
            spec = ["~*", "&*", "+@all"]
        else:
            spec = rules(component, namespace, queues)
        # One command: the user may be the one this connection is logged in as.
        admin.execute_command("ACL", "SETUSER", name, "reset", "on", f">{password}", *spec)
        made.append(name)
    return made


def lock_default(admin: redis.Redis[str]) -> None:
    """No more password-less access: the default user is switched off."""
    admin.execute_command("ACL", "SETUSER", "default", "off", "resetchannels", "-@all")


def save(admin: redis.Redis[str]) -> bool:
    """Persist the users to the server's ACL file, where it has one."""
    try:
        admin.execute_command("ACL", "SAVE")
    except redis.ResponseError:
        return False
    return True
