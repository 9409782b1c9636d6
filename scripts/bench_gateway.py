"""Gateway benchmark, same run, against one local upstream: plain HTTP (direct vs Airlock
vs tinyproxy), and HTTPS with interception (direct TLS vs Airlock vs squid's ssl_bump, each
ending the client's TLS with a certificate of its own CA and verifying the upstream's).

Three processes so no two share a GIL: the upstream (a minimal keep-alive HTTP responder,
plain and TLS), this process (the Airlock gateway, serving a real task's endpoint with
policy, JWT checks and audit on), and the load client. Reported: added latency per request
at 1 connection (p50/p99 over the direct path) and requests/s at 16 connections, keep-alive
on every side. The two intercepting proxies (Airlock and squid) are measured in alternating
rounds (BENCH_ROUNDS, 3 by default) and compared by their medians, so that a slow moment of
a shared 2-core machine does not fall on one of them alone. The proxy under test runs on a
CPU of its own, the load client and the upstream on another.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import json
import os
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

UPSTREAM_PORT, TINYPROXY_PORT = 18180, 18888
UPSTREAM_TLS_PORT, SQUID_PORT = 18181, 18889
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"


# --- the upstream ---------------------------------------------------------------------------
async def upstream(directory: str) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                close = b"connection: close" in head.lower()
                writer.write(
                    RESPONSE
                    if not close
                    else RESPONSE.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)
                )
                await writer.drain()
                if close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", UPSTREAM_PORT, backlog=512)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(
        str(Path(directory) / "upstream.pem"), str(Path(directory) / "upstream.key")
    )
    secure = await asyncio.start_server(serve, "127.0.0.1", UPSTREAM_TLS_PORT, backlog=512, ssl=tls)
    async with server, secure:
        await asyncio.gather(server.serve_forever(), secure.serve_forever())


# --- the client -----------------------------------------------------------------------------
def request(proxied: bool, auth: str | None, tls: bool = False) -> bytes:
    if tls:  # inside a tunnel, or straight to the TLS upstream: origin form
        return f"GET /bench HTTP/1.1\r\nHost: 127.0.0.1:{UPSTREAM_TLS_PORT}\r\n\r\n".encode()
    target = f"http://127.0.0.1:{UPSTREAM_PORT}/bench" if proxied else "/bench"
    extra = f"Proxy-Authorization: Bearer {auth}\r\n" if auth else ""
    return f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{UPSTREAM_PORT}\r\n{extra}\r\n".encode()


async def open_path(path: dict[str, Any]) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if path["kind"] == "unix":
        reader, writer = await asyncio.open_unix_connection(path["socket"])
    else:
        reader, writer = await asyncio.open_connection("127.0.0.1", path["port"])
    if "ca" not in path:
        return reader, writer
    context = ssl.create_default_context(cadata=path["ca"])
    if path["proxied"]:  # a tunnel, then TLS with whoever intercepts it
        authority = f"127.0.0.1:{UPSTREAM_TLS_PORT}"
        auth = f"Proxy-Authorization: Bearer {path['jwt']}\r\n" if path.get("jwt") else ""
        writer.write(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n{auth}\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")):
            raise RuntimeError(f"CONNECT refused: {head[:80]!r}")
    await writer.start_tls(context, server_hostname="127.0.0.1")
    return reader, writer


async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes) -> bool:
    """One request and its answer; whether the connection stays open for the next."""
    writer.write(data)
    head = (await reader.readuntil(b"\r\n\r\n")).lower()
    if not head.startswith((b"http/1.1 200", b"http/1.0 200")):
        raise RuntimeError(f"not a 200: {head[:80]!r}")
    length = int(head.split(b"content-length:")[1].split(b"\r\n")[0])
    await reader.readexactly(length)
    return b"connection: close" not in head and not head.startswith(b"http/1.0")


async def latency(path: dict[str, Any], count: int) -> list[float]:
    data = request(path["proxied"], path.get("jwt"), "ca" in path)
    reader, writer = await open_path(path)
    samples = []
    for _ in range(count):
        t0 = time.perf_counter()
        if not await one(reader, writer, data) or path.get("fresh"):
            writer.close()
            reader, writer = await open_path(path)
        samples.append(time.perf_counter() - t0)
    writer.close()
    return samples


async def throughput(path: dict[str, Any], connections: int, seconds: float) -> tuple[float, int]:
    data = request(path["proxied"], path.get("jwt"), "ca" in path)
    stop = time.perf_counter() + seconds
    done = 0

    async def worker() -> None:
        nonlocal done
        reader, writer = await open_path(path)
        while time.perf_counter() < stop:
            if not await one(reader, writer, data) or path.get("fresh"):
                writer.close()
                reader, writer = await open_path(path)
            done += 1
        writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(connections)))
    return done / (time.perf_counter() - started), done


async def client(paths: list[dict[str, Any]], count: int, seconds: float) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for path in paths:
        try:
            await latency(path, 200)  # warm up
            samples = sorted(await latency(path, count))
            rps, done = await throughput(path, 16, seconds)
            results[path["name"]] = {
                "p50": samples[len(samples) // 2],
                "p99": samples[int(len(samples) * 0.99)],
                "rps16": rps,
                "requests": 200 + count + done,
            }
        except (OSError, RuntimeError) as exc:
            raise RuntimeError(f"{path['name']}: {exc!r}") from exc
    return results


async def flood(socket_path: str, seconds: float, connections: int = 8) -> int:
    """Forged-token requests at a task's endpoint, as fast as they are answered; how many."""
    stop = time.perf_counter() + seconds
    sent = 0

    async def one_connection(n: int) -> None:
        nonlocal sent
        while time.perf_counter() < stop:
            try:
                reader, writer = await asyncio.open_unix_connection(socket_path)
                writer.write(request(True, f"forged.{n}.{sent}"))
                await reader.read(4096)
                writer.close()
            except OSError:
                await asyncio.sleep(0.001)
            sent += 1

    await asyncio.gather(*(one_connection(n) for n in range(connections)))
    return sent


