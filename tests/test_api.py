"""The front door over HTTP, against a real `airlock serve`, OpenBao as the OIDC issuer and a
real worker: who may submit what for whom is proven and decided by policy; every way a
token can be wrong is a 401 with nothing queued; delegation needs the user's own token;
quotas hold; bad input is a problem-details 4xx, never a 5xx; the CLI speaks through it."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from orchestrator.adapters.oidc import fetch_json
from orchestrator.adapters.store import Store
from orchestrator.adapters.vault.adapter import Vault
from orchestrator.adapters.vault.issuer import dev_token, ensure_issuer
from orchestrator.api.app import Served, create_app
from orchestrator.config import Settings
from tests.conftest import IN_CI, airlock, airlock_env, running

pytestmark = pytest.mark.docker


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: Any = None
    text: str = ""


@dataclass
class Api:
    url: str
    vault: Vault
    tokens: dict[str, str] = field(default_factory=dict)

    def token(self, name: str) -> str:
        if name not in self.tokens:
            self.tokens[name] = dev_token(self.vault, name)
        return self.tokens[name]

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        token: str | None = None,
        raw: bytes | None = None,
        **headers: str,
    ) -> Answer:
        sent = {k.replace("_", "-"): v for k, v in headers.items()}
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        if data is not None:
            sent.setdefault("Content-Type", "application/json")
        request = urllib.request.Request(self.url + path, data, sent, method=method)
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                text = response.read().decode()
                status, got = response.status, dict(response.headers)
        except urllib.error.HTTPError as exc:
            text, status, got = exc.read().decode(), exc.code, dict(exc.headers)
        try:
            parsed = json.loads(text) if text else None
        except ValueError:
            parsed = None
        return Answer(status, {k.lower(): v for k, v in got.items()}, parsed, text)

    def submit(self, who: str, spec: dict[str, Any], **headers: str) -> Answer:
        return self.call("POST", "/v1/tasks", spec, self.token(who), **headers)

    def wait(self, who: str, task_id: str) -> dict[str, Any]:
        events = self.call("GET", f"/v1/tasks/{task_id}/events", token=self.token(who))
        assert events.status == 200 and "event: state" in events.text, events
        status = self.call("GET", f"/v1/tasks/{task_id}", token=self.token(who))
        assert status.status == 200, status
        return dict(status.body)


@pytest.fixture(scope="session")
def api(settings: Settings, vault: Vault, worker: Any) -> Iterator[Api]:
    if not settings.oidc_issuer:
        message = "AIRLOCK_OIDC_ISSUER is not set (run scripts/bootstrap)"
        pytest.fail(message) if IN_CI else pytest.skip(message)
    ensure_issuer(vault, settings.oidc_audience)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with running(
        settings, "serve", "--listen", f"127.0.0.1:{port}", log=f"api-{settings.namespace}"
    ) as proc:
        for _ in range(300):
            try:
                urllib.request.urlopen(f"{url}/v1/health", timeout=1).read()
                break
            except OSError:
                assert proc.poll() is None, "airlock serve exited"
                time.sleep(0.1)
        yield Api(url, vault)


def queued(store: Store, settings: Settings) -> int:
    """Task records and messages waiting in this session's queue, together."""
    return len(store.recent(10_000)) + int(store.redis.llen(settings.queue))


TESTER = {"agent": "tester", "command": ["true"]}


# -- authentication -------------------------------------------------------------------------
def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged_tokens(api: Api, settings: Settings) -> dict[str, str]:
    issuer = settings.oidc_issuer or ""
    claims = {
        "iss": issuer,
        "aud": settings.oidc_audience,
        "sub": "x",
        "username": "alice",
        "exp": int(time.time()) + 600,
        "iat": int(time.time()),
    }
    real = api.token("alice")
    header = jwt.get_unverified_header(real)
    stranger = ec.generate_private_key(ec.SECP256R1())
    jwks = fetch_json(f"{issuer}/.well-known/keys")
    public = next(k for k in jwks["keys"] if k["kid"] == header["kid"])
    pem = jwt.PyJWK(public).key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    body = b64(json.dumps(claims).encode())
    hs_head = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": header["kid"]}).encode())
    mac = hmac.new(pem, f"{hs_head}.{body}".encode(), hashlib.sha256).digest()
    none_head = b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return {
        "garbage": "not-a-token",
        "alg none": f"{none_head}.{body}.",
        "HS256 keyed with the public key": f"{hs_head}.{body}.{b64(mac)}",
        "another key, the issuer's key id": jwt.encode(
            claims, stranger, algorithm="ES256", headers={"kid": header["kid"]}
        ),
        "unknown key id": jwt.encode(claims, stranger, algorithm="ES256", headers={"kid": "nope"}),
        "tampered": real[: real.rindex(".")] + ".AAAA" + real[real.rindex(".") + 5 :],
    }


