"""The one settings object. Nothing else in Airlock reads the environment.

Standard variables of each ecosystem are honoured (REDIS_URL, DOCKER_HOST, VAULT_ADDR,
VAULT_TOKEN, OTEL_*); Airlock's own knobs are AIRLOCK_*.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from orchestrator.errors import ConfigError

if TYPE_CHECKING:
    import ssl

T = TypeVar("T")

# The fixed unprivileged identity tasks run as inside their container.
TASK_USER = "10001:10001"
# A source checkout keeps its policy bundle beside the package; deployments set the paths.
CHECKOUT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Settings:
    redis_url: str = "redis://127.0.0.1:6379/0"
    # The Celery broker: Redis by default; RabbitMQ (amqp://) works too, Redis stays the store.
    broker_url: str | None = None
    # Prefix of every Redis key and the default Celery queue; lets deployments share a Redis.
    namespace: str = "airlock"
    docker_host: str | None = None
    vault_addr: str = "http://127.0.0.1:8200"
    vault_token: str | None = None
    runner_image: str = "airlock-runner:latest"
    # The runner (a static binary, and the Python helper for agents), on the engine's host:
    # mounted read-only at /opt/airlock in every task container, whatever its image.
    runner_dir: Path = Path("/var/lib/airlock/runner")
    queue: str = "airlock"
    output_max_bytes: int = 1 << 20
    log_max_bytes: int = 4 << 20
    max_timeout_s: int = 24 * 3600
    # SIGTERM, then this long before SIGKILL, when a task is cancelled or times out.
    stop_grace_s: float = 1.0
    # Terminal task records (and their logs and events) expire after this long.
    record_ttl_s: int = 7 * 24 * 3600
    worker_concurrency: int = 4
    otel_service_name: str = "airlock"
    otel_endpoint: str | None = None
    # Off: no spans at all (for measuring what tracing costs).
    tracing: bool = True
    policy_dir: Path = CHECKOUT / "policies"
    agents_dir: Path = CHECKOUT / "agents"
    trust_domain: str = "airlock.local"
    # What a task gets when it does not say (never more than its agent's ceiling).
    default_timeout_s: int = 300
    default_cpus: float = 1.0
    default_memory: int = 512 << 20
    default_pids: int = 256
    # Task credentials live no longer than the task's deadline plus this grace.
    credential_grace_s: int = 60
    # Task tokens are periodic: a worker that stops renewing them lets them die this soon.
    vault_token_period_s: int = 300
    # The PostgreSQL that Vault's database engine manages (its admin URL, for vault setup).
    postgres_url: str | None = None
    # A worker proves it still owns each of its tasks this often; three misses and the
    # reaper treats the task as abandoned.
    heartbeat_s: float = 10.0
    # How often each worker's beat runs the reaper.
    reap_period_s: float = 60.0
    # "local": each worker serves its tasks' endpoints itself; "remote": the host's
    # `airlock gateway` process does, steered over its control socket.
    gateway: str = "local"
    # Worker and gateway logs: "json" (one object per line, with task and trace ids) or "text".
    log_format: str = "json"
    # Extra CA bundle for upstreams the gateway speaks TLS to (the system roots otherwise).
    upstream_ca_file: Path | None = None
    # Per task: connections open at once on its endpoint, and requests over its lifetime.
    gateway_max_connections: int = 64
    gateway_max_requests: int = 100_000
    # Per task, so that no task can slow another: requests per second (a burst of twice
    # that), open CONNECT tunnels, and bytes relayed both ways.
    gateway_rate: int = 200
    gateway_max_tunnels: int = 16
    gateway_max_bytes: int = 4 << 30
    # Task JWTs name this audience; the gateway is who checks them.
    jwt_audience: str = "airlock-gateway"
    # Per-task endpoint directories (one socket each) live under this directory.
    endpoint_dir: Path = Path("/run/airlock/endpoints")
    # The audit's signed chain heads, outside Redis (append only, one file per host), and
    # how long the audit stream keeps records.
    audit_anchor_file: Path = Path("/var/lib/airlock/audit-anchors.jsonl")
    # This component's Vault AppRole credentials (a directory with role_id and secret_id);
    # unset: VAULT_TOKEN is used as it is.
    vault_approle: Path | None = None
    audit_max_age_s: int = 90 * 24 * 3600
    audit_max_records: int = 5_000_000
    # Warm pool: runners each worker keeps started ahead of time, for the runner image under
    # runc and under gVisor; recycled after pool_max_age_s. 0: no pool (every start is cold).
    pool_size: int = 0
    pool_gvisor_size: int = 0
    # The images warm runners are kept of, each at those sizes (the runner image unless set).
    pool_images: tuple[str, ...] = ()
    pool_max_age_s: float = 600.0
    # The front door (`airlock serve`): where it listens, and where the CLI and the Python
    # client find it (unset: they read and submit directly, as an operator on a worker host).
    api_listen: str = "127.0.0.1:8600"
    api_url: str | None = None
    # The OIDC issuer whose bearer tokens callers present, and the audience they must name.
    oidc_issuer: str | None = None
    oidc_audience: str = "airlock-api"
    # Who may submit what, as whom, how much (a YAML registry the Rego policy decides with).
    callers_file: Path | None = None
    # Queue messages carry an admission ticket signed with this Ed25519 key (the front door
    # and a local operator hold the private key; workers only the public one).
    ticket_key: Path | None = None
    ticket_public_key: Path | None = None
    # A file the worker touches at each heartbeat it sends over the broker (every 2 s): a
    # container health check reads its age (no process started per check, no broker call).
    health_file: Path | None = None
    # A worker told to stop lets its tasks in flight run this long, then cancels those left
    # (their containers stopped, credentials revoked) before it exits: 0 cancels at once.
    drain_s: float = 0.0


def _get(env: Mapping[str, str], name: str, default: T, parse: Callable[[str], T]) -> T:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return parse(raw)
    except ValueError as exc:
        raise ConfigError(f"{name}={raw!r}: {exc}") from exc


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value <= 0:
        raise ValueError("must be a positive integer")
    return value


def _count(raw: str) -> int:
    value = int(raw)
    if not 0 <= value <= 64:
        raise ValueError("must be between 0 and 64")
    return value


def _positive_float(raw: str) -> float:
    value = float(raw)
    if value <= 0:
        raise ValueError("must be a positive number")
    return value


def _non_negative_float(raw: str) -> float:
    value = float(raw)
    if value < 0:
        raise ValueError("must not be negative")
    return value


def _name(raw: str) -> str:
    if not re.fullmatch(r"[a-z0-9][a-z0-9_.-]{0,62}", raw):
        raise ValueError("must be lower-case letters, digits, '.', '_' or '-'")
    return raw


def callers_file(settings: Settings) -> Path:
    """The callers registry: AIRLOCK_CALLERS_FILE, else callers.yaml in the policy directory."""
    return settings.callers_file or settings.policy_dir / "callers.yaml"


def _path(env: Mapping[str, str], name: str) -> Path | None:
    return Path(env[name]) if env.get(name) else None


# Values that hold a password (in a URL) or a token, with their per-component variants
# (<NAME>_<COMPONENT>). Each may instead come from a file named by <NAME>_FILE, as container
# secrets are given (/run/secrets/...), so that it is never in the environment.
SECRET_VARIABLES = (
    "REDIS_URL",
    "AIRLOCK_REDIS_URL",
    "VAULT_TOKEN",
    "AIRLOCK_BROKER_URL",
    "AIRLOCK_POSTGRES_URL",
)


def _with_secret_files(env: Mapping[str, str]) -> Mapping[str, str]:
    """`env` with each secret variable (and its per-component variants) read from the file
    its <NAME>_FILE names, where that is set. Raises ConfigError for an unreadable file."""
    read = {}
    for name, path in env.items():
        base = name.removesuffix("_FILE")
        if base == name or not any(base == s or base.startswith(f"{s}_") for s in SECRET_VARIABLES):
            continue
        try:
            read[base] = Path(path).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"{name}={path!r}: {exc.strerror or exc}") from exc
    return {**env, **read} if read else env


def gvisor_queue(settings: Settings) -> str:
    """The queue of tasks that need the gVisor isolation class."""
    return f"{settings.queue}-gvisor"


def jwt_issuer(settings: Settings) -> str:
    """The `iss` of every task JWT this deployment signs."""
    return f"https://{settings.trust_domain}/airlock"


def database_addresses(settings: Settings) -> dict[str, dict[str, Any]]:
    """Where each kind of secret is used: database credentials come with their address."""
    if not settings.postgres_url:
        return {}
    url = urlsplit(settings.postgres_url)
    return {
        "database": {
            "host": url.hostname,
            "port": url.port or 5432,
            "database": url.path.lstrip("/") or "postgres",
        }
    }


def _log_format(raw: str) -> str:
    if raw not in ("json", "text"):
        raise ValueError("must be 'json' or 'text'")
    return raw


def _gateway_mode(raw: str) -> str:
    if raw not in ("local", "remote"):
        raise ValueError("must be 'local' or 'remote'")
    return raw


def load(environ: Mapping[str, str] | None = None, component: str | None = None) -> Settings:
    """Build settings from `environ` (the process environment by default). A `component`
    (api, worker, gateway) connects to Redis as its own user when
    AIRLOCK_REDIS_URL_<COMPONENT> is set (see adapters/redis_acl.py), else with REDIS_URL,
    and logs in to Vault with its own AppRole when AIRLOCK_VAULT_APPROLE_<COMPONENT> names
    its credentials' directory, else uses VAULT_TOKEN; AIRLOCK_BROKER_URL_<COMPONENT>
    likewise names its own broker user (RabbitMQ), else AIRLOCK_BROKER_URL. Secrets may come
    from files instead (REDIS_URL_FILE, VAULT_TOKEN_FILE, ...: see SECRET_VARIABLES).

    Raises ConfigError naming the variable when a value is malformed.
    """
    env = _with_secret_files(os.environ if environ is None else environ)
    d = Settings()
    namespace = _get(env, "AIRLOCK_NAMESPACE", d.namespace, _name)

    def mine(variable: str) -> str | None:
        """The component's own value of `variable` (VARIABLE_<COMPONENT>), if it has one."""
        return env.get(f"{variable}_{component.upper()}") if component else None

    own, approle, broker = (
        mine("AIRLOCK_REDIS_URL"),
        mine("AIRLOCK_VAULT_APPROLE"),
        mine("AIRLOCK_BROKER_URL"),
    )
    return Settings(
        redis_url=own or env.get("REDIS_URL") or d.redis_url,
        broker_url=broker or env.get("AIRLOCK_BROKER_URL") or None,
        namespace=namespace,
        docker_host=env.get("DOCKER_HOST") or None,
        vault_addr=env.get("VAULT_ADDR") or d.vault_addr,
        vault_token=env.get("VAULT_TOKEN") or None,
        runner_image=env.get("AIRLOCK_RUNNER_IMAGE") or d.runner_image,
        runner_dir=Path(env.get("AIRLOCK_RUNNER_DIR") or d.runner_dir),
        queue=_get(env, "AIRLOCK_QUEUE", namespace, _name),
        output_max_bytes=_get(env, "AIRLOCK_OUTPUT_MAX_BYTES", d.output_max_bytes, _positive_int),
        log_max_bytes=_get(env, "AIRLOCK_LOG_MAX_BYTES", d.log_max_bytes, _positive_int),
        max_timeout_s=_get(env, "AIRLOCK_MAX_TIMEOUT_S", d.max_timeout_s, _positive_int),
        stop_grace_s=_get(env, "AIRLOCK_STOP_GRACE_S", d.stop_grace_s, _positive_float),
        record_ttl_s=_get(env, "AIRLOCK_RECORD_TTL_S", d.record_ttl_s, _positive_int),
        worker_concurrency=_get(
            env, "AIRLOCK_WORKER_CONCURRENCY", d.worker_concurrency, _positive_int
        ),
        otel_service_name=env.get("OTEL_SERVICE_NAME") or d.otel_service_name,
        otel_endpoint=env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None,
        tracing=env.get("AIRLOCK_TRACING", "on").lower() not in ("off", "0", "false"),
        policy_dir=Path(env.get("AIRLOCK_POLICY_DIR") or d.policy_dir),
        agents_dir=Path(env.get("AIRLOCK_AGENTS_DIR") or d.agents_dir),
        trust_domain=_get(env, "AIRLOCK_TRUST_DOMAIN", d.trust_domain, _name),
        default_timeout_s=_get(
            env, "AIRLOCK_DEFAULT_TIMEOUT_S", d.default_timeout_s, _positive_int
        ),
        credential_grace_s=_get(
            env, "AIRLOCK_CREDENTIAL_GRACE_S", d.credential_grace_s, _positive_int
        ),
        vault_token_period_s=_get(
            env, "AIRLOCK_VAULT_TOKEN_PERIOD_S", d.vault_token_period_s, _positive_int
        ),
        postgres_url=env.get("AIRLOCK_POSTGRES_URL") or None,
        jwt_audience=env.get("AIRLOCK_JWT_AUDIENCE") or d.jwt_audience,
        heartbeat_s=_get(env, "AIRLOCK_HEARTBEAT_S", d.heartbeat_s, _positive_float),
        reap_period_s=_get(env, "AIRLOCK_REAP_PERIOD_S", d.reap_period_s, _positive_float),
        gateway=_get(env, "AIRLOCK_GATEWAY", d.gateway, _gateway_mode),
        log_format=_get(env, "AIRLOCK_LOG_FORMAT", d.log_format, _log_format),
        upstream_ca_file=_path(env, "AIRLOCK_UPSTREAM_CA_FILE"),
        gateway_max_connections=_get(
            env, "AIRLOCK_GATEWAY_MAX_CONNECTIONS", d.gateway_max_connections, _positive_int
        ),
        gateway_rate=_get(env, "AIRLOCK_GATEWAY_RATE", d.gateway_rate, _positive_int),
        gateway_max_tunnels=_get(
            env, "AIRLOCK_GATEWAY_MAX_TUNNELS", d.gateway_max_tunnels, _positive_int
        ),
        gateway_max_bytes=_get(
            env, "AIRLOCK_GATEWAY_MAX_BYTES", d.gateway_max_bytes, _positive_int
        ),
        gateway_max_requests=_get(
            env, "AIRLOCK_GATEWAY_MAX_REQUESTS", d.gateway_max_requests, _positive_int
        ),
        endpoint_dir=Path(env.get("AIRLOCK_ENDPOINT_DIR") or d.endpoint_dir),
        audit_anchor_file=Path(env.get("AIRLOCK_AUDIT_ANCHOR_FILE") or d.audit_anchor_file),
        vault_approle=Path(approle) if approle else None,
        audit_max_age_s=_get(env, "AIRLOCK_AUDIT_MAX_AGE_S", d.audit_max_age_s, _positive_int),
        audit_max_records=_get(
            env, "AIRLOCK_AUDIT_MAX_RECORDS", d.audit_max_records, _positive_int
        ),
        pool_size=_get(env, "AIRLOCK_POOL_SIZE", d.pool_size, _count),
        pool_gvisor_size=_get(env, "AIRLOCK_POOL_GVISOR_SIZE", d.pool_gvisor_size, _count),
        pool_images=tuple(
            image.strip()
            for image in (env.get("AIRLOCK_POOL_IMAGES") or "").split(",")
            if image.strip()
        ),
        pool_max_age_s=_get(env, "AIRLOCK_POOL_MAX_AGE_S", d.pool_max_age_s, _positive_float),
        api_listen=env.get("AIRLOCK_API_LISTEN") or d.api_listen,
        api_url=(env.get("AIRLOCK_API_URL") or "").rstrip("/") or None,
        oidc_issuer=(env.get("AIRLOCK_OIDC_ISSUER") or "").rstrip("/") or None,
        oidc_audience=env.get("AIRLOCK_OIDC_AUDIENCE") or d.oidc_audience,
        callers_file=_path(env, "AIRLOCK_CALLERS_FILE"),
        ticket_key=_path(env, "AIRLOCK_TICKET_KEY"),
        ticket_public_key=_path(env, "AIRLOCK_TICKET_PUBLIC_KEY"),
        health_file=_path(env, "AIRLOCK_HEALTH_FILE"),
        drain_s=_get(env, "AIRLOCK_DRAIN_S", d.drain_s, _non_negative_float),
    )


