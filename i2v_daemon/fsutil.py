"""Opening users' files safely: never following a symlink, never blocking on a FIFO."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from i2v_daemon.errors import InputError


def not_regular(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "is a symbolic link, and links are not followed; put the file itself in the folder"
    if stat.S_ISDIR(mode):
        return "is a folder, not a file"
    if stat.S_ISFIFO(mode):
        return "is a named pipe (FIFO), not a regular file; put a regular file in its place"
    return "is not a regular file (a socket or a device); put a regular file in its place"


@contextlib.contextmanager
def open_regular(path: Path) -> Iterator[tuple[BinaryIO, int]]:
    """Open a regular file for reading without following a symlink or blocking on a FIFO; yield it and its size."""
    name = path.name
    try:
        mode = os.lstat(path).st_mode
        if not stat.S_ISREG(mode):
            raise InputError(f"{name}: {not_regular(mode)}")
        # O_NOFOLLOW and O_NONBLOCK cover a swap between lstat and open; fstat below confirms.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise InputError(f"{name}: the file is gone; it was moved or deleted before it could be read") from None
    except PermissionError:
        raise InputError(f"{name}: permission denied; make it readable by the daemon's user") from None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise InputError(f"{name}: {not_regular(stat.S_IFLNK)}") from None
        # Anything else (EIO, EMFILE, ...) is not the user's doing: let the caller treat it as transient.
        raise
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise InputError(f"{name}: {not_regular(st.st_mode)}")
        yield fh, st.st_size
