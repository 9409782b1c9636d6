"""Signatures over the audit's chain heads, by a Vault transit key (ed25519) that never
leaves Vault: whoever can rewrite Redis still cannot sign a head it made up."""

from __future__ import annotations

import base64

from orchestrator.adapters.vault.adapter import Vault
from orchestrator.adapters.vault.setup import AUDIT_KEY
from orchestrator.errors import VaultRefused


class AuditSigner:
    def __init__(self, vault: Vault, key: str = AUDIT_KEY) -> None:
        self.vault, self.key = vault, key

    def sign(self, text: str) -> str:
        """Raises ServiceUnavailable or VaultRefused."""
        answer = self.vault.write(
            f"transit/sign/{self.key}", {"input": base64.b64encode(text.encode()).decode()}
        )
        return str((answer or {})["data"]["signature"])

    def verify(self, text: str, signature: str) -> bool:
        """Raises ServiceUnavailable when Vault cannot say."""
        try:
            answer = self.vault.write(
                f"transit/verify/{self.key}",
                {"input": base64.b64encode(text.encode()).decode(), "signature": signature},
            )
        except VaultRefused:  # not a signature at all
            return False
        return bool((answer or {}).get("data", {}).get("valid"))