def test_every_bad_token_is_a_401_with_a_reason_and_queues_nothing(
    api: Api, settings: Settings, store: Store
) -> None:
    before = queued(store, settings)
    missing = api.call("POST", "/v1/tasks", TESTER)
    assert missing.status == 401 and missing.headers["www-authenticate"].startswith("Bearer")
    assert missing.headers["content-type"] == "application/problem+json"
    assert "no bearer token" in missing.body["detail"]
    for what, token in forged_tokens(api, settings).items():
        answer = api.call("POST", "/v1/tasks", TESTER, token)
        assert answer.status == 401, (what, answer)
        assert answer.body["detail"].startswith("not authenticated: "), (what, answer.body)
        assert 'error="invalid_token"' in answer.headers["www-authenticate"], what
    assert queued(store, settings) == before


def test_a_token_for_another_audience_is_refused(
    api: Api, settings: Settings, vault: Vault
) -> None:
    """A real token of the same issuer, minted for another client (audience)."""
    role = f"other-{settings.namespace}"
    vault.write(
        f"identity/oidc/role/{role}",
        {"key": "airlock-api", "ttl": "5m", "client_id": "someone-else"},
    )
    rule = f'path "identity/oidc/token/{role}" {{ capabilities = ["read"] }}'
    vault.write(f"sys/policies/acl/{role}", {"policy": rule})
    # A token with an entity (identity tokens need one): through a token role's alias.
    vault.write(
        f"auth/token/roles/{role}", {"allowed_policies": [role], "allowed_entity_aliases": [role]}
    )
    child = vault.write(f"auth/token/create/{role}", {"policies": [role], "entity_alias": role})
    other = (
        vault.read(f"identity/oidc/token/{role}", token=(child or {})["auth"]["client_token"]) or {}
    )["data"]["token"]
    try:
        answer = api.call("GET", "/v1/tasks", token=other)
        assert answer.status == 401 and "audience" in answer.body["detail"], answer
    finally:
        vault.delete(f"identity/oidc/role/{role}")
        vault.delete(f"sys/policies/acl/{role}")
        vault.delete(f"auth/token/roles/{role}")


def test_an_unreachable_issuer_is_a_503_never_an_accepted_token(
    api: Api, settings: Settings
) -> None:
    port, dead = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    with running(
        settings,
        "serve",
        "--listen",
        f"127.0.0.1:{port}",
        AIRLOCK_OIDC_ISSUER=f"http://127.0.0.1:{dead}/v1/identity/oidc",
    ):
        for _ in range(300):
            try:
                urllib.request.urlopen(f"{url}/v1/health", timeout=1).read()
                break
            except OSError:
                time.sleep(0.1)
        answer = Api(url, api.vault).call("GET", "/v1/tasks", token=api.token("alice"))
    assert answer.status == 503 and answer.headers["retry-after"], answer
    assert "oidc issuer is unreachable" in answer.body["detail"]


# -- who may do what ------------------------------------------------------------------------
def test_alice_runs_her_task_and_it_carries_her_as_submitter(api: Api) -> None:
    spec = {"agent": "tester", "command": ["sh", "-c", "cat /run/airlock/token"]}
    answer = api.submit("alice", spec)
    assert answer.status == 201 and answer.body["state"] == "pending", answer
    assert answer.headers["location"] == f"/v1/tasks/{answer.body['id']}"
    status = api.wait("alice", answer.body["id"])
    assert status["state"] == "succeeded", status
    assert status["submitter"] == "user:alice" and "on_behalf_of" not in status
    logs = api.call("GET", f"/v1/tasks/{status['id']}/logs", token=api.token("alice"))
    claims = jwt.decode(
        "".join(json.loads(line)["text"] for line in logs.text.splitlines()).strip(),
        options={"verify_signature": False},
    )
    assert claims["sub"].endswith("/agent/tester") and claims["submitter"] == "user:alice"
    assert "act" not in claims
    # mallory cannot even see it; ci-bot (read_all) can.
    hidden = api.call("GET", f"/v1/tasks/{status['id']}", token=api.token("mallory"))
    assert hidden.status == 404
    assert api.call("GET", f"/v1/tasks/{status['id']}", token=api.token("ci-bot")).status == 200
    mine = api.call("GET", "/v1/tasks?limit=500", token=api.token("mallory"))
    assert all(task["id"] != status["id"] for task in mine.body)


