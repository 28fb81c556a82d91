"""Where the config file and the job database are, without loading the whole configuration.

`status`, `show`, `cancel`, `retry`, `pause` and `resume` need only the database: they read
`data_dir` and `database_url` with the same precedence as everything else (flags > `I2V_*`
environment > TOML file > defaults) and skip pydantic, so they answer in a fraction of a second.
The configuration is still checked in full (a bad key is exit 78 for every command), but only
once per distinct configuration: a successful check leaves a marker named by a hash of the config
file's bytes, the `I2V_*` environment and the flags, so the next command finds it and skips it.
`settings.py` uses the same functions for the same defaults.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from i2v_daemon.errors import ConfigError

SYSTEM_CONFIG = Path("/etc/i2v-daemon/config.toml")


def default_data_dir() -> Path:
    """`$STATE_DIRECTORY` under systemd, else `$XDG_DATA_HOME/i2v-daemon`."""
    state = os.environ.get("STATE_DIRECTORY")
    if state:
        return Path(state.split(":")[0])
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "i2v-daemon"


def config_path(flag: str | None) -> Path | None:
    """`--config FILE`, else `$I2V_CONFIG`, else /etc/i2v-daemon/config.toml if it exists."""
    if flag:
        return Path(flag)
    env = os.environ.get("I2V_CONFIG")
    if env:
        return Path(env)
    return SYSTEM_CONFIG if SYSTEM_CONFIG.is_file() else None


def read_toml(path: Path) -> dict[str, Any]:
    """The config file as a table; every way it can be unreadable is a ConfigError naming it."""
    import tomllib  # only where there is a file to read

    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config: the file {path} does not exist (--config / I2V_CONFIG)") from None
    except IsADirectoryError:
        raise ConfigError(f"config: {path} is a folder; --config / I2V_CONFIG must name a TOML file") from None
    except PermissionError:
        raise ConfigError(f"config: the file {path} cannot be read (permission denied)") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config: {path} is not valid TOML: {err}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config: {path} is not UTF-8 text") from None
    except OSError as err:
        raise ConfigError(f"config: {path} cannot be read: {err.strerror or err}") from None


def sqlite_url(path: Path) -> str:
    """A SQLite URL for `path` that SQLAlchemy reads back as exactly that path (`?`, `%`, `#` escaped)."""
    text = str(path.expanduser().absolute())
    # SQLAlchemy percent-decodes the database part and cuts it at `?` (the query): escape those three.
    return "sqlite:///" + text.replace("%", "%25").replace("?", "%3F").replace("#", "%23")


@dataclass(frozen=True)
class Location:
    data_dir: Path
    database_url: str
    config: Path | None


def locate(config: str | None = None, *, data_dir: str | None = None, database_url: str | None = None) -> Location:
    """`data_dir` and `database_url` as the daemon would resolve them (unknown keys are not checked here)."""
    path = config_path(config)
    table = read_toml(path) if path else {}

    def pick(key: str, flag: str | None) -> Any:
        if flag is not None:
            return flag
        env = os.environ.get(f"I2V_{key.upper()}")
        if env is not None:
            return env
        value = table.get(key)
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"config: {key}: must be text, got {value!r} (in {path})")
        return value

    folder = Path(pick("data_dir", data_dir) or default_data_dir()).expanduser()
    url = pick("database_url", database_url) or sqlite_url(folder / "jobs.db")
    return Location(folder, url, path)


def _marker(config: Path | None, flags: dict[str, str | None]) -> Path | None:
    """Where the "this exact configuration was checked" marker lives (None: no cache folder can be had)."""
    from i2v_daemon import __version__

    h = _Digest(f"i2v-daemon {__version__}\0".encode())
    if config is not None:
        try:
            h.update(str(config.resolve()).encode() + b"\0" + config.read_bytes())
        except OSError:
            return None  # unreadable: the full check says why
    for key, value in sorted(os.environ.items()):
        if key.startswith("I2V_") or key in ("STATE_DIRECTORY", "XDG_DATA_HOME"):
            h.update(f"\0{key}={value}".encode())
    for flag, given in sorted(flags.items()):
        h.update(f"\0--{flag}={given}".encode())
    base = os.environ.get("XDG_CACHE_HOME") or (str(Path.home() / ".cache") if Path.home() != Path("/") else "")
    if not base:
        return None
    return Path(base) / "i2v-daemon" / "checked-config" / h.hexdigest()


class _Digest:
    """Two independent 32-bit checksums and the length: enough to tell configurations apart, and zlib is
    already loaded (hashlib's OpenSSL binding alone costs the fast commands a few milliseconds)."""

    def __init__(self, data: bytes = b"") -> None:
        self.crc, self.adler, self.size = 0, 1, 0
        self.update(data)

    def update(self, data: bytes) -> None:
        self.crc = zlib.crc32(data, self.crc)
        self.adler = zlib.adler32(data, self.adler)
        self.size += len(data)

    def hexdigest(self) -> str:
        return f"{self.crc:08x}{self.adler:08x}{self.size:x}"


def check_once(config: str | None, flags: dict[str, str | None], check: Callable[[], object]) -> None:
    """Run the full configuration `check` unless this exact configuration passed it before (then skip it)."""
    marker = _marker(config_path(config), flags)
    if marker is not None and marker.exists():
        return
    check()  # raises ConfigError, exit 78
    if marker is not None:
        try:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
        except OSError:
            pass  # no writable cache: every command checks in full, a little slower
