"""Agent identities and policy as code: the registry, the Rego bundle, grants, hot reload."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.adapters.runtime.docker_engine import DockerRuntime
from orchestrator.adapters.store import Store
from orchestrator.config import Settings
from orchestrator.core.agent import Agent
from orchestrator.core.grant import CompiledGrant, Grant
from orchestrator.core.lifecycle import TaskState
from orchestrator.core.spec import parse
from orchestrator.errors import InvalidSpec, PolicyError
from orchestrator.policy.agents import load_registry
from orchestrator.policy.bundle import Bundle, Deployment, policy_input
from orchestrator.policy.engine import PolicyEngine, load_bundle
from orchestrator.policy.testing import run_policy_tests
from orchestrator.task.credentials import Credentials
from orchestrator.task.executor import Executor
from tests.conftest import ROOT, airlock
from tests.grants import compiled_grant

POLICIES, AGENTS = ROOT / "policies", ROOT / "agents"
DEPLOYMENT = Deployment(
    runner_image="airlock-runner:latest",
    runtimes=("runc",),
    default_timeout_s=300,
    default_limits={"cpus": 1.0, "memory": 512 << 20, "pids": 256},
    max_timeout_s=86400,
    trust_domain="airlock.test",
)


@pytest.fixture(scope="module")
def bundle() -> Bundle:
    return load_bundle(POLICIES, AGENTS)


def engine_over(policy_dir: Path, agents_dir: Path) -> PolicyEngine:
    return PolicyEngine(policy_dir, agents_dir, lambda: DEPLOYMENT)


# --- the shipped bundle --------------------------------------------------------------------


def test_shipped_bundle_passes_its_own_table(bundle: Bundle) -> None:
    results = run_policy_tests(bundle, POLICIES / "tests")
    assert len(results) >= 25
    assert [r for r in results if not r.passed] == []
    assert sorted(bundle.agents) == ["coder", "demo", "ops", "researcher"]
    assert bundle.version.startswith("sha256:")


def test_a_wrong_expectation_is_caught(tmp_path: Path) -> None:
    """The policy tests can fail: flip one expectation and the bundle is refused."""
    policies = shutil.copytree(POLICIES, tmp_path / "policies")
    table = policies / "tests" / "admission.yaml"
    table.write_text(
        table.read_text().replace(
            '  - name: unknown agent\n    task: {agent: ghost, command: ["true"]}\n    allow: false',
            '  - name: unknown agent\n    task: {agent: ghost, command: ["true"]}\n    allow: true',
        )
    )
    with pytest.raises(PolicyError, match="policy test 'unknown agent' failed"):
        load_bundle(policies, AGENTS)


ADMISSION = [
    ({"agent": "researcher"}, True, None),
    ({"agent": "nobody"}, False, "unknown agent 'nobody'"),
    (
        {"agent": "researcher", "image": "docker.io/library/alpine"},
        False,
        "image 'docker.io/library/alpine' is not allowed for agent 'researcher'",
    ),
    (
        {"agent": "researcher", "timeout_s": 901},
        False,
        "timeout_s 901 exceeds agent 'researcher' maximum of 900",
    ),
    (
        {"agent": "researcher", "limits": {"cpus": 4}},
        False,
        "limits.cpus 4 exceeds agent 'researcher' maximum of 1",
    ),
    (
        {"agent": "researcher", "on_behalf_of": "mallory@evil.test"},
        False,
        "agent 'researcher' may not act on behalf of 'mallory@evil.test'",
    ),
    ({"agent": "researcher", "on_behalf_of": "alice@example.com"}, True, None),
    (
        {"agent": "researcher", "scopes": {"egress": [{"host": "github.com"}]}},
        False,
        "egress to github.com (ports null, methods null, paths null) is beyond agent 'researcher' permissions",
    ),
    (
        {"agent": "researcher", "scopes": {"secrets": ["git-token"]}},
        False,
        "secret 'git-token' is beyond agent 'researcher' permissions",
    ),
    ({"agent": "coder", "scopes": {"tools": ["git/merge"]}}, True, None),
    ({"agent": "coder", "image": "registry.example.com/airlock/coder-py312"}, True, None),
    (
        {"agent": "ops"},
        False,
        "agent 'ops' needs isolation class gvisor, but this host's engine has no 'runsc' runtime",
    ),
    (
        {
            "agent": "ops",
            "on_behalf_of": "oncall@example.com",
            "scopes": {"secrets": ["reporting-db"]},
        },
        False,
        "agent 'ops' needs isolation class gvisor, but this host's engine has no 'runsc' runtime",
    ),
]


@pytest.mark.parametrize(("fields", "allowed", "reason"), ADMISSION)
def test_admission_table(fields: dict[str, Any], allowed: bool, reason: str | None) -> None:
    decision = engine_over(POLICIES, AGENTS).admit(parse({"command": ["true"], **fields}))
    assert decision.allowed is allowed, decision.reasons
    if reason:
        assert reason in decision.reasons
        assert decision.grant is None
    else:
        assert decision.grant is not None and decision.grant.agent == fields["agent"]


def test_grant_of_a_narrowed_coder_task() -> None:
    spec = parse(
        {
            "agent": "coder",
            "command": ["true"],
            "on_behalf_of": "dev@example.com",
            "limits": {"memory": "1g"},
            "scopes": {
                "egress": [{"host": "pypi.org", "methods": ["GET"]}],
                "tools": ["git/clone"],
                "secrets": [],
            },
        }
    )
    grant = engine_over(POLICIES, AGENTS).admit(spec).grant
    assert grant is not None
    assert grant.identity == "spiffe://airlock.test/agent/coder"
    assert grant.on_behalf_of == "dev@example.com"
    assert grant.limits.memory == 1 << 30 and grant.limits.cpus == 1 and grant.timeout_s == 300
    assert [(e.host, e.ports, e.methods) for e in grant.egress] == [("pypi.org", (443,), ("GET",))]
    assert [(t.server, t.tool) for t in grant.tools] == [("git", "clone")]
    assert grant.tools[0].args["url"].prefix == "https://git.example.com/"
    assert grant.secrets == () and grant.vault_policies == ("coder-git",)
    assert grant.digest() == Grant.model_validate_json(grant.canonical_json()).digest()


def test_fail_closed_without_a_policy(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PolicyError, match="no valid policy bundle"):
        engine_over(empty, AGENTS).admit(parse({"agent": "demo", "command": ["true"]}))
    with pytest.raises(PolicyError, match="agent registry directory not found"):
        engine_over(POLICIES, tmp_path / "missing").admit(
            parse({"agent": "demo", "command": ["x"]})
        )


def test_broken_agent_files_are_named(tmp_path: Path) -> None:
    agents = shutil.copytree(AGENTS, tmp_path / "agents")
    (agents / "researcher.yaml").write_text("name: researcher\nowner: x\nimages: []\n")
    (agents / "impostor.yaml").write_text((AGENTS / "demo.yaml").read_text())
    with pytest.raises(PolicyError) as caught:
        load_registry(agents)
    text = "\n".join(caught.value.problems)
    assert "researcher.yaml: images: Tuple should have at least 1 item" in text
    assert "researcher.yaml: max_limits: Field required" in text
    assert "impostor.yaml: name 'demo' does not match the file name" in text


@pytest.mark.parametrize("pattern", ["*", "*example.com", "*@*", "*@example", "a*@example.com"])
def test_delegation_patterns_are_exact_names_or_whole_domains(tmp_path: Path, pattern: str) -> None:
    agents = shutil.copytree(AGENTS, tmp_path / "agents")
    demo = (AGENTS / "demo.yaml").read_text().replace("[demo-user]", f'["{pattern}"]')
    assert pattern in demo
    (agents / "demo.yaml").write_text(demo)
    with pytest.raises(PolicyError, match=r"demo.yaml: delegation.users.0"):
        load_registry(agents)


# --- hot reload ----------------------------------------------------------------------------


def test_hot_reload_takes_edits_and_refuses_broken_ones(tmp_path: Path) -> None:
    policies = shutil.copytree(POLICIES, tmp_path / "policies")
    agents = shutil.copytree(AGENTS, tmp_path / "agents")
    engine = engine_over(policies, agents)
    long_task = parse({"agent": "demo", "command": ["true"], "timeout_s": 1200})
    first = engine.admit(long_task)
    assert not first.allowed

    demo = agents / "demo.yaml"
    demo.write_text(demo.read_text().replace("max_timeout_s: 600", "max_timeout_s: 1800"))
    second = engine.admit(long_task)
    assert second.allowed and second.policy_version != first.policy_version

    rego = policies / "admission.rego"
    good = rego.read_text()
    rego.write_text(good + "\nthis is not rego {\n")
    kept = engine.admit(long_task)
    assert kept.allowed and kept.policy_version == second.policy_version
    assert engine.last_error and "admission.rego" in engine.last_error

    rego.write_text(good.replace('"identity": sprintf(', '"who": "x",\n\t"identity": sprintf('))
    assert engine.admit(long_task).policy_version == second.policy_version  # malformed grant
    assert engine.last_error is not None

    rego.write_text(good + "\n# a comment\n")
    third = engine.admit(long_task)
    assert third.allowed and third.policy_version not in (
        first.policy_version,
        second.policy_version,
    )
    assert engine.last_error is None


# --- the grant is always within both the agent and the request --------------------------------

HOSTS = [
    "a.example.com",
    "b.example.com",
    "example.com",
    "evil-example.com",
    "docs.test",
    "x.docs.test",
]
PATTERNS = ["*.example.com", "example.com", "docs.test", "*.docs.test", "*.test"]
METHODS = ["GET", "HEAD", "POST", "DELETE"]
PATHS = ["/a/", "/a/b/", "/c/"]

egress_rules = st.builds(
    dict,
    host=st.sampled_from(PATTERNS),
    ports=st.lists(st.sampled_from([80, 443, 8443]), min_size=1, max_size=3, unique=True),
    methods=st.lists(st.sampled_from(METHODS), min_size=1, max_size=3, unique=True),
    paths=st.lists(st.sampled_from(PATHS), max_size=2, unique=True),
    default=st.booleans(),
)
agents = st.builds(
    lambda egress, tools, secrets, cpus, timeout: Agent.model_validate(
        {
            "name": "gen",
            "owner": "o",
            "images": ["airlock-runner:latest"],
            "max_limits": {"cpus": cpus, "memory": 1 << 30, "pids": 256},
            "max_timeout_s": timeout,
            "egress": egress,
            "mcp": [
                {
                    "name": "srv",
                    "url": "https://m.test/mcp",
                    "tools": [{"name": t, "default": d} for t, d in tools.items()],
                }
            ],
            "secrets": [
                {"name": n, "kind": "kv", "path": f"kv/{n}", "deliver": "task", "default": d}
                for n, d in secrets.items()
            ],
        }
    ),
    st.lists(egress_rules, max_size=4),
    st.dictionaries(st.sampled_from(["t1", "t2", "t3"]), st.booleans(), max_size=3),
    st.dictionaries(st.sampled_from(["s1", "s2", "s3"]), st.booleans(), max_size=3),
    st.sampled_from([0.5, 1, 2]),
    st.sampled_from([60, 600]),
)
requests = st.builds(
    lambda egress, tools, secrets, timeout, cpus: {
        "agent": "gen",
        "command": ["true"],
        "timeout_s": timeout,
        "limits": {"cpus": cpus},
        "scopes": {"egress": egress, "tools": tools, "secrets": secrets},
    },
    st.none()
    | st.lists(
        st.builds(
            dict,
            host=st.sampled_from(HOSTS + PATTERNS),
            ports=st.none()
            | st.lists(st.sampled_from([80, 443, 22]), min_size=1, max_size=2, unique=True),
            methods=st.none()
            | st.lists(st.sampled_from(METHODS), min_size=1, max_size=2, unique=True),
            paths=st.none()
            | st.lists(st.sampled_from([*PATHS, "/a/x", "/d/"]), min_size=1, max_size=2),
        ),
        max_size=3,
    ),
    st.none() | st.lists(st.sampled_from(["srv/t1", "srv/t2", "srv/t4"]), max_size=2, unique=True),
    st.none() | st.lists(st.sampled_from(["s1", "s2", "s4"]), max_size=2, unique=True),
    st.none() | st.sampled_from([30, 600, 1000]),
    st.none() | st.sampled_from([0.25, 1.5, 3]),
)


def covered(host: str, pattern: str) -> bool:
    return host == pattern or (pattern.startswith("*.") and host.endswith(pattern[1:]))


def within_rule(granted: dict[str, Any], rule: dict[str, Any]) -> bool:
    paths_ok = not rule["paths"] or (
        granted["paths"]
        and all(any(p.startswith(r) for r in rule["paths"]) for p in granted["paths"])
    )
    return bool(
        covered(granted["host"], rule["host"])
        and set(granted["ports"]) <= set(rule["ports"])
        and set(granted["methods"]) <= set(rule["methods"])
        and paths_ok
    )


def within_request(granted: dict[str, Any], asked: dict[str, Any]) -> bool:
    return bool(
        granted["host"] == asked["host"]
        and all(
            asked[k] is None or set(granted[k]) <= set(asked[k])
            for k in ("ports", "methods", "paths")
        )
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(agent=agents, request=requests)
def test_grant_is_a_subset_of_agent_and_request(
    bundle: Bundle, agent: Agent, request: dict[str, Any]
) -> None:
    spec = parse(request)
    result = bundle.evaluate(policy_input(spec, agent, DEPLOYMENT))
    if not result["allow"]:
        assert "grant" not in result and result["reasons"]
        return
    grant = Grant.model_validate(result["grant"]).model_dump(mode="json")
    rules = [r.model_dump(mode="json") for r in agent.egress]
    for granted in grant["egress"]:
        assert any(within_rule(granted, rule) for rule in rules), granted
        if spec.scopes.egress is None:
            assert any(r["default"] and r["host"] == granted["host"] for r in rules)
        else:
            asked = [a.model_dump(mode="json") for a in spec.scopes.egress]
            assert any(within_request(granted, a) for a in asked), granted
    agent_tools = {f"srv/{t.name}": t.default for s in agent.mcp for t in s.tools}
    for tool in grant["tools"]:
        key = f"{tool['server']}/{tool['tool']}"
        assert key in agent_tools
        assert (spec.scopes.tools is None and agent_tools[key]) or key in (spec.scopes.tools or ())
    agent_secrets = {s.name: s.default for s in agent.secrets}
    for secret in grant["secrets"]:
        assert secret["name"] in agent_secrets
        assert (spec.scopes.secrets is None and agent_secrets[secret["name"]]) or (
            secret["name"] in (spec.scopes.secrets or ())
        )
    assert grant["limits"]["cpus"] <= agent.max_limits.cpus
    assert grant["timeout_s"] <= agent.max_timeout_s
    if spec.timeout_s is not None:
        assert grant["timeout_s"] == spec.timeout_s


# --- per-request checks against the compiled grant -----------------------------------------

EGRESS_CHECKS = [
    ("api.example.com", 443, "GET", "/x", True, "granted"),
    ("example.com", 443, "GET", "/x", False, "no egress rule of the grant matches this host"),
    ("evil-example.com", 443, "GET", "/x", False, "no egress rule of the grant matches this host"),
    ("api.example.com", 80, "GET", "/x", False, "port 80 is not granted for *.example.com"),
    ("api.example.com", 443, "POST", "/x", False, "method POST is not granted for *.example.com"),
    ("docs.test", 80, "GET", "/api/v1", True, "granted"),
    ("docs.test", 80, "GET", "/admin", False, "path is outside /api/"),
    ("plain.test", 80, "GET", "/", True, "granted"),
]


def compiled() -> CompiledGrant:
    return compiled_grant(
        egress=[
            {"host": "*.example.com", "ports": [443], "methods": ["GET", "HEAD"], "paths": []},
            {"host": "docs.test", "ports": [80, 443], "methods": ["GET"], "paths": ["/api/"]},
            {"host": "plain.test", "ports": [80], "methods": ["GET"], "scheme": "http"},
            {"host": "opaque.test", "ports": [443], "methods": [], "tls": "passthrough"},
        ],
        tools=[
            {
                "server": "git",
                "url": "https://g/mcp",
                "tool": "clone",
                "args": {"url": {"prefix": "https://g/"}, "depth": {"one_of": [1, 10]}},
            }
        ],
    )


@pytest.mark.parametrize(("host", "port", "method", "path", "allowed", "reason"), EGRESS_CHECKS)
def test_compiled_egress_checks(
    host: str, port: int, method: str, path: str | None, allowed: bool, reason: str
) -> None:
    scheme = "http" if host == "plain.test" else "https"
    check = compiled().check_egress(host, port, method, path, scheme)
    assert (check.allowed, check.reason) == (allowed, reason)


@pytest.mark.parametrize(
    ("host", "port", "allowed", "passthrough", "reason"),
    [
        ("docs.test", 443, True, False, "granted; each request inside is decided"),
        ("api.example.com", 443, True, False, "granted; each request inside is decided"),
        ("opaque.test", 443, True, True, "granted (passthrough)"),
        ("api.example.com", 8443, False, False, "port 8443 is not granted for *.example.com"),
        ("plain.test", 80, False, False, "plain.test is granted over plain http only: no tunnel"),
        ("g", 443, True, False, "granted MCP server"),  # an https MCP server's host
        ("g", 80, False, False, "no egress rule of the grant matches this host"),
        ("nowhere.test", 443, False, False, "no egress rule of the grant matches this host"),
    ],
)
def test_tunnels_only_for_https_rules_and_opaque_only_for_passthrough(
    host: str, port: int, allowed: bool, passthrough: bool, reason: str
) -> None:
    check = compiled().check_tunnel(host, port)
    assert (check.allowed, check.passthrough, check.reason) == (allowed, passthrough, reason)


def test_rules_are_named_and_a_report_only_rule_denies_nothing() -> None:
    grant = compiled_grant(
        egress=[
            {
                "name": "docs",
                "host": "docs.test",
                "ports": [80],
                "methods": ["GET"],
                "paths": ["/api/"],
            },
            {
                "name": "rollout",
                "host": "new.test",
                "ports": [80],
                "methods": ["GET"],
                "paths": ["/v2/"],
                "enforce": False,
            },
        ],
        tools=[],
    )
    assert grant.check_egress("docs.test", 80, "GET", "/api/x").rule == "docs"
    refused = grant.check_egress("docs.test", 80, "POST", "/api/x")
    assert (refused.allowed, refused.rule) == (False, "docs")
    reported = grant.check_egress("new.test", 80, "POST", "/v1/x")
    assert reported.allowed and reported.rule == "rollout"
    assert reported.reason == "report-only: would deny: method POST is not granted for new.test"
    assert grant.check_egress("new.test", 80, "GET", "/v2/x").reason == "granted"
    assert not grant.check_egress("other.test", 80, "GET", "/").allowed  # no rule: denied


def test_compiled_tool_checks() -> None:
    grant = compiled()
    assert grant.check_tool("git", "clone", {"url": "https://g/repo", "depth": 1}).allowed
    assert grant.check_tool("git", "clone", {"url": "https://evil/repo"}).reason == (
        "argument 'url' must start with 'https://g/'"
    )
    assert grant.check_tool("git", "clone", {"url": "https://g/r", "depth": 5}).reason == (
        "argument 'depth' is not one of the allowed values"
    )
    assert grant.check_tool("git", "push", {}).reason == "tool git/push is not granted"


# --- through the worker ----------------------------------------------------------------------


def test_rejected_task_leaves_only_its_record(
    settings: Settings,
    store: Store,
    runtime: DockerRuntime,
    credentials: Credentials,
) -> None:
    executor = Executor(settings, store, runtime, credentials=credentials)
    task_id = str(uuid.uuid4())
    state = executor.execute(task_id, {"agent": "ghost", "command": ["true"]})
    assert state is TaskState.REJECTED
    record = store.get(task_id)
    assert record["reason"] == "unknown agent 'ghost'" and "grant" not in record
    assert record["policy_version"].startswith("sha256:")
    keys = set(store.redis.scan_iter(f"{settings.namespace}:task:{task_id}*"))
    assert keys == {store.key(task_id), store.key(task_id, "events"), store.key(task_id, "ended")}
    assert all(store.redis.ttl(key) > 0 for key in keys)  # all of it expires with the record
    assert all(c.task_id != task_id for c in runtime.list_managed(settings.namespace))


def test_admitted_task_runs_with_its_grant(
    settings: Settings,
    store: Store,
    runtime: DockerRuntime,
    credentials: Credentials,
) -> None:
    executor = Executor(settings, store, runtime, credentials=credentials)
    task_id = str(uuid.uuid4())
    probe = "import os; print(open('/sys/fs/cgroup/pids/pids.max').read().strip())"
    state = executor.execute(
        task_id,
        {
            "agent": "tester",
            "command": ["python3", "-c", probe],
            "limits": {"pids": 77},
            "on_behalf_of": "alice",
        },
    )
    assert state is TaskState.SUCCEEDED
    record = store.get(task_id)
    grant = Grant.model_validate_json(record["grant"])
    assert record["grant_hash"] == grant.digest()
    assert grant.limits.pids == 77 and grant.on_behalf_of == "alice"
    assert grant.timeout_s == 300 and grant.identity.endswith("/agent/tester")
    assert "".join(t for _, t in store.iter_logs(task_id)) == "77\n"


def test_gvisor_agent_runs_under_gvisor(
    settings: Settings,
    store: Store,
    runtime: DockerRuntime,
    credentials: Credentials,
) -> None:
    if "runsc" not in runtime.runtimes():
        pytest.skip("runsc is not registered with this Docker engine")
    executor = Executor(settings, store, runtime, credentials=credentials)
    task_id = str(uuid.uuid4())
    state = executor.execute(task_id, {"agent": "sandboxed", "command": ["dmesg"]})
    assert state is TaskState.SUCCEEDED, store.get(task_id)["reason"]
    assert "gVisor" in "".join(t for _, t in store.iter_logs(task_id))
    assert json.loads(store.get(task_id)["grant"])["runtime"] == "runsc"


def test_policy_commands(settings: Settings, tmp_path: Path) -> None:
    check = airlock(settings, "policy", "check", "--json")
    assert check.returncode == 0, check.stderr
    report = json.loads(check.stdout)
    assert report["version"].startswith("sha256:") and all(t["passed"] for t in report["tests"])
    listed = airlock(settings, "agents", "list", "--json")
    assert sorted(a["name"] for a in json.loads(listed.stdout)) == [
        "dba",
        "sandboxed",
        "tester",
        "web",
        "web-gvisor",
    ]
    shown = airlock(settings, "agents", "show", "tester")
    assert json.loads(shown.stdout)["max_timeout_s"] == 600
    assert airlock(settings, "agents", "show", "ghost").returncode == 2

    spec = tmp_path / "task.yaml"
    spec.write_text("agent: tester\ncommand: [ls]\ntimeout_s: 700\n")
    denied = airlock(settings, "policy", "eval", "--file", str(spec))
    assert denied.returncode == 2
    assert json.loads(denied.stdout)["reasons"] == [
        "timeout_s 700 exceeds agent 'tester' maximum of 600"
    ]
    spec.write_text("agent: tester\ncommand: [ls]\n")
    allowed = airlock(settings, "policy", "eval", "--file", str(spec))
    assert allowed.returncode == 0 and json.loads(allowed.stdout)["grant"]["timeout_s"] == 300


def test_cli_rejects_with_exit_2(settings: Settings, worker: Any) -> None:
    proc = airlock(settings, "submit", "-a", "ghost", "--", "true")
    assert proc.returncode == 2
    assert "rejected: unknown agent 'ghost'" in proc.stderr
    waited = airlock(
        settings,
        "submit",
        "-a",
        "tester",
        "--on-behalf-of",
        "eve@evil.test",
        "--wait",
        "--json",
        "--",
        "true",
    )
    assert waited.returncode == 2
    assert (
        json.loads(waited.stdout)["reason"]
        == "agent 'tester' may not act on behalf of 'eve@evil.test'"
    )
    status = airlock(settings, "status", json.loads(waited.stdout)["id"])
    assert "rejected" in status.stdout


# --- the registry is the ceiling -----------------------------------------------------------

# Hostile edits of the shipped admission policy: each widens a grant past the registry.
WIDENINGS = {
    "limits": (
        '"limits": limits,',
        '"limits": {"cpus": 64, "memory": 68719476736, "pids": 32768},',
        "limits.cpus 64",
    ),
    "egress": (
        '"egress": egress,',
        '"egress": array.concat(egress, [{"host": "evil.test", "ports": [443], '
        '"methods": ["POST"], "paths": [], "internal": true, "upstream_tls": false, '
        '"inject": null}]),',
        "egress to evil.test",
    ),
    "identity": (
        '"identity": sprintf("spiffe://%s/agent/%s", [deployment.trust_domain, agent.name]),',
        '"identity": sprintf("spiffe://%s/agent/ops", [deployment.trust_domain]),',
        "is not agent 'coder''s",
    ),
    "secrets": (
        '"secrets": secrets,',
        '"secrets": [{"name": "db", "kind": "database", "path": null, "role": "ops-readonly"}],',
        "secret 'db'",
    ),
    "vault policies": (
        '"vault_policies": agent.vault_policies,',
        '"vault_policies": ["coder-git", "ops-db"],',
        "vault policies ['ops-db']",
    ),
    "image": ('"image": image,', '"image": "attacker/anything:latest",', "image 'attacker"),
    # A rule switched to report-only lets through what it would deny: the registry decides.
    "report only": (
        '"name": rule.name, "enforce": rule.enforce,',
        '"name": rule.name, "enforce": false,',
        "egress to pypi.org",
    ),
    # Resources of an MCP server the registry never offered.
    "mcp reads": (
        '"mcp_reads": mcp_reads,',
        '"mcp_reads": [{"server": "git", "url": "https://git.example.com/mcp", '
        '"internal": false, "resources": ["file:///"], "prompts": []}],',
        "MCP reads of git",
    ),
    # A renamed rule would hide which registry rule allowed a request.
    "rule name": (
        '"name": rule.name, "enforce": rule.enforce,',
        '"name": "harmless", "enforce": rule.enforce,',
        "egress to pypi.org",
    ),
    "tools": (
        '"tools": tools,',
        '"tools": [{"server": "git", "url": "https://git.example.com/mcp", '
        '"tool": "delete_repo", "args": {}, "internal": false}],',
        "tool git/delete_repo",
    ),
}


@pytest.mark.parametrize("what", sorted(WIDENINGS))
def test_a_policy_that_grants_beyond_the_registry_is_refused(tmp_path: Path, what: str) -> None:
    """Rego decides, but the registry stays the ceiling: a bundle edited to widen a grant
    (by mistake or by an attacker who can write policies) admits nothing beyond it."""
    policies = shutil.copytree(POLICIES, tmp_path / "policies")
    shutil.rmtree(policies / "tests")
    old, new, reason = WIDENINGS[what]
    rego = (policies / "admission.rego").read_text()
    assert old in rego
    (policies / "admission.rego").write_text(rego.replace(old, new))
    decision = engine_over(policies, AGENTS).admit(parse({"agent": "coder", "command": ["true"]}))
    assert not decision.allowed and decision.grant is None
    assert any("beyond the registry" in r and reason in r for r in decision.reasons), (
        decision.reasons
    )


HOSTILE_REGISTRY = {
    "a static secret handed over by default": (
        "    deliver: task  # git needs the token itself (a static value: rotate it in Vault)\n",
        "",
        "a static kv value outlives the task",
    ),
    "policy text in a kv path": (
        "path: secret/data/agents/coder/git",
        'path: "secret/data/x\\" {capabilities = [\\"sudo\\"]}\\npath \\"sys/*"',
        "secrets.0.path",
    ),
    "a glob in a kv path": (
        "path: secret/data/agents/coder/git",
        "path: secret/data/*",
        "secrets.0.path",
    ),
    "dot segments in a kv path": (
        "path: secret/data/agents/coder/git",
        "path: secret/data/../../sys/raw",
        "secrets.0.path",
    ),
    "internal on a wildcard host": (
        "    host: pypi.org\n    ports: [443]",
        '    host: "*.example.com"\n    internal: true\n    ports: [443]',
        "internal: true needs an exact host",
    ),
    "a credential for a wildcard host": (
        "    host: pypi.org\n    ports: [443]",
        '    host: "*.example.com"\n    inject: {name: tok, path: secret/data/t}\n    ports: [443]',
        "injected for an exact host only",
    ),
    "the metadata service": (
        "    host: pypi.org\n    ports: [443]",
        "    host: 169.254.169.254\n    internal: true\n    ports: [80]",
        "never an egress target",
    ),
    "two rules of one name": ("name: pypi-files", "name: pypi-index", "names must be unique"),
}


# The agent the hostile edits above are made to: a coder with a KV secret of its own.
HOSTILE_BASE = """# A code agent: pulls packages from the registry and pushes branches to the git host.
name: coder
owner: dev-productivity@example.com
description: Edits code in a scratch checkout, runs tests, and opens branches on the git host.
images: ["airlock-runner:latest", "registry.example.com/airlock/coder-*"]
max_limits: {cpus: 2, memory: 2g, pids: 512}
max_timeout_s: 3600
isolation: runc
vault_policies: [coder-git]
secrets:
  - name: git-token
    kind: kv
    path: secret/data/agents/coder/git
    deliver: task  # git needs the token itself (a static value: rotate it in Vault)
