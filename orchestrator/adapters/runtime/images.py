"""Task images of a user's own: built on the runner or tools image, and checked against the
runner contract before any task uses them.

The contract: the image leaves the entrypoint to Airlock (the runner, mounted read-only from
the host, is PID 1: it runs the command as the task user and hands back /workspace/output),
the image runs as the unprivileged task user, and a hardened run of it (no network,
read-only root, no capabilities, the task tmpfs mounts, the runner mounted) completes with
the runner's result frame. The Docker CLI does the build (it streams a build's
progress as users know it).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.errors import RuntimeFailure, ServiceUnavailable

BASES = {
    "runner": "airlock-runner:latest",
    "tools": "airlock-runner-tools:latest",
    "busybox": "airlock-busybox:latest",
}
TASK_USER = "10001:10001"


@dataclass
class Checked:
    image: str
    base: str
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _docker_command() -> str:
    found = shutil.which("docker")
    if found is None:
        raise ServiceUnavailable("docker", "the docker command is not installed")
    return found


def _docker(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_docker_command(), *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def build(
    directory: Path, tag: str, base: str, progress: Callable[[str], None] = lambda line: None
) -> None:
    """`docker build` DIR as TAG, with build argument AIRLOCK_BASE naming the base image
    (a Dockerfile says `ARG AIRLOCK_BASE` and `FROM ${AIRLOCK_BASE}`, or names it itself)."""
    if not (directory / "Dockerfile").is_file():
        raise RuntimeFailure(f"{directory} has no Dockerfile")
    command = [_docker_command(), "build", "--build-arg", f"AIRLOCK_BASE={base}"]
    command += ["--label", f"org.opencontainers.image.base.name={base}", "-t", tag]
    with subprocess.Popen(
        [*command, str(directory)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as proc:
        tail: list[str] = []
        for line in proc.stdout or ():
            progress(line.rstrip())
            tail = [*tail[-20:], line.rstrip()]
    if proc.returncode:
        raise RuntimeFailure("docker build failed:\n" + "\n".join(tail))


def check(image: str, base: str, runner_dir: Path) -> Checked:
    """The runner contract, checked on `image` (see the module docstring)."""
    found = Checked(image, base)
    answer = _docker("image", "inspect", image)
    if answer.returncode:
        found.problems.append(f"no image {image}: {answer.stderr.strip()}")
        return found
    config = json.loads(answer.stdout)[0].get("Config") or {}
    if config.get("Entrypoint"):
        found.problems.append(
            f"it sets entrypoint {config.get('Entrypoint')}, which Airlock replaces with the "
            f"runner (set CMD, never ENTRYPOINT)"
        )
    if config.get("User") != TASK_USER:
        found.problems.append(
            f"runs as user {config.get('User') or 'root'!r}, not the task user {TASK_USER} "
            "(end the Dockerfile with USER 10001:10001)"
        )
    if found.problems:
        return found
    marker = uuid.uuid4().hex
    run = _docker(
        "run", "--rm", "--network", "none", "--read-only", "--cap-drop", "ALL",
        "--security-opt", "no-new-privileges", "--user", TASK_USER,
        "--volume", f"{runner_dir}:/opt/airlock:ro", "--entrypoint", "/opt/airlock/airlock-runner",
        "--tmpfs", "/tmp:rw,nosuid,nodev,noexec", "--tmpfs", "/workspace:rw,nosuid,nodev,uid=10001",
        "--tmpfs", "/run/airlock:rw,nosuid,nodev,noexec,uid=10001",
        "-e", f"AIRLOCK_RESULT_MARKER={marker}", image, "true",
        timeout=120,
    )  # fmt: skip
    if f"\x1e{marker} " not in run.stdout or run.returncode:
        found.problems.append(
            f"a hardened run of `true` did not end with the runner's result (exit "
            f"{run.returncode}): {(run.stderr or run.stdout).strip()[-300:]}"
        )
    return found
