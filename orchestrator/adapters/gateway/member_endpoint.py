"""The endpoint of an unclaimed warm runner: it speaks for nobody and allows nothing.

Its one request is the runner's POST /v1/claim, answered when a task claims the runner;
every proxied request is refused, and nothing it is asked for is granted.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from orchestrator.adapters.gateway.decide import Target, Verdict, deny
from orchestrator.adapters.gateway.mcp import ToolSchemas
from orchestrator.core.grant import CompiledGrant, Grant

log = logging.getLogger(__name__)
CLAIM_POLL_S = 20.0  # a waiting runner asks again after this long (it never times out)
UNCLAIMED = "no task has claimed this runner yet"


class MemberEndpoint:
    """The endpoint of an unclaimed member: it speaks for nobody and allows nothing.

    Its one request is the runner's POST /v1/claim, answered when a task claims the member
    (or after CLAIM_POLL_S with {"wait": true}, and the runner asks again).
    """

    def __init__(self, key: str, loop: asyncio.AbstractEventLoop) -> None:
        self.key, self._loop = key, loop
        self.grant = CompiledGrant(Grant.build("unclaimed", identity=""))  # allows nothing
        self.tool_schemas = ToolSchemas()
        self._claimed = asyncio.Event()
        self._launch: dict[str, Any] | None = None
        self._handed = False

    def release(self, launch: dict[str, Any]) -> None:
        """Hand the runner its task (command and environment); from any thread."""
        self._launch = launch
        self._loop.call_soon_threadsafe(self._claimed.set)

    async def answer(self, method: str, target: str) -> tuple[int, dict[str, Any]]:
        if (method, target) != ("POST", "/v1/claim"):
            return 403, {"error": UNCLAIMED}
        if self._handed:
            return 409, {"error": "this runner's task was handed over already"}
        try:
            await asyncio.wait_for(self._claimed.wait(), CLAIM_POLL_S)
        except TimeoutError:
            return 200, {"wait": True}
        if self._handed:  # two waiting requests: only one gets the task
            return 409, {"error": "this runner's task was handed over already"}
        self._handed = True
        return 200, {"launch": self._launch}

    def __call__(
        self, method: str, target: str, body: dict[str, Any]
    ) -> tuple[int, dict[str, Any]]:
        return 403, {"error": UNCLAIMED}

    # -- the proxy's policy: nothing, for nobody ---------------------------------------------
    def authenticate(self, header: str | None) -> str | None:
        return UNCLAIMED

    def decide(self, target: Target) -> Verdict:
        return deny("unclaimed", UNCLAIMED)

    def granted_tunnel(self, authority: str) -> tuple[str, int] | None:
        return None

    def audit(self, record: dict[str, Any]) -> None:
        log.warning("unclaimed runner %s tried: %s", self.key, record)

    def count_request(self) -> str | None:
        return None

    def at_door(self) -> str | None:
        return None

    def tunnel(self, delta: int) -> str | None:
        return UNCLAIMED if delta > 0 else None

    def relayed(self, count: int) -> str | None:
        return None

    def credential(self, name: str) -> str | None:
        return None
