"""`airlock doctor` says what is wrong and how to fix it, and exits non-zero when anything is."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tests.conftest import ROOT, airlock


def findings(settings: Any, **env: str) -> tuple[int, dict[str, dict[str, Any]]]:
    proc = airlock(settings, "doctor", "--json", **env)
    return proc.returncode, {f["check"]: f for f in json.loads(proc.stdout)}


def test_a_ready_host_is_all_ok(settings: Any, vault: Any, runtime: Any) -> None:
    code, found = findings(settings)
    assert code == 0, found
    assert set(found) == {
        "redis",
        "clock",
        "docker",
        "runner",
        "runner image",
        "vault",
        "vault token",
        "vault setup",
        "policy bundle",
        "gateway",
    }
    assert all(f["ok"] for f in found.values())
    assert "sha256" in found["runner"]["detail"]
    # What it prints is fit for a terminal or a ticket: no service password in it.
    password = urlsplit(settings.redis_url).password
    assert password and password not in json.dumps(found), found["redis"]
    assert ":***@" in found["redis"]["detail"]
    # The local stack runs on the dev root token: said loudly, without failing.
    assert found["vault token"]["warning"] and "ROOT TOKEN" in found["vault token"]["detail"]


def test_problems_are_named_with_a_fix(settings: Any, vault: Any, tmp_path: Path) -> None:
    agents = shutil.copytree(ROOT / "tests" / "agents", tmp_path / "agents")
    (agents / "newcomer.yaml").write_text(
        (agents / "tester.yaml").read_text().replace("name: tester", "name: newcomer")
    )
    code, found = findings(
        settings,
        AIRLOCK_RUNNER_IMAGE="airlock-no-such-image:0",
        AIRLOCK_AGENTS_DIR=str(agents),
        AIRLOCK_RUNNER_DIR=str(tmp_path / "no-runner"),
    )
    assert code == 1
    assert not found["runner"]["ok"] and "no runner at" in found["runner"]["detail"]
    assert not found["runner image"]["ok"] and "scripts/bootstrap" in found["runner image"]["fix"]
    assert not found["vault setup"]["ok"]
    assert "token role airlock-newcomer" in found["vault setup"]["detail"]
    assert found["vault setup"]["fix"] == "run: airlock vault setup"
    assert found["redis"]["ok"] and found["docker"]["ok"]

    code, found = findings(settings, VAULT_ADDR="http://127.0.0.1:1")
    assert code == 1 and not found["vault"]["ok"]
    assert found["vault"]["detail"].startswith("vault is unreachable")
