"""The agent registry: one YAML file per agent role, each its own identity and ceiling.

An agent file says what the role may ever be given: images, limits, isolation class, Vault
policies and secrets, egress, MCP tools, and whether it may act for users. Items marked
`default: false` are granted only when a task asks for them by name.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from orchestrator.core.agent import Agent
from orchestrator.core.caller import Callers
from orchestrator.errors import PolicyError

MAX_AGENT_FILE_BYTES = 256 * 1024


def _read_yaml(path: Path) -> object:
    try:
        if path.stat().st_size > MAX_AGENT_FILE_BYTES:
            raise PolicyError([f"{path}: larger than {MAX_AGENT_FILE_BYTES} bytes"])
        return yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise PolicyError([f"{path}: cannot read ({exc})"]) from None


def _problems(path: Path, exc: ValidationError) -> PolicyError:
    return PolicyError(
        [
            f"{path.name}: {'.'.join(str(p) for p in e['loc']) or 'file'}: {e['msg']}"
            for e in exc.errors(include_url=False)
        ]
    )


def load_agent(path: Path) -> Agent:
    """Raises PolicyError naming the file and field."""
    data = _read_yaml(path)
    try:
        agent = Agent.model_validate(data)
    except ValidationError as exc:
        raise _problems(path, exc) from None
    if agent.name != path.stem:
        raise PolicyError([f"{path.name}: name {agent.name!r} does not match the file name"])
    return agent


def load_registry(directory: Path) -> dict[str, Agent]:
    """Every agent in `directory` (*.yaml, *.yml). Raises PolicyError listing every problem."""
    if not directory.is_dir():
        raise PolicyError([f"{directory}: agent registry directory not found"])
    agents: dict[str, Agent] = {}
    problems: list[str] = []
    for path in sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")]):
        try:
            agent = load_agent(path)
        except PolicyError as exc:
            problems.extend(exc.problems)
            continue
        agents[agent.name] = agent
    if problems:
        raise PolicyError(problems)
    return agents


def load_callers(path: Path) -> Callers:
    """The callers registry; an absent file registers nobody. Raises PolicyError."""
    if not path.exists():
        return Callers()
    try:
        return Callers.model_validate(_read_yaml(path) or {})
    except ValidationError as exc:
        raise _problems(path, exc) from None
