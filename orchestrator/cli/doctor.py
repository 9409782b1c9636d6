"""`airlock doctor`: is this host ready to run tasks, and if not, what to do about it.

Each check answers ok or a problem with a fix. Checks never change anything.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from urllib.parse import urlsplit

from orchestrator import wiring
from orchestrator.adapters.gateway.interception import GATEWAY_CA, LeafCertificates
from orchestrator.adapters.gateway.service import RemoteGateway
from orchestrator.adapters.vault.setup import JWT_KEY, token_role
from orchestrator.config import Settings, callers_file
from orchestrator.errors import AirlockError, VaultRefused
from orchestrator.policy.agents import load_registry
from orchestrator.policy.engine import load_bundle

MAX_SKEW_S = 2.0


def _without_password(url: str) -> str:
    """A service URL fit to print: its password, if any, replaced."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return parts._replace(netloc=netloc).geturl()


@dataclass(frozen=True)
class Finding:
    check: str
    ok: bool
    detail: str
    fix: str = ""
    warning: bool = False  # ok, but not how production should run

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def _run(name: str, check: Callable[[], str], fix: str) -> Finding:
    try:
        return Finding(name, True, check())
    except AirlockError as exc:
        return Finding(name, False, str(exc), fix)
    except Exception as exc:  # a check that crashes is a finding, not a crash of doctor
        return Finding(name, False, f"{exc.__class__.__name__}: {exc}", fix)


class Doctor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def run(self) -> list[Finding]:
        s = self.settings
        return [
            _run("redis", self.redis, f"start Redis or point REDIS_URL at it ({s.redis_url})"),
            _run(
                "clock", self.clock, "synchronise this host's clock (chrony or systemd-timesyncd)"
            ),
            _run(
                "docker", self.docker, "start dockerd or set DOCKER_HOST (scripts/bootstrap does)"
            ),
            _run("runner", self.runner, "build it: scripts/bootstrap (or set AIRLOCK_RUNNER_DIR)"),
            _run("runner image", self.image, "build it: scripts/bootstrap"),
            _run("vault", self.vault, "start Vault/OpenBao, set VAULT_ADDR and VAULT_TOKEN"),
            self.vault_token(),
            _run("vault setup", self.vault_setup, "run: airlock vault setup"),
            _run("policy bundle", self.policy, "fix the files named, then: airlock policy check"),
            _run(
                "gateway", self.gateway, "start `airlock gateway` or unset AIRLOCK_GATEWAY=remote"
            ),
        ]

    def redis(self) -> str:
        store = wiring.store(self.settings)
        store.ping()
        return f"{_without_password(self.settings.redis_url)} answers"

    def clock(self) -> str:
        skew = abs(time.time() - wiring.store(self.settings).server_time())
        if skew > MAX_SKEW_S:
            raise AirlockError(
                f"this host's clock is {skew:.1f}s off Redis's; task deadlines "
                "and JWT expiry depend on agreeing clocks"
            )
        return f"within {skew * 1000:.0f} ms of Redis"

    def docker(self) -> str:
        runtime = wiring.runtime(self.settings)
        runtime.ping()
        runtimes = sorted(runtime.runtimes())
        extra = "" if "runsc" in runtimes else " (no runsc: gVisor agents will be rejected)"
        server = runtime.api.info().get("SystemTime", "")
        skew = ""
        if server:
            engine = datetime.fromisoformat(server[:26].rstrip("Z")).replace(tzinfo=UTC)
            offset = abs(engine.timestamp() - time.time())
            skew = f", engine clock within {offset:.1f}s"
        return f"engine up, runtimes {', '.join(runtimes)}{extra}{skew}"

    def runner(self) -> str:
        """The binary every task container runs as PID 1, mounted from this host."""
        binary = self.settings.runner_dir / "airlock-runner"
        try:
            elf = binary.read_bytes()
        except OSError as exc:
            raise AirlockError(f"no runner at {binary}: {exc.strerror}") from None
        if not os.access(binary, os.X_OK) or elf[:4] != b"\x7fELF":
            raise AirlockError(f"{binary} is not an executable ELF binary")
        return f"{binary} (sha256 {hashlib.sha256(elf).hexdigest()[:16]})"

    def image(self) -> str:
        api = wiring.runtime(self.settings).api
        try:
            info = api.inspect_image(self.settings.runner_image)
        except Exception as exc:
            raise AirlockError(f"{self.settings.runner_image} is not on this engine") from exc
        return f"{self.settings.runner_image} ({info['Id'][7:19]})"

    def vault(self) -> str:
        wiring.vault(self.settings).ping()
        return f"{self.settings.vault_addr} unsealed, token valid"

    def vault_token(self) -> Finding:
        """A root token works, and can do anything: fine on the local stack, never in
        production (where each component has its own narrow AppRole)."""
        try:
            me = wiring.vault(self.settings).read("auth/token/lookup-self") or {}
        except AirlockError as exc:
            return Finding("vault token", False, str(exc), "set VAULT_TOKEN")
        data = me.get("data") or {}
        policies = sorted(data.get("policies") or [])
        if "root" in policies:
            return Finding(
                "vault token",
                True,
                "ROOT TOKEN: this process may do anything in Vault (fine on the local stack only)",
                "give the worker, gateway and API their own narrow tokens (docs/production.md)",
                warning=True,
            )
        ttl = data.get("ttl")
        return Finding("vault token", True, f"policies {', '.join(policies)}; ttl {ttl}s")

    def vault_setup(self) -> str:
        vault = wiring.vault(self.settings)
        missing = []
        if vault.read(f"transit/keys/{JWT_KEY}", missing_ok=True) is None:
            missing.append(f"transit key {JWT_KEY}")
        try:  # its certificate is public (Vault serves it to any token)
            LeafCertificates(vault).ca_pem()
        except VaultRefused:
            missing.append(f"the gateway CA ({GATEWAY_CA}/), which intercepted HTTPS needs")
        agents = load_registry(self.settings.agents_dir)
        for name in sorted(agents):
            if vault.read(f"auth/token/roles/{token_role(name)}", missing_ok=True) is None:
                missing.append(f"token role {token_role(name)}")
        if missing:
            raise AirlockError("missing in Vault: " + ", ".join(missing))
        return f"JWT key, gateway CA and token roles of {len(agents)} agents present"

    def policy(self) -> str:
        bundle = load_bundle(
            self.settings.policy_dir, self.settings.agents_dir, callers_file(self.settings)
        )
        return f"bundle {bundle.version}, {len(bundle.agents)} agents, tests pass"

    def gateway(self) -> str:
        if self.settings.gateway == "remote":
            answer = RemoteGateway(self.settings)._call({"op": "ping"})
            return f"airlock gateway answers, serving {answer['tasks']} tasks"
        directory = self.settings.endpoint_dir
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / ".doctor"
        probe.touch()
        probe.unlink()
        return f"in-worker gateway; endpoint directory {directory} writable"
