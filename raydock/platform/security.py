"""API key material. Keys are random 256-bit secrets; only their SHA-256 is stored."""

from __future__ import annotations

import hashlib
import secrets

MANAGEMENT_PREFIX = "rdm"
DEPLOYMENT_PREFIX = "rdk"


def new_key(prefix: str) -> str:
    return f"{prefix}-{secrets.token_urlsafe(32)}"


def hash_key(key: str) -> str:
    # A fast hash is enough: keys carry 256 bits of entropy, so there is nothing to brute-force.
    return hashlib.sha256(key.encode()).hexdigest()


def display_prefix(key: str) -> str:
    """What lists show so a user can tell keys apart without seeing them."""
    return key[:10]
