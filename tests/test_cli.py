"""The `airlock` command end to end: a real worker process, real Redis, real containers.

Every test here runs twice: with Redis as the Celery broker, and with RabbitMQ (Redis
staying the store).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from rich.cells import cell_len

from orchestrator.adapters.runtime.docker_engine import DockerRuntime
from orchestrator.adapters.store import Store
from orchestrator.cli import render
from orchestrator.cli.plain import wrap
from orchestrator.client import Client
from orchestrator.config import Settings
from orchestrator.core.lifecycle import TaskState, advance
from tests.conftest import IN_CI, airlock, airlock_env, running


@pytest.fixture(scope="module", params=["redis", "rabbitmq"])
def cli_settings(request: pytest.FixtureRequest, settings: Settings) -> Settings:
    if request.param == "redis":
        return settings
    url = os.environ.get("AIRLOCK_RABBITMQ_URL") or "amqp://guest:guest@127.0.0.1:5672//"
    try:
        socket.create_connection(("127.0.0.1", 5672), timeout=2).close()
    except OSError as exc:
        message = f"RabbitMQ is not available: {exc} (run scripts/bootstrap)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return replace(settings, broker_url=url, queue=f"{settings.queue}-amqp")


@pytest.fixture(scope="module")
def worker(
    cli_settings: Settings,
    store: Store,
    runtime: DockerRuntime,
    vault: object,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[subprocess.Popen[bytes]]:
    """A real `airlock worker` on this module's broker and queue."""
    name = "amqp" if cli_settings.broker_url else "redis"
    tmp = str(tmp_path_factory.mktemp("worker"))
    with running(
        cli_settings,
        "worker",
        "--concurrency",
        "4",
        log=f"worker-{cli_settings.namespace}-{name}",
        TMPDIR=tmp,
    ) as proc:
        yield proc


def submit_json(cli_settings: Settings, *args: str) -> tuple[int, dict]:  # type: ignore[type-arg]
    proc = airlock(cli_settings, "submit", "--agent", "tester", "--wait", "--json", *args)
    assert proc.stdout, proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def test_submit_wait_json(cli_settings: Settings, worker: subprocess.Popen[bytes]) -> None:
    code, result = submit_json(
        cli_settings,
        "--env",
        "GREETING=hi",
        "--",
        "sh",
        "-c",
        'echo "$GREETING there"; printf 42 > output/answer',
    )
    assert code == 0
    assert result["state"] == "succeeded" and result["exit_code"] == 0
    assert result["logs"] == "hi there\n"
    for key in ("id", "state", "reason", "exit_code", "agent", "created_at", "finished_at"):
        assert key in result
    status = json.loads(airlock(cli_settings, "status", result["id"], "--json").stdout)
    assert {k: v for k, v in result.items() if k != "logs"} == status
    out = airlock(cli_settings, "output", result["id"])
    assert out.stdout == "42"


def test_two_workers_of_one_host_share_a_queue(cli_settings: Settings, tmp_path: Path) -> None:
    """Two workers on the same host and queue are two nodes, and both take tasks."""
    from orchestrator.worker import create_app

    pair = replace(cli_settings, queue=f"{cli_settings.queue}-pair")
    app = create_app(pair)
    with contextlib.ExitStack() as stack:
        for n in (1, 2):
            own = tmp_path / str(n)
            own.mkdir()
            stack.enter_context(running(pair, "worker", "-c", "4", "--no-beat", TMPDIR=str(own)))
        nodes: set[str] = set()
        give_up = time.monotonic() + 60
        while len(nodes) < 2 and time.monotonic() < give_up:
            replies = app.control.ping(timeout=1.0)
            nodes = {name for reply in replies for name in reply if pair.queue in name}
        assert len(nodes) == 2, nodes
        client = Client(pair)
        tasks = [client.submit({"agent": "tester", "command": ["sleep", "2"]}) for _ in range(8)]
        done = [client.wait(task, timeout_s=120) for task in tasks]
    assert all(d["state"] == "succeeded" for d in done), done
    assert {d["worker"] for d in done} == nodes  # four at a time each: both had to take some


