"""Airlock runner entrypoint: PID 1 of every task container.

Runs the task command with the container's (non-root) user, passes signals on to it, keeps
its exit code, and after it ends hands the files under /workspace/output back to the
orchestrator as one framed line on stdout. Standard library only: the image stays small.
"""

import binascii
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time

OUTPUT_DIR = "/workspace/output"
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
ENDPOINT_SOCKET = "/run/airlock-endpoint/airlock.sock"
TOKEN_FILE = "/run/airlock/token"
PROXY_PORT = 3128
SECRETS_DIR = "/run/airlock/secrets"
# The gateway ends the task's TLS where a rule must see inside; the task trusts its CA.
GATEWAY_CA_FILE = "/run/airlock/gateway-ca.pem"
CA_BUNDLE = "/run/airlock/ca-bundle.pem"
SYSTEM_ROOTS = (
    "/etc/ssl/certs/ca-certificates.crt",  # Debian, Ubuntu, Alpine
    "/etc/pki/tls/certs/ca-bundle.crt",  # Fedora, RHEL
    "/etc/ssl/cert.pem",  # others
)
BOOTSTRAP_FAILED = 111
# Where a secret's wrapping token must have been created; anything else is refused.
WRAPPED_AT = "sys/wrapping/wrap"


class BootstrapError(Exception):
    pass


class EndpointUnreachable(BootstrapError):
    pass


