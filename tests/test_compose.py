"""The compose stack is valid and keeps its promises (it cannot be started here: no registry)."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml

from tests.conftest import IN_CI, ROOT

COMPOSE = ROOT / "compose" / "docker-compose.yml"


def rendered() -> dict:  # type: ignore[type-arg]
    if shutil.which("docker-compose") is None:
        if IN_CI:
            pytest.fail("docker-compose is not installed (scripts/bootstrap installs it)")
        pytest.skip("docker-compose is not installed")
    proc = subprocess.run(
        [
            "docker-compose",
            "-f",
            str(COMPOSE),
            "--env-file",
            str(ROOT / "compose" / "env.example"),
            "config",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)


def test_the_stack_validates_and_keeps_its_promises() -> None:
    config = rendered()
    services = config["services"]
    assert {
        "redis",
        "vault",
        "postgres",
        "gateway",
        "worker",
        "beat",
        "otel-collector",
        "jaeger",
        "prometheus",
    } <= set(services)
    for name, service in services.items():
        if name != "cli":
            assert service.get("restart") in ("unless-stopped", "always"), name
    for name in ("redis", "vault", "postgres", "gateway", "worker"):
        assert "healthcheck" in services[name], name
    endpoint = "/run/airlock/endpoints"
    for name in ("gateway", "worker"):
        mounts = [str(v) for v in services[name]["volumes"]]
        assert any(
            f"{endpoint}:{endpoint}" in m or (endpoint in m and "target" in m) for m in mounts
        ), mounts
    assert services["worker"]["environment"]["AIRLOCK_GATEWAY"] == "remote"
    assert services["worker"]["build"]["dockerfile"] == "compose/airlock.Dockerfile"


def test_no_secret_is_written_in_the_compose_file() -> None:
    text = COMPOSE.read_text()
    for line in text.splitlines():
        if re.search(r"(password|token|secret)\s*:", line, re.IGNORECASE):
            value = line.split(":", 1)[1].strip()
            assert value.startswith("${") or value == "", line
    assert "change-me" not in text
