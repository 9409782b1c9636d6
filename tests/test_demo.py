"""The demo is part of the product: it runs here as a newcomer runs it, and what it claims
to show is checked from its summary, not only from its exit code."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.docker


def test_the_demo_shows_the_whole_story_and_leaves_nothing() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRLOCK_")}
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "demo"), "--json"],
        env={**env, "COLUMNS": "100"},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["states"] == {"coder": "succeeded", "ops": "succeeded"}
    assert summary["allowed"] > 0 and summary["denied"] > 0
    assert {"local-index", "default-deny"} <= set(summary["denied_rules"])
    assert summary["secret_injected"] and summary["database_role"]
    assert summary["tool_called"] and summary["tool_refused"]
    assert summary["leaks"] == []
    assert all(summary["checks"].values()), summary["checks"]
    # What a reader sees: the story's own lines, each task's trace, decisions and receipt.
    for line in (
        "coder: installed pytest",
        "coder: tests after:  3 passed",
        "refused: denied by airlock: tool issues/delete_repository is not granted",
        '"rule": "local-index"',
        "ops: 1 open incident(s)",
        "$ airlock trace",
        "vault token",
        "revoked, checked",
    ):
        assert line in done.stdout, line
    # Airlock's own tables fit the terminal's width (the tasks' own lines are theirs).
    story = done.stdout[done.stdout.index("==> a coder task") :].splitlines()
    ours = [line for line in story if not line.startswith(("coder:", "ops:"))]
    assert max(len(line) for line in ours[:-1]) <= 100, max(ours, key=len)
