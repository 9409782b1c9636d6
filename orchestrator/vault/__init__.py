"""Vault (or OpenBao): the adapter seam, the idempotent setup, and the per-task broker."""
