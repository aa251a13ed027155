"""Secrets raydock must use again (Hugging Face tokens, users' webhook URLs and signing
secrets), encrypted at rest.

Fernet (AES-128-CBC + HMAC-SHA256) with one platform key: the `secret_key` setting
(RAYDOCK_SECRET_KEY) when an operator provides one, else a key generated on first start into
the data dir, readable by its owner only. API keys are never stored this way: only their
hash is kept (security.py), since raydock never needs them back.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

KEY_FILE = "secret.key"


class SecretUnreadable(Exception):
    """A stored secret cannot be decrypted (the platform key changed)."""


def platform_key(home: Path, configured: str = "") -> bytes:
    """The configured key, or the data dir's key file (created 0600 on first use)."""
    if configured:
        return configured.encode()
    path = home / KEY_FILE
    if not path.exists():
        home.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(Fernet.generate_key())
    return path.read_bytes().strip()


class SecretBox:
    def __init__(self, key: bytes):
        self._fernet = Fernet(key)

    def seal(self, secret: str) -> str:
        return self._fernet.encrypt(secret.encode()).decode()

    def open(self, sealed: str) -> str:
        try:
            return self._fernet.decrypt(sealed.encode()).decode()
        except InvalidToken:
            raise SecretUnreadable(
                "a stored token cannot be decrypted: the platform's secret key changed; "
                "create the connection again"
            ) from None