def test_a_submit_after_redis_forgot_its_scripts(api: Api, store: Store) -> None:
    """Redis keeps no scripts across a restart: the API's submit loads its script again."""
    store.redis.script_flush()
    answer = api.submit("alice", TESTER)
    assert answer.status == 201, answer
    assert api.wait("alice", answer.body["id"])["state"] == "succeeded"


def test_mallory_may_run_nothing_and_a_403_names_the_rule(
    api: Api, settings: Settings, store: Store
) -> None:
    before = queued(store, settings)
    answer = api.submit("mallory", TESTER)
    assert answer.status == 403, answer
    assert answer.body["errors"] == ["callers.agents: user 'mallory' may not run agent 'tester'"]
    assert api.submit("alice", {**TESTER, "agent": "dba"}).status == 403
    assert queued(store, settings) == before


@pytest.mark.parametrize(
    "user", ["mallory@evil.test@example.com", "bob", "mallory", "alice@example.com.evil.test"]
)
def test_nobody_acts_for_a_user_by_naming_them(
    api: Api, settings: Settings, store: Store, user: str
) -> None:
    """A typed on_behalf_of is never proof: without that user's own token, it is refused,
    whoever asks (a user for someone else, a service for anyone)."""
    before = queued(store, settings)
    for caller in ("alice", "ci-bot"):
        answer = api.submit(caller, {**TESTER, "on_behalf_of": user})
        assert answer.status == 403, (caller, answer)
        assert "needs that user's own token" in answer.body["detail"], answer.body
    assert queued(store, settings) == before


def test_a_service_acts_for_a_user_with_her_token_and_the_jwt_says_so(api: Api) -> None:
    spec = {"agent": "tester", "command": ["sh", "-c", "cat /run/airlock/token"]}
    answer = api.submit(
        "ci-bot", {**spec, "on_behalf_of": "alice"}, Airlock_Subject_Token=api.token("alice")
    )
    assert answer.status == 201, answer
    status = api.wait("ci-bot", answer.body["id"])
    assert status["state"] == "succeeded", status
    assert status["submitter"] == "service:ci-bot" and status["on_behalf_of"] == "alice"
    decision = status["front_door"]
    assert decision["allow"] is True and decision["quota"] == {"concurrent": 2, "per_minute": 1000}
    assert decision["usage"]["running"] == 0 and decision["policy_version"].startswith("sha256:")
    logs = api.call("GET", f"/v1/tasks/{status['id']}/logs", token=api.token("ci-bot"))
    token = "".join(json.loads(line)["text"] for line in logs.text.splitlines()).strip()
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["sub"] == "alice"
    assert claims["act"]["sub"].endswith("/agent/tester")
    assert claims["act"]["act"] == {"sub": "service:ci-bot"}
    # alice sees the task done for her.
    assert api.call("GET", f"/v1/tasks/{status['id']}", token=api.token("alice")).status == 200


def test_a_subject_token_must_be_the_named_users_and_a_users(api: Api) -> None:
    wrong_user = api.submit(
        "ci-bot", {**TESTER, "on_behalf_of": "bob"}, Airlock_Subject_Token=api.token("alice")
    )
    assert wrong_user.status == 403 and "is not the subject token's user" in wrong_user.text
    service = api.submit("alice", TESTER, Airlock_Subject_Token=api.token("ci-bot"))
    assert service.status == 403 and "not a user's" in service.text
    forged = api.submit("ci-bot", TESTER, Airlock_Subject_Token="not-a-token")
    assert forged.status == 401
    # mallory's own token does not let ci-bot act for her: she is not in its act_for.
    mallory = api.submit("ci-bot", TESTER, Airlock_Subject_Token=api.token("mallory"))
    assert mallory.status == 403
    assert "callers.act_for: service 'ci-bot' may not act for 'mallory'" in mallory.text


def test_quotas_are_policy(api: Api) -> None:
    """ci-bot may have 2 tasks running: the third is refused until one ends."""
    sleeper = {"agent": "tester", "command": ["sleep", "60"]}
    first = [api.submit("ci-bot", sleeper).body["id"] for _ in range(2)]
    try:
        third = api.submit("ci-bot", sleeper)
        assert third.status == 403, third
        assert "callers.concurrent: service 'ci-bot' has 2 tasks running (quota 2)" in third.text
    finally:
        for task_id in first:
            api.call("POST", f"/v1/tasks/{task_id}/cancel", token=api.token("ci-bot"))
        for task_id in first:
            api.wait("ci-bot", task_id)
    again = api.submit("ci-bot", TESTER)
    assert again.status == 201, again
    api.wait("ci-bot", again.body["id"])


