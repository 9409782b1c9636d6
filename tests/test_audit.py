"""The audit holds against someone who can write to Redis: chains rewritten consistently,
cut short or wholly deleted are found by their signed anchors (Redis and the host's anchor
file); forged anchors and trim marks are found by their signatures; retention trims and
the chains still verify."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hypothesis
import orjson
import pytest
from hypothesis import strategies as st

from orchestrator.adapters.gateway.audit import GENESIS, AuditLog, Mark, canonical, record_hash
from orchestrator.adapters.store import Store
from orchestrator.adapters.vault.adapter import Vault
from orchestrator.adapters.vault.audit_key import AuditSigner
from orchestrator.config import Settings


@pytest.fixture
def isolated(settings: Settings) -> Iterator[Store]:
    store = Store(settings.redis_url, f"{settings.namespace}-audit-{uuid.uuid4().hex[:6]}")
    yield store
    for key in store.redis.scan_iter(f"{store.keys.ns}:*"):
        store.redis.delete(key)


def signed_log(store: Store, vault: Vault, anchors: Path, chain: str = "c1") -> AuditLog:
    return AuditLog(store, chain, AuditSigner(vault), anchors)


def whats(log: AuditLog) -> list[str]:
    return [p.what for p in log.verify()[1]]


def rewrite(store: Store, change: Any) -> None:
    """What an attacker with Redis write access does: change records and re-link the whole
    chain, head included, so the plain hash chain verifies again."""
    entries = store.redis.xrange(store.keys.audit)
    store.redis.delete(store.keys.audit)
    head = GENESIS
    for _, fields in entries:
        record = change(json.loads(fields["record"]))
        digest = record_hash(head, record)
        store.redis.xadd(
            store.keys.audit, {"record": canonical(record), "prev": head, "hash": digest}
        )
        head = digest
    store.redis.set(store.keys.audit_head("c1"), head)


def test_a_consistently_rewritten_chain_is_found_by_its_anchor(
    isolated: Store, vault: Vault, tmp_path: Path
) -> None:
    anchors = tmp_path / "anchors.jsonl"
    log = signed_log(isolated, vault, anchors)
    for i in range(20):
        log.append({"task": "t", "decision": "deny", "n": i})
    log.flush()
    assert log.verify() == (20, [])
    assert json.loads(anchors.read_text().splitlines()[-1])["seq"] == 20

    rewrite(isolated, lambda r: {**r, "decision": "allow"})
    assert AuditLog(isolated).verify() == (20, [])  # the bare chain cannot tell
    assert whats(log) == ["record 20 differs from its anchor: rewritten"]


def test_a_wholly_deleted_chain_is_found_by_the_hosts_anchor_file(
    isolated: Store, vault: Vault, tmp_path: Path
) -> None:
    anchors = tmp_path / "anchors.jsonl"
    log = signed_log(isolated, vault, anchors)
    for i in range(5):
        log.append({"task": "t", "decision": "deny", "n": i})
    log.flush()
    for key in isolated.redis.scan_iter(f"{isolated.keys.ns}:*"):
        isolated.redis.delete(key)  # stream, head and the anchor kept in Redis: all gone
    assert whats(log) == ["chain deleted: it was anchored at record 5"]


def test_a_chain_cut_short_with_its_head_moved_back_is_found(
    isolated: Store, vault: Vault, tmp_path: Path
) -> None:
    log = signed_log(isolated, vault, tmp_path / "anchors.jsonl")
    for i in range(6):
        log.append({"n": i})
    log.flush()
    entries = isolated.redis.xrange(isolated.keys.audit)
    for entry_id, _ in entries[3:]:
        isolated.redis.xdel(isolated.keys.audit, entry_id)
    isolated.redis.set(isolated.keys.audit_head("c1"), entries[2][1]["hash"])
    assert whats(log) == ["anchored record 6 is gone"]


def test_forged_anchors_and_trim_marks_are_refused(
    isolated: Store, vault: Vault, tmp_path: Path
) -> None:
    log = signed_log(isolated, vault, tmp_path / "anchors.jsonl")
    for i in range(4):
        log.append({"n": i})
    log.flush()
    forged = Mark("c1", 2, "f" * 64, 0.0, isolated.keys.ns, "vault:v1:" + "A" * 86)
    isolated.set_audit_mark("anchor", "c9", forged.to_json())
    isolated.set_audit_mark("trim", "c1", forged.to_json())  # "records 1-2 were trimmed"
    found = whats(log)
    assert "anchor mark with a forged signature" in found
    assert "trim mark with a forged signature" in found


def test_retention_trims_and_the_chains_still_verify(
    isolated: Store, vault: Vault, tmp_path: Path
) -> None:
    log = signed_log(isolated, vault, tmp_path / "anchors.jsonl")
    other = signed_log(isolated, vault, tmp_path / "anchors.jsonl", chain="c2")
    for i in range(30):
        (log if i % 3 else other).append({"n": i})
    log.flush()
    other.flush()
    assert log.trim(max_records=10) == 20
    count, problems = log.verify()
    assert (count, problems) == (10, [])
    assert log.trim(max_age_s=0) == 10  # everything, both chains: still verifiable
    assert log.verify() == (0, [])
    # Removing records without a signed trim mark is still found.
    log.append({"n": "after"})
    log.append({"n": "after 2"})
    first = isolated.redis.xrange(isolated.keys.audit)[0][0]
    isolated.redis.xdel(isolated.keys.audit, first)
    assert any("link broken" in what for what in whats(log))


def test_audit_verify_cli_reads_the_anchor_file(
    settings: Settings, vault: Vault, tmp_path: Path
) -> None:
    from tests.conftest import airlock

    anchors = tmp_path / "anchors.jsonl"
    store = Store(settings.redis_url, settings.namespace)
    log = AuditLog(store, "cli", AuditSigner(vault), anchors)
    log.append({"task": "t", "decision": "allow"})
    log.flush()
    ok = airlock(settings, "audit", "verify", "--json", AIRLOCK_AUDIT_ANCHOR_FILE=str(anchors))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    store.redis.delete(
        store.keys.audit, store.keys.audit_head("cli"), store.keys.audit_mark("anchor", "cli")
    )
    gone = airlock(settings, "audit", "verify", "--json", AIRLOCK_AUDIT_ANCHOR_FILE=str(anchors))
    assert gone.returncode == 1
    assert "chain deleted" in json.dumps(json.loads(gone.stdout)["problems"])


# OCSF 1.1: what every event of these classes must carry (the base event's required
# attributes and the class's own), checked for each exported line.
REQUIRED = (
    "class_uid",
    "category_uid",
    "activity_id",
    "type_uid",
    "time",
    "severity_id",
    "metadata",
    "status_id",
    "action_id",
    "disposition_id",
)


def test_export_as_ocsf_follows_and_rotates(settings: Settings, tmp_path: Path) -> None:
    from tests.conftest import airlock, airlock_env

    store = Store(settings.redis_url, f"{settings.namespace}-ocsf")
    log = AuditLog(store, "x")
    context = {
        "task": str(uuid.uuid4()),
        "agent": "coder",
        "on_behalf_of": "alice",
        "submitter": "service:ci-bot",
        "trace_id": "ab" * 16,
        "policy_version": "v",
    }
    log.append(
        {
            **context,
            "method": "GET",
            "host": "pypi.org",
            "port": 443,
            "path": "/simple/",
            "scheme": "https",
            "decision": "allow",
            "rule": "egress",
            "reason": "granted",
            "status": 200,
            "bytes_in": 10,
            "bytes_out": 2,
            "duration_ms": 3.5,
        }
    )
    log.append(
        {
            **context,
            "method": "POST",
            "host": "git.example.com",
            "port": 443,
            "path": "/mcp",
            "mcp_method": "tools/call",
            "tool": "merge",
            "decision": "deny",
            "rule": "mcp.tool",
            "reason": "tool merge is not granted",
        }
    )
    env = {"AIRLOCK_NAMESPACE": f"{settings.namespace}-ocsf"}
    done = airlock(settings, "audit", "export", "--format", "ocsf", **env)
    assert done.returncode == 0, done.stderr
    http, api = (json.loads(line) for line in done.stdout.splitlines())
    for event in (http, api):
        assert all(key in event for key in REQUIRED), event
        assert event["actor"]["user"]["name"] == "alice" and event["actor"]["app_name"] == "coder"
        assert event["metadata"]["correlation_uid"] == "ab" * 16
        assert event["actor"]["session"]["uid"] == context["task"]
    assert (http["class_uid"], http["type_uid"], http["disposition"]) == (4002, 400203, "Allowed")
    assert http["http_request"]["url"] == {
        "hostname": "pypi.org",
        "port": 443,
        "path": "/simple/",
        "scheme": "https",
    }
    assert (api["class_uid"], api["disposition"], api["api"]["operation"]) == (
        6003,
        "Blocked",
        "tools/call",
    )
    assert api["resources"] == [{"name": "merge", "type": "mcp tool"}]

    # --follow into a file rotated by size: a record written later arrives within seconds.
    out = tmp_path / "siem" / "airlock.ocsf.jsonl"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "orchestrator",
            "audit",
            "export",
            "--follow",
            "--output",
            str(out),
            "--rotate-mb",
            "1",
        ],
        env=airlock_env(settings, **env),
    )
    try:
        for i in range(50):
            log.append(
                {
                    **context,
                    "method": "GET",
                    "host": "h",
                    "decision": "deny",
                    "rule": "egress",
                    "reason": "x" * 40_000,
                    "n": i,
                }
            )
        for _ in range(200):
            lines = sum(len(p.read_text().splitlines()) for p in out.parent.glob("airlock*"))
            if lines >= 52:
                break
            time.sleep(0.05)
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert lines == 52
    assert (out.parent / "airlock.ocsf.jsonl.1").exists()  # rotated past 1 MiB
    for key in store.redis.scan_iter(f"{settings.namespace}-ocsf:*"):
        store.redis.delete(key)


def test_a_batch_is_indexed_and_counted_per_task(isolated: Store) -> None:
    """One batch of several tasks' decisions: each task's index lists its own records in
    order, its counts are its own, and non-ASCII text is stored exactly as hashed."""
    log = AuditLog(isolated, "c1")
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    plan = [(a, "allow"), (b, "deny"), (a, "deny"), (a, "allow"), ("", "allow"), (b, "other")]
    log.append_many(
        [{"task": task, "decision": how, "n": n, "path": "/é"} for n, (task, how) in enumerate(plan)]
    )
    assert isolated.egress_counts([a, b]) == [{"allow": 2, "deny": 1}, {"deny": 1}]
    assert [json.loads(f["record"])["n"] for _, f in isolated.task_audit(a, 10)] == [0, 2, 3]
    assert [json.loads(f["record"])["n"] for _, f in isolated.task_audit(b, 10)] == [1, 5]
    count, problems = log.verify()
    assert count == len(plan) and not problems


def test_records_written_from_a_serving_loop_chain_as_from_a_thread(isolated: Store) -> None:
    """The gateway's writer on its serving loop: a batch longer than one linking slice, then
    the loop settles and stops, and what comes after is written by flush; one chain, whole."""
    import asyncio
    import threading

    import uvloop

    loop = uvloop.new_event_loop()
    serving = threading.Thread(target=loop.run_forever)
    serving.start()
    log = AuditLog(isolated, "c1")
    log.write_from(loop)
    for n in range(150):
        log.submit({"task": "t", "decision": "allow", "n": n})
    log.flush()
    assert log.verify() == (150, [])
    log.submit({"task": "t", "decision": "deny", "n": 150})
    asyncio.run_coroutine_threadsafe(log.settled(), loop).result(timeout=15)
    log.submit({"task": "t", "decision": "deny", "n": 151})  # after the loop settled
    loop.call_soon_threadsafe(loop.stop)
    serving.join(timeout=5)
    loop.close()
    log.flush()
    count, problems = log.verify()
    assert (count, problems) == (152, [])
    assert [r["n"] for r in log.records("t")] == list(range(152))


_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"))
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from([0.0, -0.0, 1e-4, 9.99e-5, 1e16, 9.999999999999998e15, 0.31, 1.7e9])
    | st.text(alphabet=st.characters(max_codepoint=0x2FF))
    | st.text(alphabet="\x00\x1f\x7f\"\\/ a\u00e9\u2028")
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4)
    | st.tuples(inner, inner)
    | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


@pytest.mark.parametrize(
    "value",
    [
        *(9.99e-5, 1e-05, 1.5e-300, 5e-324, 1e16, 1.5e300),
        *(float("nan"), float("inf"), -float("inf"), 2**64, -(2**63) - 1),
        *("\x7f", "caf\u00e9", "\u2028", "\x00\x1f", [[1e-7]], (1e17,), {"k": {"n": 1e-9}}),
        *({1: 2}, True, None),
    ],
)
def test_the_canonical_text_of_what_json_writes_its_own_way(value: Any) -> None:
    """Where orjson and json write differently (exponents, DEL, non-ASCII, big integers,
    non-string keys, NaN), the canonical text is still json's."""
    record = {"task": "t", "value": value, "time": 1733345678.25}
    assert written(canonical, record) == written(_JSON.encode, record)


