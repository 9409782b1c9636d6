"""`airlock watch` in a real terminal: tmux runs it, the test reads the screen."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time
import uuid
from typing import Any

import pytest

from tests.conftest import IN_CI, airlock, airlock_env


def screen(session: str) -> str:
    return subprocess.run(
        ["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True, check=True
    ).stdout


def row(session: str, task: str, needle: str) -> str:
    """The screen line of `task` once it shows `needle` (or the last screen seen)."""
    text = ""
    for _ in range(200):
        text = screen(session)
        for line in text.splitlines():
            if task in line and needle in line:
                return line
        time.sleep(0.1)
    return text


def start_watch(settings: Any, session: str) -> None:
    """`airlock watch` in a detached tmux session of 160x40."""
    env = airlock_env(settings)
    exports = " ".join(
        f"{k}={shlex.quote(v)}"
        for k, v in env.items()
        if k.startswith(("AIRLOCK_", "REDIS_", "VAULT_", "PATH"))
    )
    # The pane's size, stated: an inherited COLUMNS would otherwise win over the terminal's.
    command = (
        f"env COLUMNS=160 LINES=40 {exports} {shlex.quote(sys.executable)} -m orchestrator watch"
    )
    subprocess.run(
        ["tmux", "new-session", "-d", "-s", session, "-x", "160", "-y", "40", command], check=True
    )


def test_watch_shows_runners_live(settings: Any, worker: Any) -> None:
    if shutil.which("tmux") is None:
        if IN_CI:
            pytest.fail("tmux is not installed (scripts/bootstrap installs it)")
        pytest.skip("tmux is not installed")
    session = f"airlock-watch-{uuid.uuid4().hex[:6]}"
    start_watch(settings, session)
    try:
        assert "airlock runners" in row(session, "airlock runners", "")
        task_id = airlock(settings, "submit", "-a", "tester", "--", "sleep", "2").stdout.strip()
        running = row(session, task_id[:8], "running")
        assert "running" in running and "tester" in running, running
        done = row(session, task_id[:8], "succeeded")
        assert "succeeded" in done and "0 ok / 0 denied" in done and "exit code 0" in done, screen(
            session
        )
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], check=False)