def test_a_quota_holds_when_submits_race(api: Api) -> None:
    """Eight submits at once against a quota of 2: the count and the check are one step, so
    exactly two get in, however the requests interleave."""
    sleeper = {"agent": "tester", "command": ["sleep", "60"]}
    token = api.token("ci-bot")
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: api.submit("ci-bot", sleeper), range(8)))
    admitted = [a.body["id"] for a in answers if a.status == 201]
    try:
        assert len(admitted) == 2, [a.status for a in answers]
        refused = [a for a in answers if a.status != 201]
        assert all(a.status == 403 and "callers.concurrent" in a.text for a in refused)
    finally:
        for task_id in admitted:
            api.call("POST", f"/v1/tasks/{task_id}/cancel", token=token)
        for task_id in admitted:
            api.wait("ci-bot", task_id)


def test_the_callers_trace_continues_into_the_task(api: Api) -> None:
    """A submit with a W3C traceparent: the task's spans are in the caller's trace, under
    the submit's server span."""
    trace_id, parent = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    answer = api.submit("alice", TESTER, traceparent=f"00-{trace_id}-{parent}-01")
    assert answer.status == 201, answer
    api.wait("alice", answer.body["id"])
    spans = api.call("GET", f"/v1/tasks/{answer.body['id']}/trace", token=api.token("alice"))
    assert spans.status == 200 and spans.body, spans
    assert {span["trace_id"] for span in spans.body} == {trace_id}
    submit = next(span for span in spans.body if span["name"] == "submit")
    assert submit["parent_id"] == parent
    assert submit["attributes"]["http.route"] == "/v1/tasks"
    assert submit["attributes"]["http.response.status_code"] == 201
    assert submit["attributes"]["airlock.submitter"] == "user:alice"


def test_an_idempotency_key_returns_the_first_task(api: Api) -> None:
    key = str(uuid.uuid4())
    first = api.submit("alice", TESTER, Idempotency_Key=key)
    again = api.submit("alice", TESTER, Idempotency_Key=key)
    assert first.status == 201 and again.status == 200, (first, again)
    assert again.body["id"] == first.body["id"] and again.body["created"] is False
    other = api.submit("alice", {**TESTER, "command": ["false"]}, Idempotency_Key=key)
    assert other.status == 422 and "Idempotency-Key" in other.text
    # Keys are per caller: ci-bot's same key is its own.
    theirs = api.submit("ci-bot", TESTER, Idempotency_Key=key)
    assert theirs.status == 201 and theirs.body["id"] != first.body["id"]
    api.wait("alice", first.body["id"])
    api.wait("ci-bot", theirs.body["id"])


# -- bad input --------------------------------------------------------------------------------
def test_bad_bodies_are_4xx_problems_with_the_field(
    api: Api, settings: Settings, store: Store
) -> None:
    before = queued(store, settings)
    token = api.token("alice")
    cases = [
        (400, api.call("POST", "/v1/tasks", token=token, raw=b'{"agent": ')),
        (413, api.call("POST", "/v1/tasks", token=token, raw=b"{" + b" " * (2 << 20) + b"}")),
        (422, api.call("POST", "/v1/tasks", {**TESTER, "privileged": True}, token)),
        (422, api.call("POST", "/v1/tasks", {**TESTER, "limits": {"cpus": "many"}}, token)),
        (422, api.call("POST", "/v1/tasks", [1, 2], token)),
        (422, api.call("POST", "/v1/tasks", token=token, raw=b"")),
        (422, api.call("POST", "/v1/tasks", TESTER, token, Content_Type="text/plain")),
        (422, api.call("POST", "/v1/tasks", TESTER, token, Idempotency_Key="k" * 256)),
    ]
    for expected, answer in cases:
        assert answer.status == expected, answer
        assert answer.headers["content-type"] == "application/problem+json", answer
        assert answer.body["status"] == expected and answer.body["detail"], answer
    assert cases[2][1].body["errors"][0]["field"] == "privileged"
    assert cases[3][1].body["errors"][0]["field"] == "limits.cpus"
    assert cases[7][1].body["errors"][0]["field"] == "header.idempotency-key"
    assert queued(store, settings) == before


@pytest.mark.parametrize(
    "hostile",
    [".", "..", "%2Fetc", "a%2F..%2F..%2Fb", "%00", "x" * 10_000, "pool-0123456789abcdef"],
)
def test_hostile_ids_are_404_never_a_path(api: Api, hostile: str) -> None:
    token = api.token("ci-bot")
    for path in ("", "/logs", "/events", "/output", "/trace"):
        answer = api.call("GET", f"/v1/tasks/{hostile}{path}", token=token)
        assert answer.status in (404, 405), (hostile[:20], path, answer.status)
    assert api.call("POST", f"/v1/tasks/{hostile}/cancel", token=token).status in (404, 405)


