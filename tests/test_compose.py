"""The compose files keep their promises, read as Docker Compose reads them (no engine
needed): secrets only as files, a health check per long-running service, start order on
health, a worker grace period longer than a task's, the same endpoint path everywhere, and
the upstream-image variant differing only in images. tests/test_stack.py starts the stack."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import IN_CI, ROOT

COMPOSE = ROOT / "compose"
SERVICES = {"redis", "rabbitmq", "postgres", "vault", "setup", "api", "gateway", "worker", "beat"}


def rendered(*files: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    if (
        shutil.which("docker") is None
        or subprocess.run(["docker", "compose", "version"], capture_output=True).returncode
    ):
        if IN_CI:
            pytest.fail("docker compose is not installed (scripts/bootstrap installs it)")
        pytest.skip("docker compose is not installed")
    args = [arg for f in files for arg in ("-f", str(COMPOSE / f))]
    proc = subprocess.run(
        ["docker", "compose", *args, "config", "--no-interpolate", "--no-path-resolution"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/local/bin:/usr/bin:/bin", **(env or {})},
    )
    assert proc.returncode == 0, proc.stderr
    config: dict[str, Any] = yaml.safe_load(proc.stdout)
    return config


def test_the_stack_has_its_services_each_checked_and_ordered_on_health() -> None:
    services = rendered("docker-compose.yml")["services"]
    assert set(services) == SERVICES
    for name, service in services.items():
        if name == "setup":
            assert service["restart"] == "no"
            continue
        assert service["restart"] == "unless-stopped", name
        assert "healthcheck" in service or name == "beat", name
    # Each service's health check exercises that service, not a generic "is it running".
    checks = {
        name: " ".join(s["healthcheck"]["test"])
        for name, s in services.items()
        if "healthcheck" in s
    }
    assert "ping" in checks["redis"] and "pg_isready" in checks["postgres"]
    assert "bao status" in checks["vault"] and "/v1/health" in checks["api"]
    assert "gateway.sock" in checks["gateway"] and "airlock-worker-alive" in checks["worker"]
    assert "doctor" not in " ".join(checks.values())
    # Airlock's parts start after the set-up did its work, and on their services' health.
    for name in ("api", "gateway", "worker"):
        assert (
            services[name]["depends_on"]["setup"]["condition"] == "service_completed_successfully"
        )
    assert services["setup"]["depends_on"]["vault"]["condition"] == "service_healthy"


def test_secrets_are_files_and_each_component_gets_only_its_own() -> None:
    config = rendered("docker-compose.yml")
    services = config["services"]
    for name, service in services.items():
        for key, value in (service.get("environment") or {}).items():
            # No credential in a URL, no password or token by value: only paths to files.
            assert "@" not in str(value), (name, key)
            if any(word in key for word in ("PASSWORD", "TOKEN", "SECRET")):
                assert key.endswith("_FILE"), (name, key)
    for secret in config["secrets"].values():
        assert secret["file"].startswith("../.airlock/stack/secrets/")

    def mine(service: str) -> set[str]:
        return {s["source"] for s in services[service].get("secrets", [])}

    assert mine("api") >= {"redis-url-api", "broker-url-api", "approle-api-secret", "ticket-key"}
    assert mine("worker") >= {"redis-url-worker", "broker-url-worker", "approle-worker-secret"}
    assert mine("gateway") >= {"redis-url-gateway", "approle-gateway-secret"}
    # The private ticket key is the front door's alone; a worker cannot admit a task.
    assert [s for s in services if "ticket-key" in mine(s)] == ["api"]
    for service in ("worker", "gateway", "beat"):
        assert not {s for s in mine(service) if s.endswith("-api") or "api-" in s}, service
    assert not {s for s in mine("api") if "worker" in s or "gateway" in s}


def test_a_stopped_worker_outlasts_its_drain_and_its_tasks_grace() -> None:
    services = rendered("docker-compose.yml")["services"]
    worker = services["worker"]
    grace = float(worker["environment"]["AIRLOCK_STOP_GRACE_S"])
    drain = float(worker["environment"]["AIRLOCK_DRAIN_S"])
    assert worker["stop_grace_period"] in ("1m0s", "60s")
    assert drain + 2 * grace < 60  # drained, then cancelled and torn down, within it
    endpoint = "/run/airlock-stack/endpoints"
    for name in ("gateway", "worker"):
        assert services[name]["environment"]["AIRLOCK_ENDPOINT_DIR"] == endpoint
        assert any(
            v["source"] == endpoint and v["target"] == endpoint for v in services[name]["volumes"]
        )


def test_upstream_images_change_only_the_images() -> None:
    local = rendered("docker-compose.yml")["services"]
    upstream = rendered("docker-compose.yml", "images-upstream.yml")["services"]
    changed = {name for name in local if local[name]["image"] != upstream[name]["image"]}
    assert changed == {"redis", "rabbitmq", "postgres", "vault"}
    for name in local:
        assert {k: v for k, v in local[name].items() if k != "image"} == {
            k: v for k, v in upstream[name].items() if k != "image"
        }


def test_a_worker_host_joins_by_address_with_its_own_credentials() -> None:
    host = rendered("worker-host.yml", env={"AIRLOCK_HOST": "h2"})
    [service] = host["services"].values()
    assert host["networks"]["airlock"]["external"] is True
    assert "privileged" not in service  # the capabilities its engine needs, no more
    secrets = {s["source"]: host["secrets"][s["source"]]["file"] for s in service["secrets"]}
    assert secrets["approle-worker-secret"].endswith("secret_id.${AIRLOCK_HOST}")
    assert "ticket-key" not in secrets
    for script in (COMPOSE / "services").glob("*.sh"):
        assert script.read_text().startswith("#!/bin/sh\n"), script  # official images too
    assert Path(COMPOSE / "services" / "worker-host.sh").exists()


def test_observability_adds_a_collector_jaeger_v2_and_prometheus() -> None:
    config = rendered("docker-compose.yml", "observability.yml")
    services = config["services"]
    assert {"otel-collector", "jaeger", "prometheus"} <= set(services)
    assert services["jaeger"]["image"].startswith("jaegertracing/jaeger:2.")  # v1 is over
    collector = yaml.safe_load((COMPOSE / "otel-collector.yaml").read_text())
    assert collector["exporters"]["otlp/jaeger"]["endpoint"] == "jaeger:4317"
    # Airlock's parts send OTLP to it when scripts/stack sets the endpoint.
    for name in ("api", "worker", "gateway"):
        assert (
            services[name]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"]
            == "${AIRLOCK_OTLP_ENDPOINT:-}"
        )
