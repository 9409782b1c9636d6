"""`airlock image build`: a user's own task image, built on the runner or tools image and
checked against the runner contract by a real build and a real hardened run."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.config import Settings
from tests.conftest import airlock

pytestmark = pytest.mark.docker

GOOD = 'ARG AIRLOCK_BASE\nFROM ${AIRLOCK_BASE}\nCOPY notes.txt /opt/notes.txt\nCMD ["cat", "/opt/notes.txt"]\n'
BROKEN = {
    "its own entrypoint": (
        GOOD + 'ENTRYPOINT ["sh", "-c"]\n',
        "it sets entrypoint ['sh', '-c'], which Airlock replaces with the runner",
    ),
    "root": (GOOD + "USER root\n", "runs as user 'root', not the task user 10001:10001"),
    "a command the task user cannot run": (
        GOOD + "USER root\nRUN chmod 0700 /usr/bin/true\nUSER 10001:10001\n",
        "a hardened run of `true` did not end with the runner's result (exit 126)",
    ),
}
# The runner is mounted, not baked in: an image with no Python and no C library qualifies.
NO_PYTHON = "ARG AIRLOCK_BASE\nFROM ${AIRLOCK_BASE}\nCOPY notes.txt /notes.txt\n"


@pytest.fixture
def built() -> Iterator[list[str]]:
    tags: list[str] = []
    yield tags
    for tag in tags:
        subprocess.run(["docker", "rmi", "-f", tag], capture_output=True, check=False)


def context(tmp_path: Path, dockerfile: str) -> Path:
    (tmp_path / "Dockerfile").write_text(dockerfile)
    (tmp_path / "notes.txt").write_text("built on the runner\n")
    return tmp_path


def test_an_image_on_the_runner_meets_the_contract(
    settings: Settings, tmp_path: Path, built: list[str]
) -> None:
    tag = f"airlock-test-image:{uuid.uuid4().hex[:8]}"
    built.append(tag)
    done = airlock(settings, "image", "build", str(context(tmp_path, GOOD)), "-t", tag, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "meets the runner contract" in done.stdout
    assert "checking the runner contract" in done.stderr  # progress, on stderr
    labels = subprocess.run(
        ["docker", "image", "inspect", "-f", "{{json .Config.Labels}}", tag],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert json.loads(labels)["org.opencontainers.image.base.name"] == "airlock-runner:latest"


def test_an_image_without_python_or_libc_meets_the_contract(
    settings: Settings, tmp_path: Path, built: list[str]
) -> None:
    tag = f"airlock-test-image:{uuid.uuid4().hex[:8]}"
    built.append(tag)
    done = airlock(
        settings, "image", "build", str(context(tmp_path, NO_PYTHON)), "-t", tag,
        "--from", "busybox", "--json", timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"image": tag, "base": "airlock-busybox:latest", "ok": True}
    assert subprocess.run(
        ["docker", "run", "--rm", "--entrypoint", "/bin/sh", tag, "-c", "command -v python3"],
        capture_output=True, check=False,
    ).returncode != 0  # fmt: skip


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_an_image_that_breaks_the_contract_is_refused_with_why(
    settings: Settings, tmp_path: Path, built: list[str], case: str
) -> None:
    dockerfile, problem = BROKEN[case]
    tag = f"airlock-test-image:{uuid.uuid4().hex[:8]}"
    built.append(tag)
    done = airlock(
        settings,
        "image",
        "build",
        str(context(tmp_path, dockerfile)),
        "-t",
        tag,
        "--json",
        timeout=300,
    )
    assert done.returncode == 1, (done.stdout, done.stderr)
    error = json.loads(done.stdout)["error"]
    assert error["message"] == f"{tag} does not meet the runner contract"
    assert any(problem in p for p in error["problems"]), error


def test_a_directory_without_a_dockerfile_is_one_clear_error(
    settings: Settings, tmp_path: Path
) -> None:
    done = airlock(settings, "image", "build", str(tmp_path), "-t", "airlock-test-image:none")
    assert done.returncode == 1 and f"{tmp_path} has no Dockerfile" in done.stderr
    assert done.stderr.count("\n") == 1  # one readable line
