"""Where the config file and the job database are, without loading the whole configuration.

`status`, `show`, `cancel`, `retry`, `pause` and `resume` need only the database: they read
`data_dir` and `database_url` with the same precedence as everything else (flags > `I2V_*`
environment > TOML file > defaults) but skip pydantic, so they answer in a fraction of a second.
`settings.py` uses the same functions for the same defaults.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

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
    return "sqlite:///" + quote(str(path.expanduser().absolute()), safe="/~")


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