def test_openapi_is_3_1_from_the_spec_model(api: Api) -> None:
    document = api.call("GET", "/openapi.json").body
    assert document["openapi"].startswith("3.1")
    assert "TaskSpec" in document["components"]["schemas"]
    assert {"/v1/tasks", "/v1/tasks/{task_id}/events", "/v1/jwks"} <= set(document["paths"])
    jwks = api.call("GET", "/v1/jwks").body
    assert jwks["keys"] and all("d" not in key for key in jwks["keys"])


# -- the CLI through the API ------------------------------------------------------------------
def test_the_cli_submits_and_reads_through_the_api(api: Api, settings: Settings) -> None:
    env = {"AIRLOCK_API_URL": api.url, "AIRLOCK_TOKEN": api.token("alice")}
    done = airlock(
        settings,
        "submit",
        "--agent",
        "tester",
        "--wait",
        "--",
        "sh",
        "-c",
        "echo hi; exit 3",
        **env,
    )
    assert done.returncode == 3, done.stderr
    assert "hi" in done.stdout
    task_id = json.loads(airlock(settings, "list", "--limit", "1", "--json", **env).stdout)[0]["id"]
    status = json.loads(airlock(settings, "status", task_id, "--json", **env).stdout)
    assert status["state"] == "failed" and status["exit_code"] == 3
    assert status["submitter"] == "user:alice"
    refused = airlock(
        settings,
        "submit",
        "--agent",
        "tester",
        "--",
        "true",
        AIRLOCK_API_URL=api.url,
        AIRLOCK_TOKEN=api.token("mallory"),
    )
    assert refused.returncode == 2 and "callers.agents" in refused.stderr
    nobody = airlock(settings, "status", task_id, AIRLOCK_API_URL=api.url, AIRLOCK_TOKEN="x.y.z")
    assert nobody.returncode == 4 and "not authenticated" in nobody.stderr


def test_the_python_client_goes_through_the_api(api: Api, settings: Settings) -> None:
    """`from orchestrator import client` submits as the token's caller, needing no Redis."""
    script = (
        "import json\n"
        "from orchestrator import client\n"
        "task = client.submit({'agent': 'tester', 'command': ['sh', '-c', 'exit 5']})\n"
        "done = client.wait(task, timeout_s=60)\n"
        "print(json.dumps(done))\n"
    )
    env = airlock_env(
        settings,
        AIRLOCK_API_URL=api.url,
        AIRLOCK_TOKEN=api.token("alice"),
        REDIS_URL="redis://127.0.0.1:1/0",  # nothing there: the client must not need it
    )
    ran = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert ran.returncode == 0, ran.stderr
    done = json.loads(ran.stdout)
    assert done["state"] == "failed" and done["exit_code"] == 5
    assert done["submitter"] == "user:alice"


def test_a_fault_of_the_servers_own_is_a_problem_that_names_nothing_internal() -> None:
    """An error the API did not expect, on the served submit path and on FastAPI's routes:
    a 500 problem answer, its detail free of the exception's text."""

    class Faulty:
        def known(self, token: str) -> None:
            raise RuntimeError("internal: /var/lib/airlock/secret")

    served = Served(create_app(Faulty(), None, dict))  # type: ignore[arg-type]

    async def call(method: str, path: str) -> tuple[int, dict[str, str], bytes]:
        scope = {
            "type": "http",
            "method": method,
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "headers": [(b"authorization", b"Bearer x"), (b"content-type", b"application/json")],
            "http_version": "1.1",
            "scheme": "http",
            "server": ("127.0.0.1", 8600),
            "client": ("127.0.0.1", 1),
            "root_path": "",
        }
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"{}", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        with contextlib.suppress(RuntimeError):  # FastAPI's path re-raises after answering
            await served(scope, receive, send)
        head = sent[0]
        headers = {k.decode(): v.decode() for k, v in head["headers"]}
        return head["status"], headers, b"".join(m.get("body", b"") for m in sent[1:])

    for method, path in (("POST", "/v1/tasks"), ("GET", "/v1/tasks")):
        status, headers, body = asyncio.run(call(method, path))
        assert status == 500 and headers["content-type"] == "application/problem+json", body
        answer = json.loads(body)
        assert answer["title"] == "Internal error" and "secret" not in body.decode(), answer
