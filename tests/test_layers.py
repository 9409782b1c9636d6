"""The layers of the tree hold: who may import whom, no cycles, and interfaces that load
only what they need (the client never loads the worker's stack; `airlock --help` loads
click and little else)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "orchestrator"
FOUNDATION = {"orchestrator.errors", "orchestrator.config"}
# layer -> the layers its modules may import (besides their own and the foundation)
MAY_IMPORT = {
    "core": set(),
    "policy": {"core"},
    "adapters": {"core"},
    "task": {"core", "policy", "adapters"},
    "wiring": {"core", "policy", "adapters", "task"},
    "interfaces": {"core", "policy", "adapters", "task", "wiring", "interfaces"},
}


def layer(module: str) -> str:
    if module in FOUNDATION:
        return "foundation"
    part = module.split(".")[1] if "." in module else ""
    return part if part in MAY_IMPORT and part != "interfaces" else "interfaces"


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def imports(path: Path, known: set[str]) -> set[str]:
    """Every module of ours `path` imports, at any depth of the file."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            base = node.module
            for alias in node.names:
                full = f"{base}.{alias.name}"
                out.add(full if full in known else base)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
    return {name for name in out if name in known}


GRAPH = {name: imports(path, set(modules())) for name, path in modules().items()}


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_follow_the_layers(module: str) -> None:
    own = layer(module)
    for target in GRAPH[module]:
        theirs = layer(target)
        if theirs == "foundation" or theirs == own:
            continue
        if own == "foundation":
            assert target == "orchestrator.errors", f"{module} imports {target}"
            continue
        assert theirs in MAY_IMPORT[own], f"{module} ({own}) imports {target} ({theirs})"


def test_no_import_cycles() -> None:
    state: dict[str, int] = {}  # 1 on the path, 2 done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(GRAPH[name]):
            if target == name or target.startswith(name + "."):  # a package's own modules
                continue
            assert state.get(target) != 1, "cycle: " + " -> ".join([*path, name, target])
            if target not in state:
                visit(target, [*path, name])
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [])


def loaded(code: str) -> set[str]:
    """The modules a fresh interpreter has loaded after running `code`."""
    program = f"import json, sys\n{code}\nprint(json.dumps(sorted(sys.modules)))"
    proc = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, check=True
    )
    return {name.split(".")[0] for name in json.loads(proc.stdout.splitlines()[-1])} | set(
        json.loads(proc.stdout.splitlines()[-1])
    )


# (cryptography is not among them: redis-py loads it for its TLS support.)
WORKER_STACK = {"hvac", "regopy", "uvloop", "docker", "h11", "httptools"}


def test_the_client_loads_no_worker_stack() -> None:
    found = loaded("import orchestrator.client")
    assert not found & WORKER_STACK, found & WORKER_STACK
    worker_side = (
        "orchestrator.task",
        "orchestrator.adapters.vault",
        "orchestrator.adapters.gateway",
    )
    assert not {m for m in found if m.startswith(worker_side)}


def test_help_loads_only_the_command_table() -> None:
    found = loaded(
        "from orchestrator.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass"
    )
    heavy = {"redis", "celery", "pydantic", "rich", "opentelemetry", "yaml"} | WORKER_STACK
    assert not found & heavy, found & heavy
    ours = {m for m in found if m.startswith("orchestrator")}
    assert ours <= {
        "orchestrator",
        "orchestrator.cli",
        "orchestrator.cli.app",
        "orchestrator.errors",
    }


def test_status_through_the_api_loads_neither_rich_nor_the_store() -> None:
    found = loaded("import orchestrator.cli.status, orchestrator.remote")
    heavy = {"redis", "celery", "pydantic", "rich", "opentelemetry", "yaml"} | WORKER_STACK
    assert not found & heavy, found & heavy
