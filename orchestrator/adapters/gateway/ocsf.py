"""Audit records as OCSF 1.1 events, for a SIEM: HTTP Activity (class 4002) for every egress
decision and tunnel, API Activity (class 6003) for MCP calls, and a sink that writes them
as JSON lines to a file it rotates by size.

Identity context goes where OCSF puts it: the user the agent acted for (else the submitter)
as `actor.user`, the agent as `actor.app_name`, the task as the actor's session; the
distributed trace id is the correlation id, so an event leads to the task's whole trace.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO, Any

OCSF_VERSION = "1.1.0"
HTTP_ACTIVITY, API_ACTIVITY = 4002, 6003
_HTTP_ACTIVITY_IDS = {
    "CONNECT": 1,
    "DELETE": 2,
    "GET": 3,
    "HEAD": 4,
    "OPTIONS": 5,
    "POST": 6,
    "PUT": 7,
    "TRACE": 8,
}
_UNMAPPED = ("task", "rule", "policy_version", "model", "prompt_hash", "submitter", "chain")


def _actor(record: dict[str, Any]) -> dict[str, Any]:
    user = record.get("on_behalf_of") or record.get("submitter") or ""
    actor: dict[str, Any] = {"app_name": record.get("agent") or ""}
    if user:
        actor["user"] = {"name": str(user)}
    if record.get("task"):
        actor["session"] = {"uid": str(record["task"])}
    return actor


def to_ocsf(record: dict[str, Any], digest: str = "") -> dict[str, Any]:
    """One audit record (as `AuditLog.records` gives it) as an OCSF event."""
    allowed = record.get("decision") == "allow"
    method = str(record.get("method") or "")
    mcp = bool(record.get("mcp_method"))
    class_uid = API_ACTIVITY if mcp else HTTP_ACTIVITY
    activity_id = 99 if mcp else _HTTP_ACTIVITY_IDS.get(method, 99)
    event: dict[str, Any] = {
        "class_uid": class_uid,
        "category_uid": class_uid // 1000,
        "activity_id": activity_id,
        "activity_name": str(record.get("mcp_method") or method or "Other"),
        "type_uid": class_uid * 100 + activity_id,
        "time": int(float(record.get("time") or 0) * 1000),
        "severity_id": 1 if allowed else 3,
        "status_id": 1 if allowed else 2,
        "status": "Success" if allowed else "Failure",
        "status_detail": str(record.get("reason") or ""),
        "action_id": 1 if allowed else 2,
        "action": "Allowed" if allowed else "Denied",
        "disposition_id": 1 if allowed else 2,
        "disposition": "Allowed" if allowed else "Blocked",
        "message": f"{record.get('decision')} {method} {record.get('host') or ''} "
        f"({record.get('rule') or ''})".strip(),
        "actor": _actor(record),
        "metadata": {
            "version": OCSF_VERSION,
            "product": {
                "name": "Airlock",
                "vendor_name": "Airlock",
                "feature": {"name": "gateway"},
            },
            "uid": digest or str(record.get("hash") or ""),
            "correlation_uid": str(record.get("trace_id") or ""),
            "sequence": int(record.get("seq") or 0),
            "log_name": "airlock.audit",
        },
        "unmapped": {k: record[k] for k in _UNMAPPED if record.get(k) is not None},
    }
    if record.get("host"):
        event["dst_endpoint"] = {"hostname": str(record["host"]), "port": record.get("port")}
    if record.get("duration_ms") is not None:
        event["duration"] = int(float(record["duration_ms"]))
    if record.get("bytes_in") is not None or record.get("bytes_out") is not None:
        event["traffic"] = {
            "bytes_in": int(record.get("bytes_in") or 0),
            "bytes_out": int(record.get("bytes_out") or 0),
        }
    if mcp:
        event["api"] = {
            "operation": str(record["mcp_method"]),
            "service": {"name": str(record.get("host") or "")},
        }
        if record.get("tool"):
            event["resources"] = [{"name": str(record["tool"]), "type": "mcp tool"}]
    else:
        event["http_request"] = {
            "http_method": method,
            "url": {
                "hostname": str(record.get("host") or ""),
                "port": record.get("port"),
                "path": str(record.get("path") or ""),
                "scheme": str(record.get("scheme") or "http"),
            },
        }
        if record.get("status"):
            event["http_response"] = {"code": int(record["status"])}
    return event


class RotatingSink:
    """JSON lines into `path`, rotated to path.1 ... path.<keep> past `max_bytes`."""

    def __init__(self, path: Path, max_bytes: int, keep: int = 5) -> None:
        self.path, self.max_bytes, self.keep = path, max_bytes, keep
        path.parent.mkdir(parents=True, exist_ok=True)
        self._out: IO[str] = open(path, "a", encoding="utf-8")  # noqa: SIM115

    def write(self, event: dict[str, Any]) -> None:
        self._out.write(json.dumps(event, sort_keys=True) + "\n")
        self._out.flush()
        if self._out.tell() >= self.max_bytes:
            self._rotate()

    def _rotate(self) -> None:
        self._out.close()
        for n in range(self.keep - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{n}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{n + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        self._out = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    def close(self) -> None:
        self._out.close()
