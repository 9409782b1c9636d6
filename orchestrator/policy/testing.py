"""Table-driven tests that ship with a policy bundle (policies/tests/*.yaml).

Each file holds a deployment, its own agents, and cases: a task spec, whether it must be
admitted, reasons it must give, and grant fields it must produce. They run on every reload
(a bundle failing them is refused), in `airlock policy check`, and in the test suite.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from orchestrator.core.agent import Agent
from orchestrator.core.grant import Grant
from orchestrator.core.spec import parse
from orchestrator.errors import InvalidSpec, PolicyError
from orchestrator.policy.bundle import Bundle, Deployment, policy_input


@dataclass(frozen=True)
class Result:
    file: str
    name: str
    passed: bool
    detail: str = ""


def contains(actual: Any, expected: Any) -> bool:
    """Every key of `expected` is in `actual` with a matching value (recursively)."""
    if isinstance(expected, dict):
        return isinstance(actual, dict) and all(
            key in actual and contains(actual[key], value) for key, value in expected.items()
        )
    if isinstance(expected, list):
        return (
            isinstance(actual, list)
            and len(actual) == len(expected)
            and all(contains(a, e) for a, e in zip(actual, expected, strict=True))
        )
    return bool(actual == expected)


def _load(path: Path) -> tuple[dict[str, Any], dict[str, Agent], list[dict[str, Any]]]:
    try:
        doc = yaml.safe_load(path.read_text())
        agents = {
            name: Agent.model_validate({"name": name, **body})
            for name, body in (doc.get("agents") or {}).items()
        }
    except (OSError, yaml.YAMLError, AttributeError, ValidationError) as exc:
        raise PolicyError([f"{path.name}: cannot load policy tests ({exc})"]) from None
    return dict(doc.get("deployment") or {}), agents, list(doc.get("cases") or [])


def run_case(
    bundle: Bundle,
    file: str,
    deployment: dict[str, Any],
    agents: dict[str, Agent],
    case: dict[str, Any],
) -> Result:
    name = str(case.get("name", "unnamed"))
    try:
        spec = parse(case["task"])
    except (InvalidSpec, KeyError) as exc:
        return Result(file, name, False, f"bad task in test: {exc}")
    document = policy_input(
        spec, agents.get(spec.agent), _deployment({**deployment, **case.get("deployment", {})})
    )
    decision = bundle.evaluate(document)
    problems = []
    if decision.get("allow") is not case.get("allow"):
        problems.append(
            f"allow is {decision.get('allow')}, expected {case.get('allow')} "
            f"(reasons: {decision.get('reasons')})"
        )
    for reason in case.get("reasons", []):
        if reason not in decision.get("reasons", []):
            problems.append(f"missing reason {reason!r} (got {decision.get('reasons')})")
    if decision.get("allow") is True:
        try:
            Grant.model_validate(decision.get("grant"))
        except ValidationError as exc:
            problems.append(f"malformed grant: {exc.errors()[0]['msg']}")
    if "grant" in case and not contains(decision.get("grant"), case["grant"]):
        problems.append(f"grant {decision.get('grant')} does not contain {case['grant']}")
    return Result(file, name, not problems, "; ".join(problems))


def _deployment(values: dict[str, Any]) -> Deployment:
    values = {**values, "runtimes": tuple(values.get("runtimes", ("runc",)))}
    return Deployment(**values)


def run_policy_tests(bundle: Bundle, directory: Path) -> list[Result]:
    """Run every case of every test file in `directory` against `bundle`."""
    results = []
    for path in sorted(directory.glob("*.yaml")) if directory.is_dir() else []:
        deployment, agents, cases = _load(path)
        for case in cases:
            results.append(run_case(bundle, path.name, deployment, agents, case))
    return results