@pytest.mark.parametrize(
    ("command", "timeout", "code", "state"),
    [
        # A deadline the quick ones cannot meet by accident, however loaded the machine.
        (["true"], "60", 0, "succeeded"),
        (["sh", "-c", "exit 4"], "60", 4, "failed"),  # the task's own code, as docker run does
        (["sh", "-c", "kill -9 $$"], "60", 137, "failed"),
        (["sleep", "30"], "1", 124, "timed_out"),
    ],
)
def test_exit_codes(
    cli_settings: Settings,
    worker: subprocess.Popen[bytes],
    command: list[str],
    timeout: str,
    code: int,
    state: str,
) -> None:
    got, result = submit_json(cli_settings, "--timeout", timeout, "--", *command)
    assert (got, result["state"]) == (code, state)


def test_human_output_and_logs(cli_settings: Settings, worker: subprocess.Popen[bytes]) -> None:
    proc = airlock(
        cli_settings, "submit", "-a", "tester", "--wait", "--", "sh", "-c", "echo visible"
    )
    assert proc.returncode == 0
    assert "visible" in proc.stdout and "succeeded: exit code 0" in proc.stdout
    assert "running" in proc.stderr  # progress lines
    task_id = proc.stdout.split("task ")[1].split()[0]
    assert airlock(cli_settings, "logs", task_id).stdout == "visible\n"
    listed = json.loads(airlock(cli_settings, "list", "--json", "--state", "succeeded").stdout)
    assert task_id in [t["id"] for t in listed]
    assert task_id in airlock(cli_settings, "list").stdout


def test_cancel_running_task(
    cli_settings: Settings, store: Store, worker: subprocess.Popen[bytes]
) -> None:
    task_id = airlock(cli_settings, "submit", "-a", "tester", "--", "sleep", "60").stdout.strip()
    for _ in range(200):
        if store.get(task_id)["state"] == "running":
            break
        time.sleep(0.05)
    proc = airlock(cli_settings, "cancel", task_id)
    assert proc.returncode == 0 and "cancel requested" in proc.stdout
    status = {}
    for _ in range(200):
        status = json.loads(airlock(cli_settings, "status", task_id, "--json").stdout)
        if status["state"] == "cancelled":
            break
        time.sleep(0.05)
    assert status["state"] == "cancelled" and status["reason"].startswith("cancelled by ")


def test_logs_follow_streams_until_the_end(
    cli_settings: Settings, worker: subprocess.Popen[bytes]
) -> None:
    task_id = airlock(
        cli_settings,
        "submit",
        "-a",
        "tester",
        "--",
        "sh",
        "-c",
        "for i in 1 2 3; do echo line $i; sleep 0.2; done",
    ).stdout.strip()
    proc = airlock(cli_settings, "logs", "--follow", task_id)
    assert proc.stdout == "line 1\nline 2\nline 3\n"


def test_invalid_spec_is_refused_and_nothing_queued(
    cli_settings: Settings, store: Store, runtime: DockerRuntime
) -> None:
    before = store.redis.zcard(store.index_key)
    proc = airlock(cli_settings, "submit", "--agent", "Bad Agent", "--memory", "lots", "--", "true")
    assert proc.returncode == 2
    assert "agent: must be lower-case" in proc.stderr and "limits.memory:" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert store.redis.zcard(store.index_key) == before
    assert store.redis.llen(cli_settings.queue) == 0
    assert runtime.list_managed(cli_settings.namespace) == []


