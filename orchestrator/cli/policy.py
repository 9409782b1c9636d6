"""The agent registry and the Rego bundle: list, show, check and evaluate."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from orchestrator import config, wiring
from orchestrator.cli import render
from orchestrator.cli.app import emit_json, fail, json_option
from orchestrator.cli.complete import agent_names
from orchestrator.core.spec import load_file, parse
from orchestrator.policy.agents import load_registry
from orchestrator.policy.engine import load_bundle
from orchestrator.policy.testing import run_policy_tests


@click.group()
def agents() -> None:
    """The agent registry: one identity and ceiling per agent role."""


@agents.command("list")
@json_option
def agents_list(as_json: bool) -> None:
    """List the agent roles."""
    registry = load_registry(config.load().agents_dir)
    if as_json:
        emit_json([a.model_dump(mode="json") for a in registry.values()])
        return
    render.agent_table(list(registry.values()))


@agents.command("show")
@click.argument("name", shell_complete=agent_names)
def agents_show(name: str) -> None:
    """Show everything one agent role may be granted."""
    registry = load_registry(config.load().agents_dir)
    if name not in registry:
        fail(f"unknown agent {name!r}; known: {', '.join(sorted(registry)) or 'none'}", 2)
    emit_json(registry[name].model_dump(mode="json"))


@click.group()
def policy() -> None:
    """The Rego policy bundle."""


@policy.command("check")
@json_option
def policy_check(as_json: bool) -> None:
    """Load the agents and policies, compile them, and run the policy tests."""
    settings = config.load()
    bundle = load_bundle(settings.policy_dir, settings.agents_dir, config.callers_file(settings))
    results = run_policy_tests(bundle, settings.policy_dir / "tests")
    if as_json:
        emit_json(
            {
                "version": bundle.version,
                "agents": sorted(bundle.agents),
                "tests": [r.__dict__ for r in results],
            }
        )
    else:
        click.echo(
            f"bundle {bundle.version}: {len(bundle.agents)} agents, "
            f"{len(results)} policy tests passed"
        )


@policy.command("eval")
@click.option("--file", "-f", "spec_file", type=click.Path(path_type=Path), required=True)
def policy_eval(spec_file: Path) -> None:
    """Decide a task spec without running it: decision, reasons and grant."""
    decision = wiring.policy_engine(config.load()).admit(load_file(spec_file))
    emit_json(decision.to_json())
    sys.exit(0 if decision.allowed else 2)


@policy.command("explain")
@click.argument("agent", shell_complete=agent_names)
@json_option
def policy_explain(agent: str, as_json: bool) -> None:
    """What AGENT may reach by default, as the policy in force grants it: each egress rule
    by name, MCP tools with their argument rules, secrets; and what a task may ask for on
    top (scopes). Exit 2 when the policy grants this agent nothing."""
    settings = config.load()
    registry = load_registry(settings.agents_dir)
    if agent not in registry:
        fail(f"unknown agent {agent!r}; known: {', '.join(sorted(registry)) or 'none'}", 2)
    decision = wiring.policy_engine(settings).admit(parse({"agent": agent, "command": ["true"]}))
    entry = registry[agent]
    on_request: dict[str, list[Any]] = {
        "egress": [r.model_dump(mode="json") for r in entry.egress if not r.default],
        "tools": [
            f"{server.name}/{tool.name}"
            for server in entry.mcp
            for tool in server.tools
            if not tool.default
        ],
        "secrets": [s.name for s in entry.secrets if not s.default],
    }
    if as_json:
        emit_json({**decision.to_json(), "on_request": on_request})
    elif decision.grant is None:
        click.echo(f"agent {agent}: the policy grants nothing")
        for reason in decision.reasons:
            click.echo(f"  {reason}")
    else:
        render.reach(decision.grant, on_request, decision.policy_version)
    sys.exit(0 if decision.allowed else 2)
