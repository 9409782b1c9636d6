"""Grants for tests of the pure checks: only the parts under test vary."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from orchestrator.core.grant import CompiledGrant, Grant


def compiled_grant(
    egress: Sequence[dict[str, Any]] = (),
    tools: Sequence[dict[str, Any]] = (),
    mcp_reads: Sequence[dict[str, Any]] = (),
) -> CompiledGrant:
    """A compiled grant of agent `a` with these egress rules, MCP tools and reads."""
    return CompiledGrant(
        Grant.build(
            "a",
            identity="spiffe://t/agent/a",
            image="i",
            timeout_s=10,
            limits={"cpus": 1, "memory": 1 << 30, "pids": 10},
            egress=list(egress),
            tools=list(tools),
            mcp_reads=list(mcp_reads),
        )
    )