def endpoint_call(path, body):
    """POST to the task's endpoint; the socket itself is the task's identity.

    One request per connection, read to the end: the endpoint answers with a length and
    closes. (http.client would cost every task ~14 ms of imports: ssl, email.)
    """
    payload = json.dumps(body).encode()
    request = (
        f"POST {path} HTTP/1.1\r\nHost: airlock\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    ).encode() + payload
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(30)
        sock.connect(ENDPOINT_SOCKET)
        sock.sendall(request)
        head, body_bytes = read_answer(sock)
    except OSError as exc:
        raise EndpointUnreachable(f"{path}: {exc}") from None
    except ValueError as exc:
        raise BootstrapError(f"{path}: {exc}") from None
    finally:
        sock.close()
    try:
        status = int(head.split(b" ", 2)[1])
        answer = json.loads(body_bytes or b"{}")
    except (IndexError, ValueError) as exc:
        raise BootstrapError(f"{path}: {exc}") from None
    if status != 200:
        raise BootstrapError(f"{path}: {answer.get('error', status)}")
    return answer


def read_answer(sock):
    """The head and body of one HTTP answer with a Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += receive(sock)
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        body += receive(sock)
    return head, body[:length]


def receive(sock):
    chunk = sock.recv(65536)
    if not chunk:
        raise OSError("the endpoint closed the connection mid-answer")
    return chunk


def splice(source, sink):
    try:
        while True:
            chunk = source.recv(65536)
            if not chunk:
                break
            sink.sendall(chunk)
    except OSError:
        pass
    finally:
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def tunnel(client, authority, jwt):
    """Carry one local connection through the endpoint's CONNECT to `authority`."""
    upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        upstream.connect(ENDPOINT_SOCKET)
        upstream.sendall(
            f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n"
            f"Proxy-Authorization: Bearer {jwt}\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head and len(head) < 8192:
            chunk = upstream.recv(4096)
            if not chunk:
                break
            head += chunk
        if not head.startswith(b"HTTP/1.1 200"):
            status = head.split(b"\r\n", 1)[0].decode(errors="replace")
            raise OSError(f"endpoint refused the tunnel: {status}")
        rest = head.split(b"\r\n\r\n", 1)[1]
        if rest:
            client.sendall(rest)
    except OSError as exc:
        print(f"airlock-runner: tunnel to {authority}: {exc}", file=sys.stderr, flush=True)
        client.close()
        upstream.close()
        return
    threading.Thread(target=splice, args=(upstream, client), daemon=True).start()
    splice(client, upstream)


def listen(port, serve):
    """Accept connections on 127.0.0.1:port in the container, each served on a thread."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(64)

    def accept_loop():
        while True:
            client, _ = listener.accept()
            threading.Thread(target=serve, args=(client,), daemon=True).start()

    threading.Thread(target=accept_loop, daemon=True).start()


def relay(client):
    """The local proxy port: bytes go to the endpoint unchanged; the gateway decides."""
    upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        upstream.connect(ENDPOINT_SOCKET)
    except OSError:
        client.close()
        return
    threading.Thread(target=splice, args=(upstream, client), daemon=True).start()
    splice(client, upstream)


def proxy_environment(jwt):
    """Ordinary HTTP clients find the gateway through these, with the JWT as credential.

    No NO_PROXY: every HTTP request, to any address, is the gateway's to decide.
    """
    url = f"http://task:{jwt}@127.0.0.1:{PROXY_PORT}"
    env = {}
    for name in ("HTTP_PROXY", "HTTPS_PROXY"):
        env[name] = env[name.lower()] = url
    return env


def trust_environment(ca):
    """Point every common client at a bundle of the image's own roots (for passthrough
    tunnels, where the upstream's certificate arrives untouched) and the gateway CA."""
    write_private(GATEWAY_CA_FILE, ca)
    roots = ""
    for path in SYSTEM_ROOTS:
        try:
            with open(path) as found:
                roots = found.read()
            break
        except OSError:
            continue
    write_private(CA_BUNDLE, roots.rstrip("\n") + "\n" + ca)
    env = {
        name: CA_BUNDLE
        for name in (
            "SSL_CERT_FILE",
            "REQUESTS_CA_BUNDLE",
            "CURL_CA_BUNDLE",
            "PIP_CERT",
            "GIT_SSL_CAINFO",
        )
    }
    env["NODE_EXTRA_CA_CERTS"] = GATEWAY_CA_FILE  # node adds these to its own roots
    return env


def write_private(path, text):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o400)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def bootstrap():
    """Fetch the task's JWT and secrets once, into the credentials tmpfs."""
    if not os.path.exists(ENDPOINT_SOCKET):
        return {}
    boot = endpoint_call("/v1/bootstrap", {})
    os.makedirs(SECRETS_DIR, mode=0o700, exist_ok=True)
    write_private(TOKEN_FILE, boot["jwt"])
    for secret in boot.get("secrets", []):
        info = endpoint_call("/v1/wrapping/lookup", {"token": secret["wrap_token"]})
        if info.get("creation_path") != WRAPPED_AT:
            raise BootstrapError(
                f"secret {secret['name']}: wrapped at {info.get('creation_path')!r}, "
                f"expected {WRAPPED_AT!r}; not unwrapping"
            )
        unwrapped = endpoint_call("/v1/wrapping/unwrap", {"token": secret["wrap_token"]})
        document = dict(unwrapped.get("data") or {})
        connection = secret.get("connection")
        if connection:
            # The database is reachable only through the endpoint: forward a local port.
            authority = f"{connection['host']}:{connection['port']}"
            listen(int(connection["port"]), lambda c, a=authority: tunnel(c, a, boot["jwt"]))
            document.update(connection, host="127.0.0.1")
        write_private(os.path.join(SECRETS_DIR, secret["name"]), json.dumps(document))
    listen(PROXY_PORT, relay)
    # Credentials the gateway injects: the task holds only a placeholder for each.
    placeholders = {
        "AIRLOCK_CREDENTIAL_" + name.upper().replace("-", "_"): value
        for name, value in (boot.get("placeholders") or {}).items()
    }
    return {
        "AIRLOCK_TOKEN_FILE": TOKEN_FILE,
        "AIRLOCK_SECRETS_DIR": SECRETS_DIR,
        "PYTHONPATH": "/opt/airlock",
        **placeholders,
        **proxy_environment(boot["jwt"]),
        **(trust_environment(boot["ca"]) if boot.get("ca") else {}),
    }


def read_capped(path, budget):
    """Read at most `budget` bytes of a regular file without following links."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return None, 0
        size = info.st_size
        chunks, left = [], budget
        while left > 0:
            chunk = os.read(fd, min(left, 65536))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks), size
    finally:
        os.close(fd)


def collect_output(directory, max_bytes):
    """Describe the output files, their contents capped at `max_bytes` in total."""
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    files, budget = [], max_bytes
    for name in names:
        try:
            data, size = read_capped(os.path.join(directory, name), budget)
        except OSError:
            continue
        if data is None:
            continue
        budget -= len(data)
        files.append(
            {
                "name": name,
                "size": size,
                "truncated": len(data) < size,
                "data": binascii.b2a_base64(data, newline=False).decode("ascii"),
            }
        )
    return files


def run(argv, env):
    try:
        child = subprocess.Popen(argv, env=env, close_fds=True)
    except FileNotFoundError:
        print(f"airlock-runner: command not found: {argv[0]}", file=sys.stderr, flush=True)
        return 127
    except PermissionError:
        print(f"airlock-runner: permission denied: {argv[0]}", file=sys.stderr, flush=True)
        return 126

    def forward(signum, _frame):
        try:
            child.send_signal(signum)
        except ProcessLookupError:
            pass

    for signum in FORWARDED_SIGNALS:
        signal.signal(signum, forward)
    code = child.wait()
    return 128 - code if code < 0 else code


def await_claim():
    """A warm runner: wait on the endpoint until a task claims it; its command and env.

    Until then the endpoint speaks for nobody: this runner holds no identity and no secret.
    """
    while True:
        try:
            answer = endpoint_call("/v1/claim", {})
        except EndpointUnreachable:
            time.sleep(0.2)  # the gateway is restarting; the member waits
            continue
        if answer.get("launch"):
            return answer["launch"]


def main(argv):
    env = dict(os.environ)
    if argv == ["--pool"]:
        try:
            launch = await_claim()
        except BootstrapError as exc:
            print(f"airlock-runner: no task: {exc}", file=sys.stderr, flush=True)
            return BOOTSTRAP_FAILED
        env.pop("AIRLOCK_POOL_MEMBER", None)
        env.update(launch["env"])
        argv = list(launch["command"])
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print("airlock-runner: no command given", file=sys.stderr, flush=True)
        return 2
    marker = env.pop("AIRLOCK_RESULT_MARKER", "")
    max_bytes = int(env.pop("AIRLOCK_OUTPUT_MAX_BYTES", "1048576"))
    try:
        os.makedirs(OUTPUT_DIR, exist_ok=True)
    except OSError:
        pass
    try:
        env.update(bootstrap())
    except BootstrapError as exc:
        print(f"airlock-runner: bootstrap failed: {exc}", file=sys.stderr, flush=True)
        return BOOTSTRAP_FAILED
    code = run(argv, env)
    if marker:
        frame = {"exit_code": code, "files": collect_output(OUTPUT_DIR, max_bytes)}
        sys.stdout.flush()
        # The frame starts with an ASCII record separator and a per-task nonce, so that the
        # orchestrator can tell it from whatever the command printed.
        os.write(1, f"\x1e{marker} {json.dumps(frame, separators=(',', ':'))}\n".encode())
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
