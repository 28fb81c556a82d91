"""The page at `/`: the token handshake (the Jupyter pattern), the app shell, and its static assets.

`/?token=<token>` sets an HttpOnly, SameSite=Strict cookie of its own (expiring after
`api_session_seconds`; see `auth.Sessions`) and redirects to `/`; without a valid cookie `/` is
only a sign-in form. The assets (HTML, CSS, one script) are files served by
`serve` itself and carry no data: everything the page shows comes from `/api/v1/`.
"""

from __future__ import annotations

import html
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response

from i2v_daemon.api.auth import COOKIE
from i2v_daemon.api.context import context

STATIC = Path(__file__).parent / "static"
router = APIRouter(include_in_schema=False)

_SIGNIN = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>i2v-daemon: sign in</title><link rel="icon" href="static/icon.svg"><link rel="stylesheet" href="static/app.css">
</head><body class="signin"><main class="card signin-card">
<h1><img src="static/icon.svg" alt="" width="28" height="28"> i2v-daemon</h1>
<p>Paste the API token: the one line in the server's <code>api_token_file</code>
(<code>&lt;data_dir&gt;/api-token</code>; under systemd <code>sudo cat /var/lib/i2v-daemon/api-token</code>).</p>
{message}<form method="get" action="./"><label for="token">Token</label>
<input id="token" name="token" type="password" autocomplete="current-password" required autofocus>
<button type="submit">Open</button></form></main></body></html>
"""


@router.get("/", response_model=None)
def index(request: Request, token: str | None = None) -> Response:
    """The page with a valid cookie; the sign-in form without; `?token=` sets the cookie."""
    ctx = context(request)
    if token is not None:
        if not ctx.token.matches(token):
            return _signin("That token is not the one in api_token_file; copy it again.", status=401)
        response = RedirectResponse("./", status_code=303)  # relative: works behind a proxy's path prefix too
        response.set_cookie(
            COOKIE, ctx.sessions.issue(), max_age=ctx.sessions.max_age, path="/", httponly=True, samesite="strict",
            secure=request.url.scheme == "https",
        )
        return response
    if ctx.sessions.valid(request.cookies.get(COOKIE)):
        return FileResponse(STATIC / "index.html", media_type="text/html", headers={"Cache-Control": "no-store"})
    return _signin(None, status=200)


def _signin(message: str | None, *, status: int) -> HTMLResponse:
    note = f'<p class="error" role="alert">{html.escape(message)}</p>' if message else ""
    body = _SIGNIN.format(message=note)
    return HTMLResponse(body, status_code=status, headers={"Cache-Control": "no-store"})
