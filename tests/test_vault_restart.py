"""A Vault restart while tasks are minted: the worker's calls wait for Vault to come back
instead of failing the task, and a call Vault may have acted on is never sent twice."""

from __future__ import annotations

import socket
import threading
import uuid
from collections.abc import Iterator
from dataclasses import replace
from urllib.parse import urlsplit

import pytest

from orchestrator import wiring
from orchestrator.adapters.runtime.docker_engine import DockerRuntime
from orchestrator.adapters.store import Store
from orchestrator.adapters.vault.adapter import Vault
from orchestrator.client import Client
from orchestrator.config import Settings
from orchestrator.core.lifecycle import TaskState
from orchestrator.errors import ServiceUnavailable
from orchestrator.task.executor import Executor

SEALED = b'{"errors":["Vault is sealed"]}'


def read_request(conn: socket.socket) -> None:
    """Read one request: its head, then its Content-Length body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            raise OSError("closed mid-request")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            raise OSError("closed mid-request")
        body += chunk


class FlakyVault:
    """A TCP front for the real Vault that goes down as a restarting Vault does: its port
    refuses connections (`down`), it answers 503 as a sealed Vault does (`sealed`), or it
    reads a request and hangs up unanswered (`drop`: Vault may have acted on it)."""

    def __init__(self, target: str) -> None:
        parts = urlsplit(target)
        self.target = (parts.hostname or "127.0.0.1", parts.port or 8200)
        self.mode = "up"
        self.turned_away = 0  # requests read and not forwarded (sealed, drop)
        self.port = 0
        self._listener: socket.socket | None = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.up()

    @property
    def addr(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self, mode: str = "up") -> None:
        self.mode = mode
        if self._listener is not None:
            return
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        """As a stopped Vault: the port refuses, and open connections are cut."""
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() and stops listening
            listener.close()
        with self._lock:
            for conn in self._open:
                conn.close()
            self._open.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # closed: down
            with self._lock:
                self._open.add(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            if self.mode == "up":
                self._relay(conn)
                return
            read_request(conn)
            self.turned_away += 1
            if self.mode == "sealed":  # one answer per connection: the next may be unsealed
                conn.sendall(
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                    b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(SEALED), SEALED)
                )
        except OSError:
            pass
        finally:
            conn.close()

    def _relay(self, conn: socket.socket) -> None:
        upstream = socket.create_connection(self.target)
        with self._lock:
            self._open.add(upstream)

        def pump(src: socket.socket, dst: socket.socket) -> None:
            try:
                while data := src.recv(65536):
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                dst.close()

        back = threading.Thread(target=pump, args=(upstream, conn), daemon=True)
        back.start()
        pump(conn, upstream)
        back.join()


@pytest.fixture
def flaky(settings: Settings, vault: Vault) -> Iterator[FlakyVault]:
    front = FlakyVault(settings.vault_addr)
    yield front
    front.down()


def test_a_call_waits_out_a_vault_restart(settings: Settings, flaky: FlakyVault) -> None:
    flaky.down()
    threading.Timer(0.5, flaky.up).start()
    patient = Vault(flaky.addr, settings.vault_token, ride_out_s=10)
    assert patient.read("auth/token/lookup-self")  # answered once Vault was back

    flaky.down()
    impatient = Vault(flaky.addr, settings.vault_token)  # the CLI's: answers at once
    with pytest.raises(ServiceUnavailable, match=r"vault is unreachable.*ConnectionRefused"):
        impatient.read("auth/token/lookup-self")


def test_a_sealed_vault_is_waited_out_too(settings: Settings, flaky: FlakyVault) -> None:
    flaky.up("sealed")
    threading.Timer(0.5, flaky.up).start()
    patient = Vault(flaky.addr, settings.vault_token, ride_out_s=10)
    assert patient.read("auth/token/lookup-self")
    assert flaky.turned_away >= 1

    flaky.up("sealed")
    with pytest.raises(ServiceUnavailable, match="sealed"):
        Vault(flaky.addr, settings.vault_token).read("auth/token/lookup-self")


def test_a_call_vault_may_have_acted_on_is_never_sent_twice(
    settings: Settings, flaky: FlakyVault
) -> None:
    """The connection breaks after the request went out: Vault may have minted the token
    already, so sending it again could mint a second one nobody journals."""
    flaky.up("drop")
    patient = Vault(flaky.addr, settings.vault_token, ride_out_s=10)
    with pytest.raises(ServiceUnavailable):
        patient.write("auth/token/create", {"policies": ["default"], "ttl": "60s"})
    assert flaky.turned_away == 1


@pytest.mark.docker
@pytest.mark.parametrize("ride_out_s", [15, 0])
def test_a_task_minted_during_a_vault_restart(
    settings: Settings,
    store: Store,
    runtime: DockerRuntime,
    flaky: FlakyVault,
    ride_out_s: float,
) -> None:
    """The worker's credentials ride out the restart: the task runs. Without, it fails with
    one clear reason and leaves nothing behind."""
    behind = replace(settings, vault_addr=flaky.addr)
    credentials = wiring.credentials(behind, store, ride_out_s=ride_out_s)
    try:
        executor = Executor(behind, store, runtime, credentials=credentials)
        flaky.down()
        threading.Timer(1.0, flaky.up).start()
        task_id = str(uuid.uuid4())
        state = executor.execute(task_id, {"agent": "tester", "command": ["true"]})
        status = Client(settings).status(task_id)
        if ride_out_s:
            assert state is TaskState.SUCCEEDED, status
        else:
            assert state is TaskState.FAILED
            assert status["reason"].startswith("error: vault is unreachable")
            assert status["revocation"]["verified"] and status["revocation"]["token"] is None
        assert not runtime.list_managed(settings.namespace)
        assert task_id not in store.journaled_tasks()
    finally:
        credentials.endpoints.shutdown()
