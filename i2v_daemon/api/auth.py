"""The API's one secret: a bearer token read from `api_token_file` (made 0600 if missing), and the page's cookie.

Every `/api/` request carries `Authorization: Bearer <token>` or, from the page, the cookie that
`/?token=<token>` set. Tokens are compared in constant time. A state-changing request that
authenticated with the cookie alone must also prove it came from our own page (`Origin` or
`Sec-Fetch-Site`), because a browser attaches cookies to requests that other sites start.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from starlette.requests import HTTPConnection

from i2v_daemon.errors import ConfigError

COOKIE = "i2v_session"
COOKIE_MAX_AGE = 30 * 86400
MIN_TOKEN_CHARS = 32
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class AuthError(Exception):
    """The request is not allowed: `status` 401 (who are you?) or 403 (not from here)."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind


@dataclass(frozen=True)
class Token:
    """The token as loaded, and the cookie value derived from it (so the token itself never sits in a browser)."""

    value: str

    @property
    def cookie_value(self) -> str:
        return hmac.new(self.value.encode(), b"i2v-daemon page cookie v1", hashlib.sha256).hexdigest()

    def matches(self, given: str | None) -> bool:
        return given is not None and hmac.compare_digest(given.encode(), self.value.encode())

    def matches_cookie(self, given: str | None) -> bool:
        return given is not None and hmac.compare_digest(given.encode(), self.cookie_value.encode())


def load_or_create_token(path: Path) -> tuple[Token, bool]:
    """Read the token file, creating it (mode 0600, 32 random bytes, URL-safe) if missing; returns (token, created)."""
    created = False
    if not path.exists():
        created = _create(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"api_token_file / I2V_API_TOKEN_FILE: cannot read {path}: {err.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(
            f"api_token_file / I2V_API_TOKEN_FILE: {path} is not text; delete it and `serve` makes a new one"
        ) from None
    value = raw.strip()
    if len(value) < MIN_TOKEN_CHARS or any(c.isspace() or not c.isprintable() for c in value):
        raise ConfigError(
            f"api_token_file / I2V_API_TOKEN_FILE: {path} must hold one token of at least {MIN_TOKEN_CHARS} "
            "printable characters on one line; delete it and `serve` makes a new one"
        )
    return Token(value), created


def _create(path: Path) -> bool:
    """Write a new token under a temporary name and link it into place, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(secrets.token_urlsafe(32) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)  # fails if another `serve` made one a moment ago: theirs wins, both use it
        except FileExistsError:
            return False
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def readable_by_others(path: Path) -> bool:
    """Whether group or others may read the token file (worth a warning: they could act as the API's user)."""
    try:
        return bool(os.stat(path).st_mode & (stat.S_IRWXG | stat.S_IRWXO))
    except OSError:
        return False


def bearer(conn: HTTPConnection) -> str | None:
    header = conn.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def check(conn: HTTPConnection, token: Token) -> str:
    """Authenticate one request; returns "bearer" or "cookie", or raises AuthError."""
    given = bearer(conn)
    if given is not None:
        if token.matches(given):
            return "bearer"
        raise AuthError(401, "unauthorized", "the bearer token is wrong; use the one in api_token_file")
    if token.matches_cookie(conn.cookies.get(COOKIE)):
        if conn.scope["type"] == "http" and conn.scope["method"] not in SAFE_METHODS and not same_origin(conn):
            raise AuthError(
                403, "forbidden",
                "a cookie-authenticated request that changes something must come from this server's own page "
                "(Origin or Sec-Fetch-Site); scripts should send Authorization: Bearer <token> instead",
            )
        return "cookie"
    raise AuthError(
        401, "unauthorized",
        "send Authorization: Bearer <token> with the token from api_token_file (or open /?token=<token> in a browser)",
    )


def same_origin(conn: HTTPConnection) -> bool:
    """Whether the browser says this request came from a page of this very origin."""
    site = conn.headers.get("sec-fetch-site")
    if site is not None:
        return site == "same-origin"
    origin = conn.headers.get("origin")
    if not origin or origin == "null":
        return False
    parts = urlsplit(origin)
    host = conn.headers.get("host", "")
    return parts.scheme == conn.url.scheme and parts.netloc.lower() == host.lower()