# Proxy settings an HTTP client would take from the environment.
_PROXY_ENV = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


def proxies_in_env(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the environment names any proxy.

    When none is named, HTTP clients need not look (requests reads the whole environment on
    every request to find proxies: most of a worker's CPU per task otherwise).
    """
    env = os.environ if environ is None else environ
    return any(key.lower() in _PROXY_ENV for key in env)


def ca_bundle_from_env(environ: Mapping[str, str] | None = None) -> str | None:
    """The CA bundle requests would take from the environment, if one is named."""
    env = os.environ if environ is None else environ
    return env.get("REQUESTS_CA_BUNDLE") or env.get("CURL_CA_BUNDLE") or None


def vault_tls(environ: Mapping[str, str] | None = None) -> ssl.SSLContext:
    """How to reach an https:// Vault, from Vault's own variables: VAULT_CACERT (or
    VAULT_CAPATH, else the bundle requests would use, else the system's) and
    VAULT_CLIENT_CERT with VAULT_CLIENT_KEY. Raises ConfigError if a file cannot be read."""
    env = os.environ if environ is None else environ
    cafile = env.get("VAULT_CACERT") or (
        None if env.get("VAULT_CAPATH") else ca_bundle_from_env(env)
    )
    import ssl  # lazy on purpose: a CLI that reads a task over plain HTTP never needs it

    try:
        context = ssl.create_default_context(cafile=cafile, capath=env.get("VAULT_CAPATH"))
        if env.get("VAULT_CLIENT_CERT"):
            context.load_cert_chain(env["VAULT_CLIENT_CERT"], env.get("VAULT_CLIENT_KEY"))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"Vault TLS settings: {exc}") from exc
    return context
