"""A policy bundle: the agent registry plus every policies/*.rego file, compiled once; its
version is the hash of their contents. `engine` adds the self-tests and reloading.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from regopy import Interpreter

from orchestrator.config import Settings
from orchestrator.core.agent import Agent
from orchestrator.core.caller import Callers
from orchestrator.core.ceiling import beyond
from orchestrator.core.grant import Grant
from orchestrator.core.spec import TaskSpec
from orchestrator.errors import PolicyError
from orchestrator.policy.agents import load_callers, load_registry

ENTRYPOINT = "data.airlock.admission.decision"
CALLERS_ENTRYPOINT = "airlock/callers/decision"


@dataclass(frozen=True)
class Deployment:
    """Facts about this deployment the policy decides with."""

    runner_image: str
    runtimes: tuple[str, ...]
    default_timeout_s: int
    default_limits: dict[str, float | int]
    max_timeout_s: int
    trust_domain: str

    def policy_input(self) -> dict[str, Any]:
        return {**self.__dict__, "runtimes": list(self.runtimes)}

    @classmethod
    def of(cls, settings: Settings, runtimes: tuple[str, ...]) -> Deployment:
        """This deployment, as its settings and its engine's runtimes describe it."""
        return cls(
            runner_image=settings.runner_image,
            runtimes=runtimes,
            default_timeout_s=settings.default_timeout_s,
            default_limits={
                "cpus": settings.default_cpus,
                "memory": settings.default_memory,
                "pids": settings.default_pids,
            },
            max_timeout_s=settings.max_timeout_s,
            trust_domain=settings.trust_domain,
        )


@dataclass(frozen=True)
class CallerDecision:
    """The front door's decision on one submission, and the quota it was held to."""

    allowed: bool
    reasons: tuple[str, ...]
    quota: dict[str, int]
    policy_version: str

    def to_json(self) -> dict[str, Any]:
        return {
            "allow": self.allowed,
            "reasons": list(self.reasons),
            "quota": self.quota,
            "policy_version": self.policy_version,
        }


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reasons: tuple[str, ...]
    grant: Grant | None
    policy_version: str

    def to_json(self) -> dict[str, Any]:
        return {
            "allow": self.allowed,
            "reasons": list(self.reasons),
            "policy_version": self.policy_version,
            "grant": self.grant.model_dump(mode="json") if self.grant else None,
            "grant_hash": self.grant.digest() if self.grant else None,
        }


def _short(error: Exception, sources: dict[str, str] | None = None) -> str:
    """Rego engine errors carry a whole syntax tree; people need the messages and lines."""
    text = str(error)
    found = re.findall(r"\(error \d+:([\w.-]+)\|(\d+)\|\d+\s+\(errormsg \d+:([^)]*)\)", text)
    if not found:
        lines = [line for line in text.splitlines() if line.strip()]
        return " / ".join(lines[:4])[:600]
    problems = []
    for module, offset, message in found:
        source = (sources or {}).get(module)
        line = f" at line {source[: int(offset)].count(chr(10)) + 1}" if source else ""
        problems.append(f"{message}{line}")
    return "; ".join(problems)


