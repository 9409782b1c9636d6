"""The composition root: the one place that builds adapters from `Settings`.

Interfaces (the CLI, the client, the worker, the gateway service) ask here for what they
need, so every process builds its store, engine, Vault client and gateway the same way.
`ride_out_s` is how long calls wait out a restart of the service behind them: long-running
processes (worker, gateway) ride one out, a command answers at once.

Each builder imports the stack it builds when it is called (lazy on purpose): the client
and the CLI's read commands build a store here without loading Docker, Vault or Rego.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from orchestrator.adapters.store import Store
from orchestrator.config import Settings, callers_file, database_addresses, jwt_issuer
from orchestrator.errors import AirlockError

if TYPE_CHECKING:
    from orchestrator.adapters.gateway.audit import AuditLog
    from orchestrator.adapters.gateway.service import GatewayService
    from orchestrator.adapters.runtime.docker_engine import DockerRuntime
    from orchestrator.adapters.vault.adapter import Vault
    from orchestrator.policy.engine import PolicyEngine
    from orchestrator.task.credentials import Credentials
    from orchestrator.task.executor import Executor

# What the worker and the gateway ride out: a restart of Redis, Docker or Vault.
SERVICE_RIDE_OUT_S = 15.0


def store(settings: Settings, ride_out_s: float = 0.0) -> Store:
    return Store(
        settings.redis_url, settings.namespace, settings.record_ttl_s, ride_out_s=ride_out_s
    )


def runtime(settings: Settings, ride_out_s: float = 0.0, connections: int = 10) -> DockerRuntime:
    """Raises ServiceUnavailable when DOCKER_HOST names no engine it can use."""
    from orchestrator.adapters.runtime.docker_engine import DockerRuntime

    return DockerRuntime(settings.docker_host, max_pool_size=connections, ride_out_s=ride_out_s)


def vault(settings: Settings, ride_out_s: float = 0.0) -> Vault:
    from orchestrator.adapters.vault.adapter import AppRoleLogin, Vault
    from orchestrator.adapters.vault.setup import COMPONENT_AUTH

    if settings.vault_approle is not None:
        login = AppRoleLogin.from_dir(settings.vault_approle, COMPONENT_AUTH)
        return Vault(settings.vault_addr, None, ride_out_s=ride_out_s, login=login)
    return Vault(settings.vault_addr, settings.vault_token, ride_out_s=ride_out_s)


def audit_log(settings: Settings, store: Store, client: Vault | None = None) -> AuditLog:
    """The egress audit, anchoring its chain heads signed by Vault to this host's file."""
    from orchestrator.adapters.gateway.audit import AuditLog
    from orchestrator.adapters.vault.audit_key import AuditSigner

    signer = AuditSigner(client or vault(settings))
    return AuditLog(store, signer=signer, anchor_file=settings.audit_anchor_file)


def credentials(settings: Settings, store: Store, ride_out_s: float = 0.0) -> Credentials:
    """Everything that mints, serves and revokes a task's credentials, and the gateway
    (this process's own, or the host's `airlock gateway` when AIRLOCK_GATEWAY=remote)."""
    from orchestrator.adapters.gateway.interception import LeafCertificates
    from orchestrator.adapters.gateway.service import Gateway, LocalGateway, RemoteGateway
    from orchestrator.adapters.vault.broker import Broker
    from orchestrator.adapters.vault.identity import Minter
    from orchestrator.task.credentials import Credentials, task_verifier

    client = vault(settings, ride_out_s)
    issuer = jwt_issuer(settings)
    minter = Minter(client, issuer, settings.jwt_audience)
    broker = Broker(client, store, settings, minter)
    audit = audit_log(settings, store, client)
    endpoints: Gateway
    if settings.gateway == "remote":
        endpoints = RemoteGateway(settings)
    else:
        verifier = task_verifier(settings, client, store)
        endpoints = LocalGateway(
            settings,
            store,
            broker,
            verifier,
            audit,
            database_addresses(settings),
            LeafCertificates(client),
        )
    return Credentials(settings, store, client, minter, broker, audit, endpoints)


def executor(settings: Settings, warm_pool: bool = False) -> Executor:
    """The worker's executor; with `warm_pool`, its warm runners start filling at once."""
    from orchestrator.adapters import telemetry
    from orchestrator.task.executor import Executor
    from orchestrator.task.pool import WarmPool, pool_sizes

    shared = store(settings, SERVICE_RIDE_OUT_S)
    engine = runtime(settings, SERVICE_RIDE_OUT_S, settings.worker_concurrency * 3 + 2)
    telemetry.setup(settings, "worker", shared)
    built = Executor(settings, shared, engine, credentials(settings, shared, SERVICE_RIDE_OUT_S))
    if warm_pool and (settings.pool_size or settings.pool_gvisor_size):
        sizes = pool_sizes(settings, engine.runtimes())
        built.pool = WarmPool(settings, shared, engine, built.credentials.endpoints, sizes)
        built.pool.start()
    return built


def gateway_service(settings: Settings) -> GatewayService:
    """`airlock gateway`: every task endpoint of this host, steered over a control socket."""
    from orchestrator.adapters import telemetry
    from orchestrator.adapters.gateway.service import CONTROL_SOCKET, GatewayService, LocalGateway

    settings = replace(settings, gateway="local")
    shared = store(settings)
    telemetry.setup(settings, "gateway", shared)
    local = credentials(settings, shared, SERVICE_RIDE_OUT_S).endpoints
    assert isinstance(local, LocalGateway)
    return GatewayService(local, settings.endpoint_dir / CONTROL_SOCKET)


def policy_engine(settings: Settings) -> PolicyEngine:
    """A policy engine for this host, deciding as a worker here would (as if every runtime
    existed where no engine can be reached)."""
    from orchestrator.policy.bundle import Deployment
    from orchestrator.policy.engine import PolicyEngine

    def deployment() -> Deployment:
        try:
            runtimes = tuple(sorted(runtime(settings).runtimes()))
        except AirlockError:
            runtimes = ("runc", "runsc")
        return Deployment.of(settings, runtimes)

    return PolicyEngine(
        settings.policy_dir, settings.agents_dir, deployment, callers_file(settings)
    )


def gvisor_available(settings: Settings) -> bool:
    """Whether this host's engine has the runsc runtime (then a worker serves its queue)."""
    try:
        return "runsc" in runtime(settings).runtimes()
    except AirlockError:
        return False
