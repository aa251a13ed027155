"""API key material. Keys are random 256-bit secrets; only their SHA-256 is stored."""

from __future__ import annotations

import secrets

from raydock.serve_apps.access import hash_key  # the replicas compare keys with the same rule

MANAGEMENT_PREFIX = "rdm"
DEPLOYMENT_PREFIX = "rdk"


__all__ = ["hash_key", "new_key", "display_prefix"]


def new_key(prefix: str) -> str:
    return f"{prefix}-{secrets.token_urlsafe(32)}"


def display_prefix(key: str) -> str:
    """What lists show so a user can tell keys apart without seeing them."""
    return key[:10]