# --- the driver -----------------------------------------------------------------------------
def stat_fields(stat: str | Path) -> list[str]:
    """A /proc stat file's fields after the command name (state, ppid, ...)."""
    return Path(stat).read_text().rsplit(")", 1)[1].split()


def cpu_seconds(stats: list[str] | None) -> float:
    """User plus system CPU of processes or threads, from their /proc stat files."""
    ticks = sum(int(fields[11]) + int(fields[12]) for fields in map(stat_fields, stats or []))
    return ticks / os.sysconf("SC_CLK_TCK")


def squid_processes(pid: int) -> list[int]:
    """squid and its helpers (log daemon, certificate generators), as they run now."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat_fields(stat)[1])
        except OSError:  # gone meanwhile
            continue
    found, seen = [pid], 0
    while seen < len(found):
        found += [child for child, parent in parents.items() if parent == found[seen]]
        seen += 1
    return found


def cpus() -> tuple[int, int] | None:
    """Two CPUs of this machine: one for the load (client and upstream), one for the proxy
    under test; None on a single CPU."""
    have = sorted(os.sched_getaffinity(0))
    return (have[0], have[1]) if len(have) >= 2 else None


def pin(ident: int, cpu: int | None) -> None:
    """Run a process or thread on `cpu` only (None: on every CPU this machine has)."""
    with contextlib.suppress(OSError):  # gone meanwhile
        os.sched_setaffinity(ident, {cpu} if cpu is not None else os.sched_getaffinity(0))


def start_tinyproxy(directory: Path) -> subprocess.Popen[bytes]:
    conf = directory / "tinyproxy.conf"
    conf.write_text(
        f"Port {TINYPROXY_PORT}\nListen 127.0.0.1\nTimeout 60\nMaxClients 256\n"
        f'LogLevel Critical\nLogFile "{directory}/tinyproxy.log"\nAllow 127.0.0.1\n'
        "DisableViaHeader Yes\n"
    )
    return subprocess.Popen(
        ["tinyproxy", "-d", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def certificates(directory: Path) -> str:
    """A CA for the upstream's certificate (127.0.0.1), one for squid; the upstream CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def issue(name: str, issuer: Any = None, ca: bool = True) -> tuple[Any, Any]:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        signer_cert, signer_key = issuer or (None, key)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(signer_cert.subject if signer_cert else subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False,
            )
        return builder.sign(signer_key, hashes.SHA256()), key

    def write(stem: str, cert: Any, key: Any) -> None:
        (directory / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (directory / f"{stem}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )

    upstream_ca = issue("bench upstream CA")
    write("upstream-ca", *upstream_ca)
    write("upstream", *issue("127.0.0.1", upstream_ca, ca=False))
    write("squid-ca", *issue("bench squid CA"))
    return (directory / "upstream-ca.pem").read_text()


def start_squid(directory: Path) -> subprocess.Popen[bytes]:
    """squid with ssl_bump: it ends the client's TLS with a leaf of its own CA (generated per
    host, cached in memory) and verifies the upstream; the same allow-list as the grant. It
    logs every request, as Airlock audits every request: its access log, written by its log
    daemon (Debian's default)."""
    home = directory / "squid"
    home.mkdir()
    for name in ("squid-ca.pem", "squid-ca.key", "upstream-ca.pem"):
        shutil.copy(directory / name, home / name)
    subprocess.run(
        ["/usr/lib/squid/security_file_certgen", "-c", "-s", str(home / "ssl_db"), "-M", "16MB"],
        check=True,
        capture_output=True,
    )
    (home / "squid.conf").write_text(
        f"""http_port 127.0.0.1:{SQUID_PORT} ssl-bump generate-host-certificates=on \
  dynamic_cert_mem_cache_size=16MB tls-cert={home}/squid-ca.pem tls-key={home}/squid-ca.key
sslcrtd_program /usr/lib/squid/security_file_certgen -s {home}/ssl_db -M 16MB
sslcrtd_children 4
tls_outgoing_options cafile={home}/upstream-ca.pem
acl step1 at_step SslBump1
ssl_bump peek step1
ssl_bump bump all
acl bench_host dst 127.0.0.1
acl bench_port port {UPSTREAM_TLS_PORT}
acl connect method CONNECT
acl bench_method method GET
acl bench_path urlpath_regex ^/bench
http_access allow connect bench_host bench_port
http_access allow bench_host bench_port bench_method bench_path
http_access deny all
cache deny all
access_log daemon:{home}/access.log squid
cache_log {home}/cache.log
pid_filename {home}/squid.pid
coredump_dir {home}
shutdown_lifetime 1 seconds
"""
    )
    subprocess.run(["chown", "-R", "proxy:proxy", str(home)], check=True)
    directory.chmod(0o755)
    return subprocess.Popen(
        ["squid", "-N", "-f", str(home / "squid.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def live_task(directory: Path) -> tuple[Any, str, str, Any]:
    from orchestrator import config, wiring
    from orchestrator.adapters.store import Store
    from orchestrator.core.grant import Grant

    settings = replace(
        config.load(),
        namespace=f"bench{uuid.uuid4().hex[:6]}",
        endpoint_dir=directory / "endpoints",
        # The per-task request budget is not what is measured here.
        gateway_rate=10_000_000,
        gateway_max_requests=10_000_000,
    )
    store = Store(settings.redis_url, settings.namespace)
    credentials = wiring.credentials(settings, store)
    grant = Grant.build(
        "demo",
        identity="spiffe://bench/agent/demo",
        image="i",
        timeout_s=600,
        limits={"cpus": 1, "memory": 1 << 28, "pids": 64},
        egress=[
            {
                "host": "127.0.0.1",
                "scheme": "http",
                "ports": [UPSTREAM_PORT],
                "methods": ["GET"],
                "paths": ["/bench"],
                "internal": True,
            },
            {
                "host": "127.0.0.1",
                "ports": [UPSTREAM_TLS_PORT],
                "methods": ["GET"],
                "paths": ["/bench"],
                "internal": True,
            },
        ],
    )
    task_id = str(uuid.uuid4())
    store.create(task_id, {"agent": "demo"})
    store.redis.hset(store.key(task_id), "state", "running")
    handout = credentials.provision(task_id, grant, grant.digest(), time.time() + 600)
    return credentials, task_id, str(handout.endpoint_dir / "airlock.sock"), handout


def noisy_neighbour(credentials: Any, victim: dict[str, Any], seconds: float) -> None:
    """The victim task's latency alone, then while another task's runner floods its own
    endpoint with forged tokens (that task keeps the default per-task budget)."""
    from orchestrator.adapters.gateway.limits import Budget, TaskLimits
    from orchestrator.core.grant import Grant

    store = credentials.store
    noisy = str(uuid.uuid4())
    store.create(noisy, {"agent": "demo"})
    store.redis.hset(store.key(noisy), "state", "running")
    grant = Grant.build("demo", identity="spiffe://bench/agent/demo", image="i", timeout_s=600)
    handout = credentials.provision(noisy, grant, grant.digest(), time.time() + 600)
    credentials.endpoints.server.handlers[noisy].budget = Budget(TaskLimits())
    spec = json.dumps({"paths": [victim], "count": 1000, "seconds": 1})

    def victim_p50() -> float:
        load = subprocess.Popen(
            [sys.executable, __file__, "_client", spec], stdout=subprocess.PIPE, text=True
        )
        credentials.endpoints.server.allow_process(victim["task"], load.pid)
        out, _ = load.communicate()
        return float(json.loads(out)["airlock"]["p50"])

    try:
        alone = victim_p50()
        flooder = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "_flood",
                str(handout.endpoint_dir / "airlock.sock"),
                str(seconds),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        credentials.endpoints.server.allow_process(noisy, flooder.pid)
        time.sleep(0.5)
        during = victim_p50()
        sent = int(flooder.communicate()[0] or 0)
    finally:
        credentials.revoke(noisy)
    print(
        f"  noisy neighbour: victim p50 {alone * 1e3:.3f} ms alone, {during * 1e3:.3f} ms "
        f"while another task sent {sent / seconds:.0f} forged requests/s "
        f"({during / alone:.2f}x)"
    )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_upstream":
        asyncio.run(upstream(sys.argv[2]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_flood":
        print(asyncio.run(flood(sys.argv[2], float(sys.argv[3]))))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_client":
        spec = json.loads(sys.argv[2])
        print(json.dumps(asyncio.run(client(spec["paths"], spec["count"], spec["seconds"]))))
        return
    run(
        int(os.environ.get("BENCH_COUNT", "2000")),
        float(os.environ.get("BENCH_SECONDS", "5")),
        int(os.environ.get("BENCH_ROUNDS", "3")),
    )


def run(count: int, seconds: float, rounds: int) -> None:
    for tool in ("tinyproxy", "squid"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is not installed (scripts/bench gateway installs it)")
    directory = Path(tempfile.mkdtemp(prefix="airlock-bench-gw-"))
    upstream_ca = certificates(directory)
    up = subprocess.Popen([sys.executable, __file__, "_upstream", str(directory)])
    tiny = start_tinyproxy(directory)
    squid = start_squid(directory)
    # The proxy under test on a CPU of its own, the load and the upstream on another: the
    # scheduler moves neither into the other's way, for Airlock and squid alike.
    load_cpu, proxy_cpu = cpus() or (None, None)
    for pid, cpu in ((up.pid, load_cpu), (tiny.pid, proxy_cpu), (squid.pid, proxy_cpu)):
        pin(pid, cpu)
    credentials, task_id, sock, handout = live_task(directory)
    # The gateway verifies the upstream as squid does: against the upstream's CA.
    credentials.endpoints.server.tls.load_verify_locations(cadata=upstream_ca)
    jwt = handout.provisioned.jwt.jwt
    try:
        time.sleep(1)
        airlock = {"kind": "unix", "socket": sock, "proxied": True, "jwt": jwt, "task": task_id}
        paths = [
            {"name": "direct", "kind": "tcp", "port": UPSTREAM_PORT, "proxied": False},
            {"name": "airlock", **airlock},
            # tinyproxy closes the client connection after each answer (without saying so)
            {
                "name": "tinyproxy",
                "kind": "tcp",
                "port": TINYPROXY_PORT,
                "proxied": True,
                "fresh": True,
            },
            {
                "name": "direct tls",
                "kind": "tcp",
                "port": UPSTREAM_TLS_PORT,
                "proxied": False,
                "ca": upstream_ca,
            },
            {"name": "airlock tls", **airlock, "ca": credentials.endpoints.certificates.ca_pem()},
            {
                "name": "squid tls",
                "kind": "tcp",
                "port": SQUID_PORT,
                "proxied": True,
                "ca": (directory / "squid-ca.pem").read_text(),
            },
        ]
        # Airlock and squid over TLS in alternating rounds, after the single-round paths.
        rounds = max(rounds, 1)
        paths = paths[:4] + paths[4:6] * rounds
        print(
            f"gateway: {count} sequential requests per path, then {seconds:.0f}s at 16 "
            f"connections; policy, JWT check and audit on for Airlock; intercepted HTTPS in "
            f"{rounds} alternating rounds (medians)"
            + ("; the proxy on a CPU of its own, the load on another" if proxy_cpu else ""),
            flush=True,
        )
        # CPU seconds of what serves each path: the gateway's loop thread (its audit writer
        # included); squid's process and its helpers (log daemon, certificate generators).
        gateway = next(t for t in threading.enumerate() if t.name == "airlock-endpoints")
        assert gateway.native_id is not None  # a running thread's
        pin(gateway.native_id, proxy_cpu)
        airlock = [f"/proc/self/task/{gateway.native_id}/stat"]
        serving = {
            "airlock": airlock,
            "airlock tls": airlock,
            "squid tls": [f"/proc/{pid}/stat" for pid in squid_processes(squid.pid)],
        }
        rounds_of: dict[str, list[dict[str, Any]]] = {}
        for path in paths:  # one load client per path, so each path's CPU is its own
            cpu = cpu_seconds(serving.get(path["name"]))
            load = subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "_client",
                    json.dumps({"paths": [path], "count": count, "seconds": seconds}),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            pin(load.pid, load_cpu)
            # The load client plays the task's runner: the endpoint admits it as its peer.
            credentials.endpoints.server.allow_process(task_id, load.pid)
            stdout, stderr = load.communicate()
            if load.returncode:
                log = directory / "squid" / "cache.log"
                sys.exit(
                    f"the load client failed:\n{stderr[-3000:]}"
                    + (f"\nsquid:\n{log.read_text()[-2000:]}" if log.exists() else "")
                )
            result = json.loads(stdout)[path["name"]]
            if path["name"] in serving:
                used = cpu_seconds(serving[path["name"]]) - cpu
                result["cpu_us"] = used / result["requests"] * 1e6
            done = rounds_of.setdefault(path["name"], [])
            done.append(result)
            mark = f" #{len(done)}" if len(done) > 1 else ""
            print(f"  {path['name']}{mark}", end="", flush=True)
        print(flush=True)
        results = {name: medians(found) for name, found in rounds_of.items()}
        pin(gateway.native_id, None)  # the noisy neighbour's, as any task's
        noisy_neighbour(credentials, paths[1], max(seconds, 5.0))
    finally:
        credentials.revoke(task_id)
        credentials.endpoints.shutdown()
        for proc in (up, tiny, squid):
            proc.terminate()
            proc.wait(timeout=10)
        for key in credentials.store.redis.scan_iter(f"{credentials.settings.namespace}:*"):
            credentials.store.redis.delete(key)
        shutil.rmtree(directory, ignore_errors=True)
    report(results)


def medians(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One path's figures: each the median of its rounds."""
    return {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}


def report(results: dict[str, Any]) -> None:
    for direct, names in (
        ("direct", ("direct", "airlock", "tinyproxy")),
        ("direct tls", ("direct tls", "airlock tls", "squid tls")),
    ):
        base = results[direct]
        for name in names:
            r = results[name]
            added = (
                ""
                if name == direct
                else (
                    f"  added p50 {(r['p50'] - base['p50']) * 1e3:6.3f} ms"
                    f"  p99 {(r['p99'] - base['p99']) * 1e3:6.3f} ms"
                )
            )
            cpu = f"  {r['cpu_us']:5.0f} us CPU/request" if "cpu_us" in r else ""
            print(
                f"  {name:<11} p50 {r['p50'] * 1e3:6.3f} ms  p99 {r['p99'] * 1e3:6.3f} ms  "
                f"{r['rps16']:8.0f} req/s at 16 conns{added}{cpu}"
            )
    for ours, peer, direct in (
        ("airlock", "tinyproxy", "direct"),
        ("airlock tls", "squid tls", "direct tls"),
    ):
        mine, theirs, base = results[ours], results[peer], results[direct]
        added = (mine["p50"] - base["p50"]) / max(theirs["p50"] - base["p50"], 1e-9)
        cpu = (
            f", CPU/request {mine['cpu_us'] / theirs['cpu_us']:.2f}x"
            if "cpu_us" in mine and "cpu_us" in theirs
            else ""
        )
        print(
            f"  {ours} vs {peer}: added p50 {added:.2f}x, "
            f"req/s {mine['rps16'] / theirs['rps16']:.2f}x{cpu}"
        )


if __name__ == "__main__":
    main()
