"""Private swarms share one 256-bit secret, the swarm key, kept in a file readable only by its owner."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

KEY_BYTES = 32


def generate_key_file(path: str | Path) -> None:
    """Write a fresh key as 64 hex digits, mode 0600. Never overwrites: an old key may still be in use."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(KEY_BYTES) + "\n")


def load_key_file(path: str | Path) -> bytes:
    """The key in `path`; ValueError with the reason when the file is missing, malformed, or readable by others."""
    path = Path(path)
    try:
        text = path.read_text().strip()
    except OSError as e:
        raise ValueError(f"cannot read swarm key {path}: {e.strerror}") from None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        raise ValueError(f"swarm key {path} must hold {2 * KEY_BYTES} hex digits; make one with "
                         f"'swarm-node keygen {path}'")
    if path.stat().st_mode & 0o077:
        raise ValueError(f"swarm key {path} is readable by other users; run 'chmod 600 {path}'")
    return key
