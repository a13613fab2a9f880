"""C{storage:} URLs: C{redis://[USER@]HOST[:PORT][/DB]} and C{rediss://...} (TLS)."""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

import attrs

DEFAULT_PORT = 6379


@attrs.frozen
class StorageURL:
    tls: bool
    host: str
    port: int
    db: int
    username: str | None = None

    def display(self) -> str:
        """The URL as logs and /readyz show it (it never holds a password)."""
        user = f"{self.username}@" if self.username else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'rediss' if self.tls else 'redis'}://{user}{host}:{self.port}/{self.db}"


def parse_storage_url(text: str) -> StorageURL:
    """Parse; L{ValueError} with the reason. A password in the URL is refused: it would show in ps and logs."""
    parts = urlsplit(text)
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"expected redis://HOST:PORT/DB or rediss://HOST:PORT/DB, got {text!r}")
    if parts.password is not None:
        raise ValueError("a password in the URL is refused (it would show in process lists and logs); use storage_password_file or storage_password_env")
    if not parts.hostname:
        raise ValueError(f"no host in {text!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"unexpected ?query or #fragment in {text!r}")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise ValueError(f"not a valid port in {text!r}") from None
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise ValueError(f"the database must be a number (redis://HOST:PORT/0), got {path!r}")
    db = int(path or 0)
    return StorageURL(tls=parts.scheme == "rediss", host=parts.hostname, port=port, db=db, username=unquote(parts.username) if parts.username else None)
