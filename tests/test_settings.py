"""Settings: secrets may come from files (container secrets), never only the environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator import config
from orchestrator.errors import ConfigError


def test_secrets_are_read_from_the_files_their_FILE_variables_name(tmp_path: Path) -> None:
    (tmp_path / "worker-redis").write_text("redis://airlock-worker:pw@redis:6379/0\n")
    (tmp_path / "token").write_text("s.root\n")
    (tmp_path / "broker").write_text("amqp://airlock-worker:pw@rabbitmq:5672/airlock\n")
    env = {
        "REDIS_URL": "redis://127.0.0.1:6379/0",
        "AIRLOCK_REDIS_URL_WORKER_FILE": str(tmp_path / "worker-redis"),
        "VAULT_TOKEN_FILE": str(tmp_path / "token"),
        "AIRLOCK_BROKER_URL_WORKER_FILE": str(tmp_path / "broker"),
    }
    worker = config.load(env, component="worker")
    assert worker.redis_url == "redis://airlock-worker:pw@redis:6379/0"
    assert worker.vault_token == "s.root"
    assert worker.broker_url == "amqp://airlock-worker:pw@rabbitmq:5672/airlock"
    # Another component does not take the worker's own values.
    assert config.load(env, component="api").redis_url == "redis://127.0.0.1:6379/0"


def test_a_FILE_variable_of_anything_but_a_secret_is_not_read(tmp_path: Path) -> None:
    settings = config.load({"AIRLOCK_RUNNER_IMAGE_FILE": str(tmp_path / "absent")})
    assert settings.runner_image == config.Settings().runner_image


def test_an_unreadable_secret_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"VAULT_TOKEN_FILE=.*absent"):
        config.load({"VAULT_TOKEN_FILE": str(tmp_path / "absent")})
