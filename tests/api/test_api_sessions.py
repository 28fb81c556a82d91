"""The page's sessions: a cookie per sign-in that expires, and that a new secret revokes with the token untouched."""

from __future__ import annotations

import stat
from pathlib import Path

from i2v_daemon.api.auth import Sessions, Token

TOKEN = Token("t" * 43)
DAY = 86400.0


def sessions(tmp_path: Path, token: Token = TOKEN, max_age: float = DAY) -> Sessions:
    return Sessions(token, tmp_path / "api-sessions", max_age)


def test_a_cookie_is_valid_until_it_expires_and_not_a_second_longer(tmp_path: Path):
    s = sessions(tmp_path)
    cookie = s.issue(now=1_000_000.0)
    assert s.valid(cookie, now=1_000_000.0)
    assert s.valid(cookie, now=1_000_000.0 + DAY - 1)
    assert not s.valid(cookie, now=1_000_000.0 + DAY)


def test_each_sign_in_gets_a_different_cookie_and_none_holds_the_token(tmp_path: Path):
    s = sessions(tmp_path)
    first, second = s.issue(), s.issue()
    assert first != second and TOKEN.value not in first


def test_a_forged_or_altered_cookie_is_refused(tmp_path: Path):
    s = sessions(tmp_path)
    expires, nonce, signature = s.issue(now=1_000_000.0).split(".")
    later = f"{int(expires) + DAY:.0f}.{nonce}.{signature}"  # the expiry pushed out by hand
    for forged in (later, f"{expires}.{nonce}.{'0' * 64}", f"{expires}.{nonce}", "", "a.b.c",
                   f"x{expires}.{nonce}.{signature}"):
        assert not s.valid(forged, now=1_000_000.0), forged


def test_a_cookie_issued_for_longer_than_the_setting_now_allows_is_refused(tmp_path: Path):
    long = sessions(tmp_path, max_age=30 * DAY).issue(now=1_000_000.0)
    assert not sessions(tmp_path, max_age=DAY).valid(long, now=1_000_000.0)


def test_revoking_ends_every_session_and_a_new_sign_in_works_again(tmp_path: Path):
    s = sessions(tmp_path)
    cookie = s.issue()
    s.revoke_all()
    assert not s.valid(cookie)
    assert s.valid(s.issue())


def test_another_serve_sharing_the_folder_sees_a_revocation_and_the_secret_file_is_private(tmp_path: Path):
    here, there = sessions(tmp_path), sessions(tmp_path)
    cookie = here.issue()
    assert there.valid(cookie)  # one secret in the folder: any serve accepts any serve's cookie
    assert stat.S_IMODE((tmp_path / "api-sessions").stat().st_mode) == 0o600
    there.revoke_all()
    assert not here.valid(cookie)
    (tmp_path / "api-sessions").unlink()  # deleting the file revokes too: a new secret is made
    fresh = here.issue()
    assert here.valid(fresh) and there.valid(fresh)


def test_a_new_token_ends_every_session(tmp_path: Path):
    cookie = sessions(tmp_path).issue()
    assert not sessions(tmp_path, token=Token("u" * 43)).valid(cookie)


def test_a_folder_that_cannot_be_written_still_gives_sessions_for_this_process(tmp_path: Path):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the folder should be")
    s = Sessions(TOKEN, blocked / "api-sessions", DAY)
    cookie = s.issue()
    assert s.valid(cookie)
