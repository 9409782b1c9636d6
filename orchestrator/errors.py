"""The one error root of Airlock.

    AirlockError                  retryable?  CLI exit
    ├── ConfigError               no          2   a setting in the environment is malformed
    ├── InvalidSpec               no          2   the task spec failed validation
    ├── PolicyError               no          2   the agent registry or Rego bundle is broken
    ├── TaskNotFound              no          2   no record for that task id
    ├── InvalidId                 no          2   not a task id (nor a warm runner's key)
    ├── IllegalTransition         no          -   a state change the lifecycle forbids
    ├── Unauthenticated           no          4   a caller's token did not verify (HTTP 401)
    ├── ServiceUnavailable        yes         3   Redis, Docker or Vault cannot be reached
    ├── VaultRefused              no          1   Vault answered, and said no
    └── RuntimeFailure            no          1   the container engine refused an operation
        └── ImageNotFound         no          1

Adapters translate the errors of the libraries beneath them at their seam
(`raise ... from exc`), so nothing above them sees a docker, redis or hvac exception.
"""

from __future__ import annotations


class AirlockError(Exception):
    """Base of every error Airlock raises on purpose."""

    retryable = False
    exit_code = 1


class ConfigError(AirlockError):
    exit_code = 2


class InvalidSpec(AirlockError):
    """The task spec is malformed; `problems` lists one readable line per field."""

    exit_code = 2

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid task spec:\n  " + "\n  ".join(problems))


class PolicyError(AirlockError):
    """The agent registry or the Rego bundle cannot be loaded; `problems` says where."""

    exit_code = 2

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("policy bundle invalid:\n  " + "\n  ".join(problems))


class TaskNotFound(AirlockError):
    exit_code = 2

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        super().__init__(f"no task with id {task_id!r}")


class InvalidId(AirlockError):
    """A value offered as a task id that is not one; it is never made a path, key or label."""

    exit_code = 2

    def __init__(self, value: object) -> None:
        shown = repr(value)
        self.value = value
        super().__init__(f"not a task id: {shown[:80]}{'...' if len(shown) > 80 else ''}")


class IllegalTransition(AirlockError):
    def __init__(self, task_id: str, current: str | None, target: str) -> None:
        self.task_id, self.current, self.target = task_id, current, target
        super().__init__(f"task {task_id}: illegal transition {current} -> {target}")


class Unauthenticated(AirlockError):
    """A caller's bearer token is missing or did not verify; `reason` says which check."""

    exit_code = 4

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"not authenticated: {reason}")


class Forbidden(AirlockError):
    """An authenticated caller asked for what policy does not allow; `problems` names the
    rules. Exit code 2, as for a task the policy rejected."""

    exit_code = 2

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("forbidden: " + "; ".join(problems))


class ServiceUnavailable(AirlockError):
    """A service Airlock depends on did not answer; trying again later may work."""

    retryable = True
    exit_code = 3

    def __init__(self, service: str, detail: str) -> None:
        self.service = service
        super().__init__(f"{service} is unreachable: {detail}")


class VaultRefused(AirlockError):
    """Vault answered and refused (permission, bad path, bad request)."""


class RuntimeFailure(AirlockError):
    """The container engine answered but refused or failed the operation."""


class ImageNotFound(RuntimeFailure):
    pass
