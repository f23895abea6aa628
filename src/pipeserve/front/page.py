"""The page a browser gets at `GET /`: try the model, watch the server.

Plain HTML, CSS and JavaScript kept in the package (front/page/), read once when the app is
made and served from memory; nothing is loaded from anywhere else, so it works offline and
behind a strict firewall (its Content-Security-Policy says so to the browser too). The page is a
client like any other: it calls the documented JSON routes (`/info`, `/stats`, `POST /`, the
OpenAI and TEI routes) with the API key the user types, and nothing private.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib import resources

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

ASSETS = {"page.js": "text/javascript", "page.css": "text/css"}
# Everything from this server only; no inline script, no plugin, no framing by other sites.
_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
           "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_HEADERS = {"Content-Security-Policy": _POLICY, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}


def _read(name: str) -> bytes:
    return resources.files("pipeserve.front").joinpath("page", name).read_bytes()


class Page:
    """The page's files, read once."""

    def __init__(self) -> None:
        self.files = {name: _read(name) for name in ("index.html", *ASSETS)}

    def index(self) -> web.Response:
        return web.Response(body=self.files["index.html"], content_type="text/html", charset="utf-8",
                            headers=_HEADERS)

    async def asset(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in ASSETS:
            raise web.HTTPNotFound()
        return web.Response(body=self.files[name], content_type=ASSETS[name], charset="utf-8", headers=_HEADERS)


PAGE = Page()


@web.middleware
async def for_browsers(request: web.Request, handler: Handler) -> web.StreamResponse:
    """`GET /` from a browser (text/html in Accept) is the page, without an API key.

    Not a route: `/` is the API's, POST only, so an API client's `GET /` (or `OPTIONS /`) gets
    405 with `Allow: POST` from the router, and the document describes `/` as exactly that.
    """
    if request.method == "GET" and request.path == "/" and "text/html" in request.headers.get("Accept", ""):
        return PAGE.index()
    return await handler(request)
