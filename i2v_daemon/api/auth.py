"""The API's one secret: a bearer token read from `api_token_file` (made 0600 if missing), and the page's cookie.

Every `/api/` request carries `Authorization: Bearer <token>` or, from the page, the cookie that
`/?token=<token>` set. Tokens are compared in constant time. A state-changing request that
authenticated with the cookie alone must also prove it came from our own page (`Origin` or
`Sec-Fetch-Site`), because a browser attaches cookies to requests that other sites start.

Each sign-in gets a cookie of its own that expires (`api_session_seconds`), signed with a key made
from the token and a secret in `<data_dir>/api-sessions`: writing a new secret (`DELETE
/api/v1/sessions`, or deleting the file) ends every page session at once and leaves the token, and
so every script, as it was. Changing the token ends them too.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from starlette.requests import HTTPConnection

from i2v_daemon.errors import ConfigError
from i2v_daemon.logs import get_logger

COOKIE = "i2v_session"
SESSIONS_FILE = "api-sessions"  # in data_dir: the secret every page session is signed with
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
    """The token as loaded."""

    value: str

    def matches(self, given: str | None) -> bool:
        return given is not None and hmac.compare_digest(given.encode(), self.value.encode())


class Sessions:
    """The page's sign-ins: a cookie of its own per sign-in, `<expiry>.<nonce>.<signature>`, never the token.

    The signing key is made from the token and the secret in `key_file`, read again whenever the file
    changes, so a new secret written by any `serve` sharing the folder ends every session everywhere.
    """

    def __init__(self, token: Token, key_file: Path, max_age: float) -> None:
        self.token = token
        self.key_file = key_file
        self.max_age = int(max_age)
        self._lock = threading.Lock()
        self._seen: tuple[int, int, int] | None = None  # the key file's (inode, mtime, size) when last read
        self._key = b""
        self._fallback: bytes | None = None  # the folder cannot be written: a secret of this process only

    def issue(self, now: float | None = None) -> str:
        """A new session's cookie value, valid for `max_age` seconds from `now`."""
        expires = int((time.time() if now is None else now) + self.max_age)
        signed = f"{expires}.{secrets.token_urlsafe(18)}"
        return f"{signed}.{self._sign(signed)}"

    def valid(self, value: str | None, now: float | None = None) -> bool:
        """Whether `value` is a cookie this server issued, not expired and signed with the current key."""
        if not value or value.count(".") != 2:
            return False
        signed, _, signature = value.rpartition(".")
        expiry = signed.split(".", 1)[0]
        if not expiry.isdigit() or not hmac.compare_digest(signature.encode(), self._sign(signed).encode()):
            return False
        left = int(expiry) - (time.time() if now is None else now)
        return 0 < left <= self.max_age

    def revoke_all(self) -> None:
        """End every page session: a new secret; the token (and every script using it) is unchanged."""
        with self._lock:
            try:
                _write_secret(self.key_file, replace=True)
            except OSError:
                self._fallback = secrets.token_bytes(32)
            self._seen = None

    def _sign(self, signed: str) -> str:
        return hmac.new(self._current_key(), signed.encode(), hashlib.sha256).hexdigest()

    def _current_key(self) -> bytes:
        with self._lock:
            if self._fallback is None:
                try:
                    self._refresh()
                except OSError as err:
                    get_logger().warning(
                        "api_sessions_not_kept", file=str(self.key_file), error=err.strerror,
                        consequence="page sign-ins last only until serve restarts, and only on this serve",
                    )
                    self._fallback = secrets.token_bytes(32)
            return self._derive(self._key if self._fallback is None else self._fallback)

    def _refresh(self) -> None:
        """Read the secret again when its file changed (a revocation by any serve); make it when missing."""
        try:
            st = os.stat(self.key_file)
        except FileNotFoundError:
            _write_secret(self.key_file, replace=False)
            st = os.stat(self.key_file)
        if (st.st_ino, st.st_mtime_ns, st.st_size) != self._seen:
            with open(self.key_file, "rb") as fh:
                st = os.fstat(fh.fileno())
                self._key = fh.read(4096)
            self._seen = (st.st_ino, st.st_mtime_ns, st.st_size)

    def _derive(self, secret: bytes) -> bytes:
        return hmac.new(self.token.value.encode(), b"i2v-daemon page sessions v2\0" + secret, hashlib.sha256).digest()


def _write_secret(path: Path, *, replace: bool) -> None:
    """A new random secret (mode 0600) under a temporary name, then renamed over (`replace`) or linked into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(secrets.token_urlsafe(32) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            with contextlib.suppress(FileExistsError):  # another `serve` made one a moment ago: theirs wins
                os.link(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


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


def check(conn: HTTPConnection, token: Token, sessions: Sessions) -> str:
    """Authenticate one request; returns "bearer" or "cookie", or raises AuthError."""
    given = bearer(conn)
    if given is not None:
        if token.matches(given):
            return "bearer"
        raise AuthError(401, "unauthorized", "the bearer token is wrong; use the one in api_token_file")
    if sessions.valid(conn.cookies.get(COOKIE)):
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
