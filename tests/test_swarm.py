"""The same stack on Docker swarm (`scripts/stack swarm-up`): a one-node swarm, the worker
as a global service (each node runs its own engine, gateway and worker), a task from the
host's CLI runs on the node and is traced there, and removing the stack with a task in
flight leaves nothing behind, the swarm included when the script made it."""

from __future__ import annotations

import pytest

from tests.test_stack import (
    airlock,
    docker,
    hello,
    leaks,
    ok,
    running_sleeper,
    spans,
    stack,
    task_status,
)

pytestmark = [pytest.mark.docker, pytest.mark.slow]


def test_the_stack_deploys_on_a_swarm_with_a_worker_on_every_node() -> None:
    before = docker("info", "--format", "{{.Swarm.LocalNodeState}}")
    if docker("ps", "-q", "--filter", "label=com.docker.compose.project=airlock"):
        pytest.fail("a compose stack is running here: `scripts/stack down` first", pytrace=False)
    try:
        ok(stack("swarm-up"))
        modes = docker("service", "ls", "--format", "{{.Name}} {{.Mode}}").splitlines()
        assert "airlock_node global" in modes
        assert not [m for m in modes if m.startswith(("airlock_worker ", "airlock_gateway "))]
        token = ok(airlock("dev", "token", "alice")).strip()
        task_id = hello(token, "hello, swarm")
        node = docker("info", "--format", "{{.Name}}")  # the node service's host name
        assert task_status(task_id, token)["worker"].endswith(f"@{node}")
        hosts = {s["service"]: s["host"] for s in spans(task_id, token)}
        assert hosts["airlock-worker"] == node and hosts["airlock-api"] != node
        # Removed with a task in flight.
        running_sleeper(token)
    finally:
        removed = stack("swarm-down", "--volumes")
    assert "nothing left behind" in ok(removed)
    assert leaks() == {}
    assert not docker("volume", "ls", "-q", "--filter", "label=com.docker.stack.namespace=airlock")
    assert docker("info", "--format", "{{.Swarm.LocalNodeState}}") == before
