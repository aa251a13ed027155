"""API key material. Keys are random 256-bit secrets; only their SHA-256 is stored."""

from __future__ import annotations

import secrets

from raydock.serve_apps.access import hash_key  # the replicas compare keys with the same rule

MANAGEMENT_PREFIX = "rdm"
DEPLOYMENT_PREFIX = "rdk"


__all__ = ["hash_key", "new_key", "display_prefix"]


def new_key(prefix: str) -> str:
    return f"{prefix}-{secrets.token_urlsafe(32)}"


#: a key an operator chooses (RAYDOCK_ADMIN_KEY) must be at least this long: keys are stored
#: as unsalted SHA-256 and sign-in takes any number of tries, which only a random key of
#: 32 characters and more (new_key's: 256 bits) makes safe
MIN_CHOSEN_KEY_CHARS = 32


def chosen_key_problem(key: str) -> str | None:
    if len(key) < MIN_CHOSEN_KEY_CHARS or key != key.strip():
        return (
            f"RAYDOCK_ADMIN_KEY must be at least {MIN_CHOSEN_KEY_CHARS} characters without "
            'surrounding spaces (a random one, e.g. python -c "import secrets; '
            "print('rdm-' + secrets.token_urlsafe(32))\")"
        )
    return None


def display_prefix(key: str) -> str:
    """What lists show so a user can tell keys apart without seeing them."""
    return key[:10]