def test_spec_file_and_schema(cli_settings: Settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    schema = json.loads(airlock(cli_settings, "spec", "schema").stdout)
    assert schema["title"] == "Airlock task spec"
    bad = tmp_path / "bad.yaml"
    bad.write_text("agent: tester\ncommand: []\ntimeout_s: -1\n")
    proc = airlock(cli_settings, "spec", "check", str(bad))
    assert proc.returncode == 2 and "timeout_s:" in proc.stderr and "command:" in proc.stderr


def test_unreachable_redis_exits_3(cli_settings: Settings) -> None:
    proc = airlock(
        cli_settings, "submit", "-a", "tester", "--", "true", REDIS_URL="redis://127.0.0.1:1/0"
    )
    assert proc.returncode == 3
    assert proc.stderr.startswith("airlock: redis is unreachable")
    assert "Traceback" not in proc.stderr


def test_unknown_task(cli_settings: Settings) -> None:
    proc = airlock(cli_settings, "status", "nope")
    assert proc.returncode == 2 and "no task with id 'nope'" in proc.stderr


def test_conventions_help_version_and_json_errors(settings: Settings, tmp_path: Path) -> None:
    """-h anywhere, --version, and under --json an error is JSON on stdout with its code."""
    assert "Commands:" in airlock(settings, "-h").stdout
    assert "TASK_ID" in airlock(settings, "status", "-h").stdout
    version = airlock(settings, "--version")
    assert version.returncode == 0 and version.stdout.startswith("airlock ")
    missing = airlock(settings, "status", "nope", "--json")
    assert missing.returncode == 2 and missing.stderr == ""
    assert json.loads(missing.stdout) == {
        "error": {"message": "no task with id 'nope'", "exit_code": 2}
    }
    bad = tmp_path / "bad.yaml"
    bad.write_text("agent: tester\ncommand: []\ntimeout_s: -1\n")
    checked = airlock(settings, "spec", "check", str(bad), "--json")
    error = json.loads(checked.stdout)["error"]
    assert checked.returncode == 2 and error["exit_code"] == 2
    assert {p.split(":")[0] for p in error["problems"]} >= {"command", "timeout_s"}
    good = tmp_path / "good.yaml"
    good.write_text('agent: tester\ncommand: ["true"]\n')
    valid = json.loads(airlock(settings, "spec", "check", str(good), "--json").stdout)
    assert valid["valid"] is True and valid["spec"]["command"] == ["true"]
    down = airlock(settings, "list", "--json", REDIS_URL="redis://127.0.0.1:1/0")
    assert down.returncode == 3 and json.loads(down.stdout)["error"]["exit_code"] == 3


def test_completion_offers_agents_and_task_ids(settings: Settings) -> None:
    client = Client(settings)
    task_id = client.submit({"agent": "tester", "command": ["true"]})
    client.cancel(task_id, by="completion-test")

    def complete(*words: str) -> list[str]:
        proc = airlock(
            settings,
            _AIRLOCK_COMPLETE="bash_complete",
            COMP_WORDS=" ".join(["airlock", *words]),
            COMP_CWORD=str(len(words)),
        )
        return [line.split(",", 1)[1] for line in proc.stdout.splitlines()]

    assert "tester" in complete("submit", "--agent", "te")
    assert task_id in complete("status", task_id[:8])
    assert complete("sta") == ["status"]


def test_task_output_is_never_markup(
    cli_settings: Settings, worker: subprocess.Popen[bytes]
) -> None:
    proc = airlock(
        cli_settings,
        "submit",
        "-a",
        "tester",
        "--wait",
        "--",
        "sh",
        "-c",
        "echo '[red]x[/red] [bold'",
    )
    assert proc.returncode == 0 and "[red]x[/red] [bold\n" in proc.stdout


def test_ctrl_c_while_waiting_exits_130_and_the_task_goes_on(
    cli_settings: Settings, worker: subprocess.Popen[bytes]
) -> None:
    argv = ["submit", "-a", "tester", "--wait", "--json", "--", "sleep", "30"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", *argv],
        env=airlock_env(cli_settings),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    client = Client(cli_settings)
    task_id = None
    for _ in range(600):  # until its task runs
        running_now = client.tasks(state="running", limit=20)
        task_id = next((t["id"] for t in running_now if t["spec"]["command"][0] == "sleep"), None)
        if task_id:
            break
        time.sleep(0.05)
    assert task_id, "the task never ran"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and f"airlock cancel {task_id}" in err
    assert client.status(task_id)["state"] == "running"  # interrupting the wait stops nothing
    client.cancel(task_id, by="ctrl-c-test")
    assert client.wait(task_id, timeout_s=60)["state"] == "cancelled"


def test_status_shows_task_text_as_text(settings: Settings) -> None:
    """A reason a task's owner influences is printed as typed: no markup is interpreted
    and no escape sequence reaches the terminal, coloured or not."""
    store = Store(settings.redis_url, settings.namespace, record_ttl_s=600)
    task_id = str(uuid.uuid4())
    store.create(task_id, {"agent": "tester"})
    hostile = "[red]x[/red] [bold \x1b[2J\x1b]0;owned\x07 done"
    advance(store, task_id, TaskState.REJECTED, hostile)
    for colour in ("", "1"):
        proc = airlock(settings, "status", task_id, FORCE_COLOR=colour)
        assert proc.returncode == 0, proc.stderr
        reason = next(line for line in proc.stdout.splitlines() if "reason" in line)
        assert "[red]x[/red] [bold \\x1b[2J\\x1b]0;owned\\x07 done" in reason
        assert "\x1b[2J" not in proc.stdout and "\x07" not in proc.stdout
    assert "\x1b[1m" in proc.stdout  # the coloured run did colour the names


def test_piped_status_keeps_each_value_on_its_line(settings: Settings) -> None:
    """`airlock status ID | grep reason` finds the whole reason: piped output is not wrapped
    (a terminal's, or the width COLUMNS names, is)."""
    store = Store(settings.redis_url, settings.namespace, record_ttl_s=600)
    task_id = str(uuid.uuid4())
    store.create(task_id, {"agent": "tester"})
    long_reason = " ".join(f"word{i}" for i in range(60))  # about 400 characters
    advance(store, task_id, TaskState.REJECTED, long_reason)
    piped = airlock(settings, "status", task_id, COLUMNS="")
    assert piped.returncode == 0, piped.stderr
    assert any(line.endswith(long_reason) for line in piped.stdout.splitlines()), piped.stdout
    narrow = airlock(settings, "status", task_id, COLUMNS="60")
    assert narrow.returncode == 0, narrow.stderr
    assert max(len(line) for line in narrow.stdout.splitlines()) <= 60, narrow.stdout
    assert "word59" in narrow.stdout and long_reason not in narrow.stdout


def test_piped_list_keeps_each_row_on_its_line(settings: Settings) -> None:
    """`airlock list | grep ID` finds the task's whole row, reason and all; a terminal's
    width (or COLUMNS) still folds the reason."""
    store = Store(settings.redis_url, settings.namespace, record_ttl_s=600)
    task_id = str(uuid.uuid4())
    store.create(task_id, {"agent": "tester"})
    long_reason = " ".join(f"word{i}" for i in range(60))
    advance(store, task_id, TaskState.REJECTED, long_reason)
    piped = airlock(settings, "list", "--limit", "1000", COLUMNS="")
    assert piped.returncode == 0, piped.stderr
    row = [line for line in piped.stdout.splitlines() if task_id in line]
    assert len(row) == 1 and long_reason in row[0], piped.stdout
    narrow = airlock(settings, "list", "--limit", "1000", COLUMNS="100")
    assert narrow.returncode == 0, narrow.stderr
    # Measured in terminal cells: other tasks' reasons hold wide and combining characters.
    assert max(cell_len(line) for line in narrow.stdout.splitlines()) <= 100, narrow.stdout
    assert "word59" in narrow.stdout and long_reason not in narrow.stdout


def test_status_values_wrap_at_words_and_keep_their_colour() -> None:
    lines = wrap([("verified", "green"), (": the token was revoked", "")], 12)
    assert ["".join(text for text, _ in line) for line in lines] == [
        "verified:",
        "the token",
        "was revoked",
    ]
    assert lines[0] == [("verified", "green"), (":", "")]
    folded = wrap([("x" * 20, "")], 8)
    assert ["".join(text for text, _ in line) for line in folded] == ["x" * 8, "x" * 8, "x" * 4]


def test_tables_show_task_text_as_text(capsys: pytest.CaptureFixture[str]) -> None:
    """The rich tables (list, audit, watch) escape markup and make control characters
    visible, as `airlock status` does."""
    render.task_list(
        [
            {
                "id": str(uuid.uuid4()),
                "state": "failed",
                "agent": "tester",
                "created_at": "2026-12-03T10:00:00",
                "reason": "[red]x[/red] \x1b[2J\x07",
            }
        ]
    )
    shown = capsys.readouterr().out
    assert "[red]x[/red]" in shown and "\\x1b[2J\\x07" in shown, shown
    assert "\x1b[2J" not in shown and "\x07" not in shown, shown
