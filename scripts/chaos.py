"""Chaos suite: many tasks through real workers while faults are injected, then count leaks.

The run has its own Redis (append-only, so a restart keeps the records), its own OpenBao
(raft storage, initialised and unsealed here, so a restart keeps tokens and leases), its own
`airlock gateway`, two workers (concurrency 2 each) on RabbitMQ, and `airlock beat`. It uses
the host's Docker engine and PostgreSQL. Faults, in turn: worker SIGKILL, Redis restart, Vault
outage (the process stopped), Vault restart, dockerd restart, gateway restart, cancel storm;
the tasks themselves crash, run out of memory, overrun their deadline or get cancelled.

After the run quiesces it counts: tasks by terminal state, tasks without a reason, tasks
still live, tasks whose container started twice, and what is left of them: containers, Vault
tokens, leases, database roles, endpoint directories and sockets. Every count of a leak must
be 0; the exit status says whether it was.

    scripts/chaos [--tasks 200] [--concurrency 4] [--json]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import itertools
import json
import os
import random
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from orchestrator import config  # noqa: E402
from orchestrator.adapters.runtime.base import LABEL_NAMESPACE, LABEL_TASK  # noqa: E402
from orchestrator.adapters.runtime.docker_engine import DockerRuntime  # noqa: E402
from orchestrator.adapters.vault.adapter import Vault  # noqa: E402
from orchestrator.client import Client  # noqa: E402
from orchestrator.core.lifecycle import TERMINAL, TaskState  # noqa: E402
from orchestrator.errors import AirlockError, VaultRefused  # noqa: E402

# What the tasks do: one kind each, in turn.
KINDS: dict[str, dict[str, Any]] = {
    "ok": {"agent": "tester", "command": ["python3", "-c", "print('ok')"]},
    "sleep": {"agent": "tester", "command": ["sleep", "3"]},
    "secrets": {"agent": "dba", "command": ["sleep", "2"]},
    "crash": {"agent": "tester", "command": ["python3", "-c", "raise SystemExit(3)"]},
    "oom": {
        "agent": "tester",
        "command": ["python3", "-c", "b = b'x' * (512 << 20)"],
        "limits": {"memory": "64m"},
    },
    "deadline": {"agent": "tester", "command": ["sleep", "60"], "timeout_s": 2},
    "cancel": {"agent": "tester", "command": ["sleep", "60"], "timeout_s": 20},
}
ROTATION = ["ok", "sleep", "secrets", "crash", "oom", "deadline", "cancel", "ok", "secrets"]
FAULTS = [
    "worker-kill",
    "redis-restart",
    "vault-outage",
    "cancel-storm",
    "vault-restart",
    "gateway-restart",
    "docker-restart",
]


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(what: str, check: Callable[[], bool], timeout_s: float = 60) -> None:
    give_up = time.monotonic() + timeout_s
    while time.monotonic() < give_up:
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not come up in {timeout_s:.0f}s")


# --- the run's own services ------------------------------------------------------------------
class Redis:
    """Append-only with fsync on every write: a restart loses nothing that was acknowledged."""

    def __init__(self, directory: Path) -> None:
        self.directory, self.port = directory, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(
            "redis",
            lambda: (
                subprocess.run(
                    ["redis-cli", "-p", str(self.port), "ping"], capture_output=True, text=True
                ).stdout.strip()
                == "PONG"
            ),
        )

    def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)


class OpenBao:
    """A real (not dev-mode) server on raft storage: tokens and leases survive a restart."""

    def __init__(self, directory: Path) -> None:
        self.directory, self.port = directory, free_port()
        self.addr = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.token, self.unseal_key = "", ""
        (directory / "data").mkdir(parents=True)
        (directory / "bao.hcl").write_text(
            f'storage "raft" {{\n  path = "{directory / "data"}"\n  node_id = "chaos"\n}}\n'
            f'listener "tcp" {{\n  address = "127.0.0.1:{self.port}"\n  tls_disable = true\n}}\n'
            f'api_addr = "{self.addr}"\ncluster_addr = "http://127.0.0.1:{free_port()}"\n'
        )

    def start(self) -> None:
        bao = Path(sys.executable).parent / "bao"
        self.proc = subprocess.Popen(
            [str(bao), "server", f"-config={self.directory / 'bao.hcl'}"],
            stdout=(self.directory / "bao.log").open("ab"),
            stderr=subprocess.STDOUT,
        )
        anonymous = Vault(self.addr, None)
        wait_until("openbao", lambda: anonymous.read("sys/seal-status") is not None)
        if not self.token:
            init = anonymous.write("sys/init", {"secret_shares": 1, "secret_threshold": 1}) or {}
            self.token, self.unseal_key = init["root_token"], init["keys"][0]
        anonymous.write("sys/unseal", {"key": self.unseal_key})
        vault = self.vault()

        def unsealed() -> bool:
            vault.ping()  # raises until it answers, unsealed, to our token
            return True

        wait_until("openbao unsealed", unsealed)

    def vault(self) -> Vault:
        return Vault(self.addr, self.token)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # in case it is paused
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)

    def pause(self, seconds: float) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        time.sleep(seconds)
        self.proc.send_signal(signal.SIGCONT)


class Processes:
    """The run's `airlock` processes: gateway, workers and beat, each restartable."""

    def __init__(self, env: Callable[[], dict[str, str]], logs: Path) -> None:
        self.env, self.logs = env, logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, *argv: str) -> None:
        sink = (self.logs / f"{name}.log").open("ab")
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "orchestrator", *argv],
            env=self.env(),
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
        sink.close()

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        proc.kill()
        proc.wait(timeout=30)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def restart_docker() -> str:
    """Stop dockerd as an orderly service restart would, and bring it back."""
    if os.environ.get("DOCKER_HOST") or os.geteuid() != 0:
        return "skipped (remote engine or not root)"
    pids = subprocess.run(["pgrep", "-x", "dockerd"], capture_output=True, text=True).stdout
    if not pids.split():
        return "skipped (dockerd is not a local process)"
    for pid in pids.split():
        os.kill(int(pid), signal.SIGTERM)
    wait_until(
        "dockerd to stop",
        lambda: not subprocess.run(["pgrep", "-x", "dockerd"], capture_output=True).stdout,
        90,
    )
    time.sleep(1)
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:  # no supervisor
        for stale in ("/var/run/docker.pid", "/run/docker/containerd/containerd.pid"):
            Path(stale).unlink(missing_ok=True)
        log = (ROOT / ".airlock" / "log" / "dockerd.log").open("ab")
        subprocess.Popen(
            ["dockerd"],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
    wait_until(
        "dockerd",
        lambda: subprocess.run(["docker", "info"], capture_output=True).returncode == 0,
        90,
    )
    return "restarted"


# --- watching Docker ---------------------------------------------------------------------------
class StartCounter:
    """Counts container starts per task from the engine's own event stream (reconnecting)."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.starts: collections.Counter[str] = collections.Counter()
        self.stopping = False
        self._stream: Any = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import docker

        since = int(time.time()) - 1
        while not self.stopping:
            try:
                client = docker.from_env(timeout=5)
                self._stream = client.events(
                    decode=True,
                    since=since,
                    filters={
                        "type": "container",
                        "event": "start",
                        "label": f"{LABEL_NAMESPACE}={self.namespace}",
                    },
                )
                for event in self._stream:
                    since = int(event.get("time", since))
                    task = event.get("Actor", {}).get("Attributes", {}).get(LABEL_TASK)
                    if task and event.get("id"):
                        self.starts[f"{task} {event['id']}"] += 1
            except Exception:
                time.sleep(0.5)

    def twice(self) -> list[str]:
        """Tasks that had more than one container started (a start seen twice is one)."""
        containers = collections.Counter(key.split()[0] for key in self.starts)
        return sorted(task for task, count in containers.items() if count > 1)

    def stop(self) -> None:
        self.stopping = True
        with contextlib.suppress(Exception):
            self._stream.close()


# --- the run -----------------------------------------------------------------------------------
class Chaos:
    def __init__(self, tasks: int, concurrency: int, seed: int) -> None:
        self.count, self.concurrency = tasks, concurrency
        self.random = random.Random(seed)
        self.namespace = f"chaos{uuid.uuid4().hex[:8]}"
        self.dir = Path(tempfile.mkdtemp(prefix="airlock-chaos-"))
        self.endpoints = Path(tempfile.mkdtemp(prefix="ac-", dir="/tmp"))  # short socket paths
        self.redis = Redis(self.dir)
        self.bao = OpenBao(self.dir / "bao")
        self.faults: list[dict[str, Any]] = []
        self.procs = Processes(self.env, self.dir)
        self.kinds: dict[str, str] = {}
        self.stop_faults = threading.Event()
        self.feeding = threading.Thread()

    # -- set-up ---------------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIRLOCK_")}
        env.update(
            {
                "REDIS_URL": self.redis.url,
                "VAULT_ADDR": self.bao.addr,
                "VAULT_TOKEN": self.bao.token,
                "AIRLOCK_NAMESPACE": self.namespace,
                "AIRLOCK_AGENTS_DIR": str(ROOT / "tests" / "agents"),
                "AIRLOCK_GATEWAY": "remote",
                "AIRLOCK_ENDPOINT_DIR": str(self.endpoints),
                "AIRLOCK_HEARTBEAT_S": "1",
                "AIRLOCK_REAP_PERIOD_S": "5",
                "AIRLOCK_STOP_GRACE_S": "1",
                "AIRLOCK_TRACING": "off",
                "AIRLOCK_WORKER_CONCURRENCY": str(max(self.concurrency // 2, 1)),
            }
        )
        for name in (
            "AIRLOCK_POSTGRES_URL",
            "AIRLOCK_RUNNER_IMAGE",
            "AIRLOCK_TICKET_KEY",
            "AIRLOCK_TICKET_PUBLIC_KEY",
        ):
            if os.environ.get(name):
                env[name] = os.environ[name]
        if os.environ.get("AIRLOCK_RABBITMQ_URL"):  # redelivery on worker loss is immediate
            env["AIRLOCK_BROKER_URL"] = os.environ["AIRLOCK_RABBITMQ_URL"]
        return env

    def set_up(self) -> None:
        say(f"chaos: namespace {self.namespace}, services in {self.dir}")
        self.redis.start()
        self.bao.start()
        vault = self.bao.vault()
        vault.write("sys/mounts/secret", {"type": "kv", "options": {"version": "2"}})
        vault.write("secret/data/airlock-tests/api", {"data": {"key": uuid.uuid4().hex}})
        setup = subprocess.run(
            [sys.executable, "-m", "orchestrator", "vault", "setup"],
            env=self.env(),
            capture_output=True,
            text=True,
        )
        if setup.returncode:
            raise RuntimeError(f"vault setup failed: {setup.stderr.strip()}")
        self.settings = config.load(self.env())
        self.client = Client(self.settings)
        self.runtime = DockerRuntime(self.settings.docker_host)
        self.db_roles_before = db_roles()
        self.procs.start("gateway", "gateway")
        wait_until("gateway", lambda: (self.endpoints / "gateway.sock").exists())
        for n in (1, 2):
            self.start_worker(n)
        self.procs.start("beat", "beat", "--loglevel", "WARNING")

    def start_worker(self, n: int) -> None:
        per = str(max(self.concurrency // 2, 1))
        self.procs.start(
            f"worker{n}", "worker", "--no-beat", "--concurrency", per, "--loglevel", "WARNING"
        )

    # -- faults ---------------------------------------------------------------------------
    def inject(self, fault: str) -> str:
        if fault == "worker-kill":
            n = self.random.choice((1, 2))
            self.procs.kill(f"worker{n}")
            time.sleep(1)
            self.start_worker(n)
            return f"worker{n} SIGKILLed and restarted"
        if fault == "redis-restart":
            self.redis.stop(signal.SIGKILL)
            time.sleep(1)
            self.redis.start()
            return "redis SIGKILLed and restarted"
        if fault == "vault-outage":
            self.bao.pause(4)
            return "openbao stopped for 4s"
        if fault == "vault-restart":
            self.bao.stop()
            self.bao.start()
            return "openbao restarted and unsealed"
        if fault == "gateway-restart":
            self.procs.kill("gateway")
            self.procs.start("gateway", "gateway")
            return "gateway SIGKILLed and restarted"
        if fault == "docker-restart":
            return f"dockerd {restart_docker()}"
        return self.cancel_storm()

    def cancel_storm(self) -> str:
        live = [t for t in list(self.kinds) if self.state(t) not in TERMINAL]
        chosen = [t for t in live if self.kinds[t] == "cancel"] or live
        chosen = self.random.sample(chosen, min(6, len(chosen)))

        def cancel(task_id: str) -> None:
            with contextlib.suppress(AirlockError):
                self.client.cancel(task_id, by="chaos")

        threads = [threading.Thread(target=cancel, args=(t,)) for t in chosen for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return f"{len(threads)} cancels of {len(chosen)} tasks at once"

    def fault_loop(self, every_s: float) -> None:
        for fault in itertools.cycle(FAULTS):
            if self.stop_faults.wait(every_s):
                return
            started = time.monotonic()
            try:
                what = self.inject(fault)
            except Exception as exc:  # a fault that could not be injected is reported
                what = f"could not inject: {exc}"
            took = time.monotonic() - started
            self.faults.append({"fault": fault, "what": what, "seconds": round(took, 1)})
            say(f"  fault {len(self.faults):>2}: {fault:<16} {what} ({took:.1f}s)")

    # -- tasks ----------------------------------------------------------------------------
    def state(self, task_id: str) -> TaskState | None:
        try:
            return TaskState(self.client.store.get(task_id)["state"])
        except AirlockError:
            return None

    def feed(self, pace_s: float) -> None:
        """Submit every task, keeping at most twice the concurrency waiting or running, so
        that faults land while tasks are in flight over the whole run."""
        for i in range(self.count):
            kind = ROTATION[i % len(ROTATION)]
            while (
                sum(self.state(t) not in TERMINAL for t in list(self.kinds)) >= 2 * self.concurrency
            ):
                time.sleep(0.2)
            for _ in range(300):  # Redis or the broker may be down for a moment
                try:
                    self.kinds[self.client.submit(KINDS[kind])] = kind
                    break
                except AirlockError:
                    time.sleep(0.2)
            else:
                raise RuntimeError("could not submit a task for a minute")
            time.sleep(pace_s)
        say(f"chaos: all {self.count} tasks submitted")

    def ended(self) -> collections.Counter[str]:
        states = collections.Counter(str(self.state(t) or "unknown") for t in list(self.kinds))
        return states

    def wait_quiet(self, timeout_s: float) -> None:
        give_up, last = time.monotonic() + timeout_s, 0.0
        while time.monotonic() < give_up:
            states = self.ended()
            done = sum(n for s, n in states.items() if s in {t.value for t in TERMINAL})
            if time.monotonic() - last > 10:
                last = time.monotonic()
                say(
                    f"  {done}/{self.count} ended: "
                    + ", ".join(f"{s} {n}" for s, n in sorted(states.items()))
                )
            cycled = len(self.faults) >= len(FAULTS) or self.stop_faults.is_set()
            if done == self.count and not self.feeding.is_alive() and cycled:
                return
            time.sleep(1)

    # -- the count ------------------------------------------------------------------------
    def count_leaks(self, counter: StartCounter) -> dict[str, Any]:
        self.await_docker()  # a restart the last fault began may still be under way
        records = {t: self.client.store.get(t) for t in self.kinds}
        terminal = {t: r for t, r in records.items() if TaskState(r["state"]) in TERMINAL}
        vault = self.bao.vault()
        left_tokens = []
        for accessor in vault.list("auth/token/accessors"):
            token = token_behind(vault, accessor)
            task_id = (token.get("meta") or {}).get("task_id")
            if task_id in self.kinds or "refused" in token:
                record = records.get(task_id) or {}
                left_tokens.append(
                    {
                        "task": task_id,
                        "kind": self.kinds.get(task_id),
                        "state": record.get("state"),
                        "reason": record.get("reason", token.get("refused", "")),
                        "token": token.get("display_name", accessor),
                        "ttl": token.get("ttl"),
                    }
                )
        left_leases = list(leases(vault, "sys/leases/lookup/"))
        sockets = [p for p in self.endpoints.rglob("*") if stat.S_ISSOCK(p.lstat().st_mode)]
        return {
            "tasks": self.count,
            "by_state": dict(
                sorted(collections.Counter((r["state"]) for r in records.values()).items())
            ),
            "by_kind": {
                kind: dict(
                    collections.Counter(
                        records[t]["state"] for t, k in self.kinds.items() if k == kind
                    )
                )
                for kind in dict.fromkeys(ROTATION)
            },
            "not_ended": sorted(set(records) - set(terminal)),
            "reasons": dict(
                collections.Counter(
                    r.get("reason", "")[:90] for r in terminal.values() if r["state"] != "succeeded"
                ).most_common()
            ),
            # A well-behaved task (ok, sleep, secrets) that failed says which fault hit it.
            "reasons_by_kind": {
                kind: dict(
                    collections.Counter(
                        r.get("reason", "")[:80]
                        for t, r in terminal.items()
                        if self.kinds[t] == kind and r["state"] != "succeeded"
                    ).most_common()
                )
                for kind in dict.fromkeys(ROTATION)
            },
            "left_tokens": left_tokens,
            "left_sockets": [str(p) for p in sockets],
            "left_leases": left_leases,
            "without_reason": sorted(t for t, r in terminal.items() if not r.get("reason")),
            "run_twice": counter.twice(),
            "leaked": {
                "containers": len(self.runtime.list_managed(self.namespace)),
                "vault_tokens": len(left_tokens),
                "leases": len(left_leases),
                "database_roles": len(db_roles() - self.db_roles_before),
                "endpoints": sum(
                    1 for p in (self.endpoints / self.namespace).glob("*") if p.is_dir()
                )
                if (self.endpoints / self.namespace).exists()
                else 0,
                "sockets": len(sockets),
                "credential_journal": len(self.client.store.journaled_tasks()),
            },
            "faults": self.faults,
        }

    def await_docker(self, seconds: float = 60.0) -> None:
        until = time.monotonic() + seconds
        while True:
            try:
                self.runtime.ping()
                return
            except AirlockError:
                if time.monotonic() > until:
                    raise
                time.sleep(0.5)

    def run(self, fault_every_s: float, timeout_s: float) -> dict[str, Any]:
        counter = StartCounter(self.namespace)
        try:
            self.set_up()
            pace = len(FAULTS) * fault_every_s / self.count  # one fault cycle at least
            self.feeding = threading.Thread(target=self.feed, args=(pace,), daemon=True)
            self.feeding.start()
            faults = threading.Thread(target=self.fault_loop, args=(fault_every_s,))
            faults.start()
            self.wait_quiet(timeout_s)
            self.stop_faults.set()
            faults.join()
            say("chaos: faults stopped; two reaper periods for the reaper to catch up")
            self.wait_quiet(60)
            time.sleep(2 * self.settings.reap_period_s + 3 * self.settings.heartbeat_s)
            self.procs.stop_all()
            report = self.count_leaks(counter)
            if leak_total(report):  # the run's logs outlive it, to find out why
                kept = ROOT / ".airlock" / "log" / f"chaos-{self.namespace}"
                shutil.copytree(self.dir, kept, ignore=shutil.ignore_patterns("data", "*.rdb"))
                report["logs"] = str(kept)
            return report
        finally:
            counter.stop()
            self.clean_up()

    def clean_up(self) -> None:
        """Whatever the run left (counted above already) goes, and the run's services stop."""
        self.stop_faults.set()
        self.procs.stop_all()
        if self.bao.proc and self.redis.proc:
            subprocess.run(
                [sys.executable, "-m", "orchestrator", "gc"], env=self.env(), capture_output=True
            )
        runtime = DockerRuntime(os.environ.get("DOCKER_HOST"))
        for container in runtime.list_managed(self.namespace):
            runtime.remove(container.id)
        self.redis.stop()
        self.bao.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
        shutil.rmtree(self.endpoints, ignore_errors=True)


def token_behind(vault: Vault, accessor: str) -> dict[str, Any]:
    """What Vault says of the token behind `accessor` ({} once it is gone). Vault refuses,
    even to root, the lookup of a token it is still restoring after a restart, or whose
    revocation is queued, or whose accessor outlived it: the lookup is tried again for a
    while (after a tidy, which drops dangling accessors), and a refusal that stays is
    reported as a token left behind, since it proves nothing."""
    refused = ""
    for attempt in range(15):
        try:
            answer = vault.write(
                "auth/token/lookup-accessor", {"accessor": accessor}, absent_ok=True
            )
            return (answer or {}).get("data") or {}
        except VaultRefused as exc:
            refused = str(exc)
            if attempt == 0:
                vault.write("auth/token/tidy", {})
            time.sleep(2)
    return {"refused": f"lookup still refused: {refused}"}


def leases(vault: Vault, prefix: str) -> Iterator[str]:
    for key in vault.list(prefix):
        if key.endswith("/"):
            yield from leases(vault, prefix + key)
        else:
            yield prefix + key


def db_roles() -> set[str]:
    """PostgreSQL roles that Vault created (its default names start with 'v-')."""
    out = subprocess.run(
        [
            "su",
            "postgres",
            "-c",
            "psql -Atc \"SELECT rolname FROM pg_roles WHERE rolname LIKE 'v-%'\"",
        ],
        capture_output=True,
        text=True,
        cwd="/",
    )
    if out.returncode:
        raise RuntimeError(f"cannot list PostgreSQL roles: {out.stderr.strip()}")
    return set(out.stdout.split())


def leak_total(report: dict[str, Any]) -> int:
    return int(
        sum(report["leaked"].values())
        + len(report["not_ended"])
        + len(report["without_reason"])
        + len(report["run_twice"])
    )


def show(report: dict[str, Any]) -> None:
    print(f"chaos: {report['tasks']} tasks, {len(report['faults'])} faults")
    print("  by state:   " + ", ".join(f"{s} {n}" for s, n in report["by_state"].items()))
    for kind, states in report["by_kind"].items():
        print(f"    {kind:<9} " + ", ".join(f"{s} {n}" for s, n in sorted(states.items())))
    print("  why the others ended:")
    for kind, reasons in report["reasons_by_kind"].items():
        for reason, n in reasons.items():
            print(f"    {n:>4}  {kind:<9} {reason}")
    faults = collections.Counter(f["fault"] for f in report["faults"])
    print("  faults:     " + ", ".join(f"{f} {n}" for f, n in faults.items()))
    print(f"  not ended        {len(report['not_ended'])}")
    print(f"  without reason   {len(report['without_reason'])}")
    print(f"  run twice        {len(report['run_twice'])}")
    for what, n in report["leaked"].items():
        print(f"  leaked {what:<18} {n}")
    for token in report["left_tokens"]:
        print(
            f"    token of {token['kind']} task {token['task']} ({token['state']}: "
            f"{token['reason']}), ttl {token['ttl']}s"
        )
    for lease in report["left_leases"]:
        print(f"    lease {lease}")
    if report.get("logs"):
        print(f"  the run's logs: {report['logs']}")
    print("chaos: " + ("nothing leaked" if leak_total(report) == 0 else "LEAKS FOUND"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--fault-every", type=float, default=4.0, metavar="SECONDS")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    chaos = Chaos(args.tasks, args.concurrency, args.seed)
    report = chaos.run(args.fault_every, timeout_s=120 + args.tasks * 3)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        show(report)
    sys.exit(1 if leak_total(report) else 0)


if __name__ == "__main__":
    main()
