"""The egress gateway: every byte a task sends out is decided, audited and traced here."""
