"""Who submits a task, as values: a verified principal, the identities a task carries (its
submitter and the user it acts for), and the callers registry the front door's Rego policy
decides with (which agents each caller may run, whom it may act for, and how much).

A principal is only ever made from something verified: a bearer token checked against the
OIDC issuer, an admission ticket checked against the front door's key, or, for an operator
submitting directly on a worker host, the kernel's word on the process's uid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from orchestrator.core.agent import UserPattern
from orchestrator.core.spec import Name

Kind = Literal["user", "service", "operator"]
KINDS: tuple[Kind, ...] = ("user", "service", "operator")


@dataclass(frozen=True)
class Principal:
    """A verified caller: its name (the issuer's `username`, a service's role name, or the
    local account), what kind of caller it is, and who vouched for it."""

    name: str
    kind: Kind
    issuer: str
    subject: str

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "kind": self.kind, "iss": self.issuer, "sub": self.subject}

    @property
    def label(self) -> str:
        """How records, spans and audit lines name it: kind:name."""
        return f"{self.kind}:{self.name}"

    @classmethod
    def from_json(cls, data: object) -> Principal:
        """Raises ValueError unless `data` is what `to_json` makes."""
        if not isinstance(data, dict):
            raise ValueError("principal is not an object")
        values = [data.get(k) for k in ("name", "kind", "iss", "sub")]
        if not all(isinstance(v, str) and 0 < len(v) <= 256 for v in values):
            raise ValueError("principal needs name, kind, iss and sub")
        name, kind, issuer, subject = (str(v) for v in values)
        for allowed in KINDS:
            if kind == allowed:
                return cls(name, allowed, issuer, subject)
        raise ValueError(f"unknown principal kind {kind!r}")


@dataclass(frozen=True)
class Identities:
    """Who a task is for: the submitter (always), and the user it acts for (when proven)."""

    submitter: Principal
    user: str | None = None

    def record_fields(self) -> dict[str, str]:
        fields = {"submitter": self.submitter.label}
        if self.user:
            fields["on_behalf_of"] = self.user
        return fields


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


CallerName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._+@-]{0,127}$")]


class Rights(_Frozen):
    agents: tuple[Name | Literal["*"], ...] = Field((), description="agents it may run; * any")
    act_for: tuple[UserPattern | Literal["*"], ...] = Field(
        (), description="users it may act for, with their token: names exactly or *@domain"
    )
    concurrent: int | None = Field(None, ge=0, description="tasks not yet ended, at most")
    per_minute: int | None = Field(None, ge=0, description="submissions in any 60 s, at most")
    read_all: bool = Field(False, description="may read every task (ops), not only its own")


class Quota(_Frozen):
    concurrent: int = Field(10, ge=0)
    per_minute: int = Field(60, ge=0)


class Callers(_Frozen):
    """The callers registry (callers.yaml)."""

    users: dict[CallerName, Rights] = Field(default_factory=dict)
    services: dict[CallerName, Rights] = Field(default_factory=dict)
    default_quota: Quota = Quota()

    def policy_data(self) -> dict[str, Any]:
        return self.model_dump(mode="json")
