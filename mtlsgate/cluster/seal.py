"""
Encryption at rest for what the shared store holds that must stay secret (private keys): AES-256-GCM
with a key read from C{storage_key_file}, so that a Redis dump (or a replica, or a backup of one)
alone discloses nothing.

Each sealed value is bound to where it is kept (the associated data: the Redis key and, for a
certificate's key, the SHA-256 of its chain), so a blob moved to another key, or paired with another
chain, does not open.
"""

from __future__ import annotations

import base64
import binascii
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

_VERSION = b"\x01"
_NONCE = 12


class SealError(Exception):
    """A key file that is not usable, or a sealed value that does not open (another key, or tampered with)."""


def read_key_file(path: str) -> bytes:
    """
    The 32-byte key in C{path}: base64 (standard or URL-safe) of 32 random bytes, on one line, as
    C{head -c 32 /dev/urandom | base64} writes it.
    """
    try:
        with open(path, "rb") as f:
            text = f.read().strip()
    except OSError as e:
        raise SealError(f"{path}: cannot read the storage key file ({e.strerror or type(e).__name__})") from None
    try:
        key = base64.b64decode(text.replace(b"-", b"+").replace(b"_", b"/"), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != 32:
        raise SealError(f"{path}: expected base64 of 32 random bytes (head -c 32 /dev/urandom | base64)")
    return key


def new_key_text() -> str:
    """A new key file's content."""
    return base64.b64encode(os.urandom(32)).decode("ascii") + "\n"


class Sealer:
    """Seals and opens values with one key."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise SealError("the storage key must be 32 bytes")
        self._aead = AESGCM(key)

    @classmethod
    def from_file(cls, path: str) -> Sealer:
        return cls(read_key_file(path))

    def seal(self, plaintext: bytes, context: bytes) -> str:
        """C{plaintext} encrypted and authenticated, bound to C{context}; base64 text."""
        nonce = os.urandom(_NONCE)
        return base64.b64encode(_VERSION + nonce + self._aead.encrypt(nonce, plaintext, context)).decode("ascii")

    def open(self, sealed: str, context: bytes) -> bytes:
        """The plaintext of L{seal}'s output; L{SealError} for another key, another context, or tampering."""
        try:
            raw = base64.b64decode(sealed.encode("ascii"), validate=True)
        except (binascii.Error, ValueError, UnicodeEncodeError):
            raise SealError("not a sealed value") from None
        if len(raw) < 1 + _NONCE + 16 or raw[:1] != _VERSION:
            raise SealError("not a sealed value (unknown format)")
        try:
            return self._aead.decrypt(raw[1 : 1 + _NONCE], raw[1 + _NONCE :], context)
        except InvalidTag:
            raise SealError("does not open with this storage key (another key, another place, or tampered with)") from None
