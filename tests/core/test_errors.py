"""errors.first_line: the one way a driver's or a library's error becomes one line of a message."""

from __future__ import annotations

import sqlite3

import pytest
from sqlalchemy.exc import OperationalError

from i2v_daemon.errors import first_line


def test_the_first_line_of_a_message_of_several() -> None:
    assert first_line(ValueError("  the size is wrong\n  Traceback of the library\n")) == "the size is wrong"


def test_a_database_error_gives_its_drivers_message_without_sqlalchemys_statement() -> None:
    err = OperationalError("SELECT 1", {}, sqlite3.OperationalError("unable to open database file"))
    assert first_line(err) == "unable to open database file"
    assert "SELECT" in str(err)  # what first_line leaves out


@pytest.mark.parametrize("message", ["", "   \n "])
def test_an_error_without_a_message_is_named_by_its_type_or_the_given_default(message: str) -> None:
    assert first_line(RuntimeError(message)) == "RuntimeError"
    assert first_line(RuntimeError(message), default="out of memory") == "out of memory"
    assert first_line(RuntimeError(message), with_type=True) == "RuntimeError"


def test_the_line_can_be_cut_and_named_by_its_type() -> None:
    err = OSError("x" * 50 + "\nmore")
    assert first_line(err, limit=10) == "x" * 10
    assert first_line(err, limit=10, with_type=True) == "OSError: " + "x" * 10
