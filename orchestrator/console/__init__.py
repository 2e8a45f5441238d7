"""The browser console: static files served by the REST API app at ``/``.

The page is plain HTML, CSS and JavaScript (no build step) with uPlot, vendored under
``static/vendor`` (MIT, its licence beside it), for the charts: nothing comes from a CDN, so the
console works on an air-gapped cluster. The files hold no data; every number on the page comes
from the token-protected ``/v1`` routes, called with the token the user signs in with (kept in
the browser's session storage only). A strict Content-Security-Policy keeps the page to its own
origin.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"
# scripts, styles, images and API calls from this origin only: nothing loads from elsewhere
CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
       "connect-src 'self'; frame-ancestors 'none'; base-uri 'self'")  # fmt: skip


class _ConsoleFiles(StaticFiles):
    async def get_response(self, path: str, scope):  # type: ignore[no-untyped-def]
        response = await super().get_response(path, scope)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response


def mount_console(app: FastAPI) -> None:
    """Serve the console at ``/`` (the page) and ``/console/`` (its scripts and styles)."""

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        headers = {"Content-Security-Policy": CSP, "Cache-Control": "no-cache",
                   "X-Content-Type-Options": "nosniff"}  # fmt: skip
        return FileResponse(STATIC / "index.html", headers=headers)

    app.mount("/console", _ConsoleFiles(directory=STATIC), name="console")