@hypothesis.settings(max_examples=1500, deadline=None)
@hypothesis.given(st.dictionaries(st.text(max_size=8) | st.integers(0, 9), _values, max_size=8))
def test_the_canonical_text_is_jsons_whoever_writes_it(record: dict[Any, Any]) -> None:
    """What is hashed is json's canonical text byte for byte, whether the fast writer or json
    wrote it: any chain written before verifies as it did."""
    assert written(canonical, record) == written(_JSON.encode, record)


def written(encode: Any, record: dict[Any, Any]) -> str:
    try:
        return str(encode(record))
    except (TypeError, ValueError) as exc:  # mixed keys json cannot sort: raised by both
        return f"refused: {type(exc).__name__}"


def test_the_canonical_text_of_a_gateway_record_is_the_fast_writers() -> None:
    """A typical egress record takes the fast path (its output is json's, and orjson's)."""
    record = {
        "task": str(uuid.uuid4()),
        "agent": "coder",
        "method": "GET",
        "path": "/api/x",
        "status": 200,
        "duration_ms": 0.31,
        "time": time.time(),
        "identity": {"sub": "alice", "groups": ["dev"]},
    }
    assert canonical(record) == _JSON.encode(record) == orjson.dumps(
        record, option=orjson.OPT_SORT_KEYS
    ).decode()