@contextlib.contextmanager
def _library_output_to_stderr() -> Iterator[None]:
    """The Rego engine prints parse errors on stdout itself; keep stdout for our own output."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def policy_input(spec: TaskSpec, agent: Agent | None, deployment: Deployment) -> dict[str, Any]:
    return {
        "task": spec.model_dump(mode="json"),
        "agent": agent.policy_input() if agent else None,
        "deployment": deployment.policy_input(),
    }


@dataclass
class Bundle:
    version: str
    fingerprint: tuple[tuple[str, int, int], ...]
    agents: dict[str, Agent]
    callers: Callers
    interpreter: Interpreter
    compiled: Any
    lock: threading.Lock = field(default_factory=threading.Lock)

    def evaluate(self, document: dict[str, Any], entrypoint: str | None = None) -> dict[str, Any]:
        """Run the admission entrypoint (or `entrypoint`) on one input. Raises PolicyError."""
        with self.lock:
            try:
                self.interpreter.set_input(document)
                if entrypoint is None:
                    output = self.interpreter.query_bundle(self.compiled)
                else:
                    output = self.interpreter.query_bundle_entrypoint(self.compiled, entrypoint)
            except Exception as exc:  # regopy raises its own error type for every failure
                raise PolicyError([f"policy evaluation failed: {_short(exc)}"]) from None
        results = json.loads(str(output)).get("expressions") or []
        if len(results) != 1 or not isinstance(results[0], dict):
            raise PolicyError(["policy produced no decision for this task"])
        return dict(results[0])

    def decide_caller(self, caller: dict[str, str], agent: str, user: str | None) -> CallerDecision:
        """The front door's decision: may this caller run `agent` for `user`, and within
        which quota?"""
        document = {"caller": caller, "agent": agent, "user": user}
        result = self.evaluate(document, CALLERS_ENTRYPOINT)
        reasons = tuple(str(r) for r in result.get("reasons", []))
        quota = {k: int(v) for k, v in dict(result.get("quota") or {}).items()}
        allowed = result.get("allow") is True and not reasons
        return CallerDecision(allowed, reasons, quota, self.version)

    def decide(self, spec: TaskSpec, deployment: Deployment) -> Decision:
        agent = self.agents.get(spec.agent)
        result = self.evaluate(policy_input(spec, agent, deployment))
        reasons = tuple(str(r) for r in result.get("reasons", []))
        if result.get("allow") is not True:
            return Decision(False, reasons or ("denied by policy",), None, self.version)
        try:
            grant = Grant.model_validate(result.get("grant"))
        except ValidationError as exc:
            raise PolicyError(
                [f"policy produced a malformed grant: {exc.errors()[0]['msg']}"]
            ) from None
        # The registry is the ceiling, whatever the Rego says: a wider grant is refused.
        exceeded = beyond(grant, agent, deployment.trust_domain) if agent else ["unknown agent"]
        if exceeded:
            reasons = tuple(f"policy granted beyond the registry: {p}" for p in exceeded)
            return Decision(False, reasons, None, self.version)
        return Decision(True, (), grant, self.version)


def _listed(directory: Path, *suffixes: str) -> list[Path]:
    """Files in `directory` ending in one of `suffixes`, sorted (none if it is not there).
    os.scandir, not Path.glob: this runs on every admission and costs a tenth."""
    try:
        with os.scandir(directory) as entries:
            names = [e.name for e in entries if e.name.endswith(suffixes) and e.is_file()]
    except OSError:
        return []
    return [directory / name for name in sorted(names)]


def _files(policy_dir: Path, agents_dir: Path, callers: Path | None = None) -> list[Path]:
    callers = callers or policy_dir / "callers.yaml"
    return [
        *_listed(policy_dir, ".rego"),
        *_listed(policy_dir / "tests", ".yaml"),
        *_listed(agents_dir, ".yaml", ".yml"),
        *([callers] if callers.exists() else []),
    ]


def fingerprint(
    policy_dir: Path, agents_dir: Path, callers: Path | None = None
) -> tuple[tuple[str, int, int], ...]:
    """What changed-on-disk detection compares: names, sizes and modification times."""
    out = []
    for path in _files(policy_dir, agents_dir, callers):
        try:
            info = path.stat()
        except OSError:
            continue
        out.append((str(path), info.st_size, info.st_mtime_ns))
    return tuple(out)


def compile_bundle(policy_dir: Path, agents_dir: Path, callers_path: Path | None = None) -> Bundle:
    """Load and compile a bundle (without its self-tests): the Rego files, the agent registry
    and the callers registry (`callers_path`, else callers.yaml beside the policies). Raises
    PolicyError listing what is wrong."""
    callers_path = callers_path or policy_dir / "callers.yaml"
    stamp = fingerprint(policy_dir, agents_dir, callers_path)
    rego_files = sorted(policy_dir.glob("*.rego")) if policy_dir.is_dir() else []
    if not rego_files:
        raise PolicyError([f"{policy_dir}: no .rego policy files"])
    agents = load_registry(agents_dir)
    callers = load_callers(callers_path)
    digest = hashlib.sha256()
    interpreter = Interpreter()
    interpreter.add_data({"callers": callers.policy_data()})
    for path in _files(policy_dir, agents_dir, callers_path):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    sources = {path.stem: path.read_text() for path in rego_files}
    with _library_output_to_stderr():
        for path in rego_files:
            try:
                interpreter.add_module(path.stem, sources[path.stem])
            except Exception as exc:
                raise PolicyError([f"{path.name}: {_short(exc, sources)}"]) from None
        try:
            compiled = interpreter.build(ENTRYPOINT, [CALLERS_ENTRYPOINT])
        except Exception as exc:
            raise PolicyError([f"compiling {ENTRYPOINT}: {_short(exc, sources)}"]) from None
    version = "sha256:" + digest.hexdigest()[:16]
    return Bundle(version, stamp, agents, callers, interpreter, compiled)
