"""The `airlock` command. It parses, delegates to the client or the worker host's
services, and renders; nothing more."""

from orchestrator.cli.app import main

__all__ = ["main"]