egress:
  - name: pypi-index
    host: pypi.org
    ports: [443]
    methods: [GET, HEAD]
  - name: pypi-files
    host: files.pythonhosted.org
    ports: [443]
    methods: [GET, HEAD]
  - name: git-remote
    host: git.example.com
    ports: [443]
    methods: [GET, HEAD, POST]
mcp:
  - name: git
    url: https://git.example.com/mcp
    tools:
      - name: clone
        args: {url: {prefix: "https://git.example.com/"}}
      - name: open_branch
        args: {branch: {prefix: "agent/", max_length: 100}}
      - name: merge
        default: false
delegation:
  allowed: true
  users: ["*@example.com"]
"""


@pytest.mark.parametrize("what", sorted(HOSTILE_REGISTRY))
def test_registry_values_that_reach_vault_or_the_gateway_are_checked(
    tmp_path: Path, what: str
) -> None:
    agents = shutil.copytree(AGENTS, tmp_path / "agents")
    old, new, problem = HOSTILE_REGISTRY[what]
    assert old in HOSTILE_BASE
    load_registry(agents)  # the registry is sound before the edit
    (agents / "coder.yaml").write_text(HOSTILE_BASE.replace(old, new, 1))
    with pytest.raises(PolicyError) as caught:
        load_registry(agents)
    assert any(problem in p for p in caught.value.problems), caught.value.problems


@pytest.mark.parametrize(
    "key", ["com.docker.compose.project", "airlock.task_id", "io.kubernetes.pod"]
)
def test_caller_labels_stay_out_of_reserved_namespaces(key: str) -> None:
    with pytest.raises(InvalidSpec, match="reserved"):
        parse({"agent": "demo", "command": ["true"], "labels": {key: "x"}})
